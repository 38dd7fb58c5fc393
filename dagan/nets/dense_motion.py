"""Dense motion / occlusion estimator T of the feature-warping module (paper §3.3, Fig. 4, Fig. 11c).

From K keypoint pairs it builds K+1 candidate sparse motions (one per keypoint, first-order Taylor
around it, plus the identity for the background), lets an hourglass look at the source warped by each
candidate, and predicts a softmax mask that blends them into one dense backward flow, plus an occlusion
map saying which feature positions cannot be taken from the source and must be inpainted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AntiAliasInterpolation2d, Hourglass, inverse_2x2, kp2gaussian, make_coordinate_grid
from .keypoints import Keypoints


class MotionSourceCache(NamedTuple):
    """What the dense-motion net needs from the source that does not change across driving frames.

    image: B×C×h×w source at the motion resolution. heatmap: B×K×h×w Gaussians of the source keypoints.
    """

    image: torch.Tensor
    heatmap: torch.Tensor


class DenseMotion(NamedTuple):
    """deformation: B×h×w×2 backward flow (grid_sample coords, align_corners=True convention).
    mask: B×(K+1)×h×w blending weights. occlusion: B×1×h×w in (0,1) or None. sparse_deformed:
    B×(K+1)×C×h×w source warped by each candidate (kept for visualisation/training)."""

    deformation: torch.Tensor
    mask: torch.Tensor
    occlusion: torch.Tensor | None
    sparse_deformed: torch.Tensor


class DenseMotionNetwork(nn.Module):
    def __init__(
        self,
        num_kp: int,
        num_channels: int = 3,
        block_expansion: int = 64,
        max_features: int = 1024,
        num_blocks: int = 5,
        scale_factor: float = 0.25,
        kp_variance: float = 0.01,
        estimate_occlusion_map: bool = True,
        align_corners: bool = True,
        head_kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.num_kp = num_kp
        self.kp_variance = kp_variance
        self.hourglass = Hourglass(
            block_expansion, (num_kp + 1) * (num_channels + 1), num_blocks, max_features
        )
        k = head_kernel_size
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=k, padding=k // 2)
        self.occlusion: nn.Conv2d | None = None
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=k, padding=k // 2)
        self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def prepare_source(self, source_image: torch.Tensor, kp_source: Keypoints) -> MotionSourceCache:
        """B×C×H×W source → cached downscaled image and source heatmaps (computed once per source)."""
        image = self.down(source_image)
        h, w = image.shape[2:]
        return MotionSourceCache(image, kp2gaussian(kp_source.value, h, w, self.kp_variance))

    def sparse_motions(self, h: int, w: int, kp_driving: Keypoints, kp_source: Keypoints) -> torch.Tensor:
        """B×(K+1)×h×w×2: for each keypoint k, z ↦ kp_s + J_s J_d⁻¹ (z − kp_d); index 0 is the identity."""
        grid = make_coordinate_grid(h, w, like=kp_driving.value)  # h×w×2
        rel = grid[None, None] - kp_driving.value[:, :, None, None, :]  # B×K×h×w×2
        if kp_source.jacobian is not None and kp_driving.jacobian is not None:
            jac = kp_source.jacobian @ inverse_2x2(kp_driving.jacobian)  # B×K×2×2
            rel = (jac[:, :, None, None] @ rel.unsqueeze(-1)).squeeze(-1)
        driving_to_source = rel + kp_source.value[:, :, None, None, :]
        identity = grid[None, None].expand(rel.shape[0], 1, h, w, 2)
        return torch.cat([identity, driving_to_source], dim=1)

    def forward(self, source: MotionSourceCache, kp_driving: Keypoints, kp_source: Keypoints) -> DenseMotion:
        b, c, h, w = source.image.shape
        k1 = self.num_kp + 1
        heat_d = kp2gaussian(kp_driving.value, h, w, self.kp_variance)
        heat = heat_d - source.heatmap
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1).unsqueeze(2)  # B×(K+1)×1×h×w

        motions = self.sparse_motions(h, w, kp_driving, kp_source)  # B×(K+1)×h×w×2
        repeated = source.image.unsqueeze(1).expand(b, k1, c, h, w).reshape(b * k1, c, h, w)
        deformed = F.grid_sample(
            repeated,
            motions.reshape(b * k1, h, w, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=self.align_corners,
        ).view(b, k1, c, h, w)

        net_in = torch.cat([heat, deformed], dim=2).view(b, k1 * (c + 1), h, w)
        feature = self.hourglass(net_in)
        mask = F.softmax(self.mask(feature), dim=1)  # B×(K+1)×h×w
        deformation = (motions * mask.unsqueeze(-1)).sum(dim=1)  # B×h×w×2
        occlusion = torch.sigmoid(self.occlusion(feature)) if self.occlusion is not None else None
        return DenseMotion(deformation, mask, occlusion, deformed)
