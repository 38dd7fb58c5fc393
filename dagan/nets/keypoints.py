"""Keypoint detector F_kp (paper §3.3, Fig. 11b): hourglass on RGB-D, soft-argmax heatmaps, Jacobians."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KeypointConfig
from .blocks import AntiAliasInterpolation2d, Hourglass, make_coordinate_grid


class Keypoints(NamedTuple):
    """K keypoints per image in the [-1, 1] frame of the image.

    value: B×K×2 (x, y). jacobian: B×K×2×2 local affine motion around each keypoint, or None when the
    detector is configured without Jacobians (then motion near a keypoint is a pure translation).
    """

    value: torch.Tensor
    jacobian: torch.Tensor | None = None

    def detach(self) -> Keypoints:
        return Keypoints(self.value.detach(), None if self.jacobian is None else self.jacobian.detach())


class KeypointDetector(nn.Module):
    """Unsupervised keypoints from an image (B×C×H×W, C = 4 for RGB-D or 3 for RGB) → :class:`Keypoints`.

    The image is blurred and downscaled by ``scale_factor`` first: keypoints are coarse structure and the
    hourglass at 64×64 is what makes the detector cheap enough to run on every driving frame.
    Built from the ``keypoints`` section of a config (RGB-D input when ``use_depth``).
    Heatmaps come from a 7×7 conv without padding (as the reference, so imported weights line up), are
    softmax-normalised with ``temperature`` and reduced to coordinates by their expectation (soft-argmax).
    """

    def __init__(self, config: KeypointConfig) -> None:
        super().__init__()
        in_channels = 4 if config.use_depth else 3
        num_kp, block_expansion, max_features = config.num_kp, config.block_expansion, config.max_features
        num_blocks, temperature, scale_factor = config.num_blocks, config.temperature, config.scale_factor
        estimate_jacobian = config.estimate_jacobian
        self.num_kp = num_kp
        self.temperature = temperature
        self.detail: nn.Conv2d | None = None
        self.detail_step = round(1.0 / scale_factor)
        if config.detail_channels > 0:
            self.detail = nn.Conv2d(in_channels * self.detail_step**2, config.detail_channels, kernel_size=1)
        self.predictor = Hourglass(
            block_expansion, in_channels + config.detail_channels, num_blocks, max_features
        )
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=7, padding=0)
        self.jacobian: nn.Conv2d | None = None
        if estimate_jacobian:
            self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * num_kp, kernel_size=7, padding=0)
            # Start from identity Jacobians so early training sees pure-translation motion.
            nn.init.zeros_(self.jacobian.weight)
            with torch.no_grad():
                self.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(num_kp))
        self.down = AntiAliasInterpolation2d(in_channels, scale_factor)

    def forward(self, x: torch.Tensor) -> Keypoints:
        """B×C×H×W → :class:`Keypoints`. The hourglass input is the blurred, downscaled image
        (B×C×h×w, h = H·scale_factor) and, with ``detail_channels`` E, E more channels mixed from the
        full-resolution blocks behind each of its pixels (B×E×h×w)."""
        small = self.down(x)
        if self.detail is not None:
            small = torch.cat([small, self.detail(F.pixel_unshuffle(x, self.detail_step))], dim=1)
        feature = self.predictor(small)
        logits = self.kp(feature)  # B×K×h×w
        b, k, h, w = logits.shape
        heatmap = F.softmax(logits.flatten(2) / self.temperature, dim=2).view(b, k, h, w)
        grid = make_coordinate_grid(h, w, like=heatmap)  # h×w×2
        value = (heatmap.unsqueeze(-1) * grid).sum(dim=(2, 3))  # B×K×2
        jacobian = None
        if self.jacobian is not None:
            jmap = self.jacobian(feature).view(b, k, 4, h, w)
            jacobian = (heatmap.unsqueeze(2) * jmap).sum(dim=(3, 4)).view(b, k, 2, 2)
        return Keypoints(value, jacobian)
