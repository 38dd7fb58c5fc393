"""The DaGAN inference model: depth net F_d, keypoint detector F_kp and generator, built from one config.

``forward(source, driving)`` is the plain uncached model (what the reference demo runs per frame).
``encode_source`` + ``animate`` is the same computation split so that everything depending only on the
source runs once; tests check the two agree to 1e-5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import DepthConfig, ModelConfig
from .nets.depth import FaceDepthNet
from .nets.generator import DaGANGenerator, GeneratorOutput, SourceFeatures
from .nets.keypoints import KeypointDetector, Keypoints
from .nets.lid_reader import LidReader


class SourceState(NamedTuple):
    """Everything cached per source photo (batch B = number of sources).

    image: B×3×H×W, depth: B×1×H×W or None (when no module needs depth), kp: source keypoints,
    features: the generator's per-source tensors.
    """

    image: torch.Tensor
    depth: torch.Tensor | None
    kp: Keypoints
    features: SourceFeatures


class Animation(NamedTuple):
    """Per-frame output: prediction B×3×H×W in (0,1), the driving depth (or None), driving keypoints
    (as detected, before any relative-motion transfer) and the generator's intermediate maps."""

    prediction: torch.Tensor
    driving_depth: torch.Tensor | None
    kp_driving: Keypoints
    generator: GeneratorOutput


def build_depth_net(d: DepthConfig) -> FaceDepthNet:
    """The face depth net F_d described by the ``depth`` section of a config."""
    return FaceDepthNet(
        width=d.encoder_width,
        decoder_channels=list(d.decoder_channels),
        scales=list(d.scales),
        min_depth=d.min_depth,
        max_depth=d.max_depth,
        input_scale=d.input_scale,
    )


class DaGAN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.depth_net: FaceDepthNet | None = None
        if config.needs_depth:
            self.depth_net = build_depth_net(config.depth)
        self.kp_detector = KeypointDetector(config.keypoints)
        self.generator = DaGANGenerator(config.generator, num_kp=config.keypoints.num_kp)
        # How open the driver's eyes are, for models that name their lid keypoints (config.blink).
        self.lid_reader: LidReader | None = (
            LidReader(config.blink.keypoints) if config.blink.keypoints else None
        )

    @property
    def needs_depth(self) -> bool:
        """:attr:`ModelConfig.needs_depth` of this model's config."""
        return self.config.needs_depth

    # -- branches ---------------------------------------------------------------------------------
    def estimate_depth(self, image: torch.Tensor) -> torch.Tensor | None:
        """B×3×H×W in [0,1] → B×1×H×W depth map (sigmoid disparity), or None if nothing uses depth."""
        return self.depth_net(image) if self.depth_net is not None else None

    def detect_keypoints(self, image: torch.Tensor, depth: torch.Tensor | None) -> Keypoints:
        """RGB-D (or RGB, in the ablation) → keypoints."""
        if self.config.keypoints.use_depth:
            return self.kp_detector(torch.cat([image, depth], dim=1))
        return self.kp_detector(image)

    def encode_source(self, source: torch.Tensor) -> SourceState:
        """B×3×H×W source in [0,1] → everything the per-frame path needs from it (run once per photo)."""
        depth = self.estimate_depth(source)
        kp = self.detect_keypoints(source, depth)
        return SourceState(source, depth, kp, self.generator.encode_source(source, depth, kp))

    def driving_keypoints(self, driving: torch.Tensor) -> tuple[Keypoints, torch.Tensor | None]:
        """Driving branch: B×3×H×W → (keypoints, depth)."""
        depth = self.estimate_depth(driving)
        return self.detect_keypoints(driving, depth), depth

    def render(self, state: SourceState, kp_driving: Keypoints) -> GeneratorOutput:
        """Generator per-frame path from already-known driving keypoints (e.g. after relative transfer)."""
        return self.generator.decode(state.features, state.kp, kp_driving)

    def animate(self, state: SourceState, driving: torch.Tensor) -> Animation:
        """Cached per-frame path with absolute motion: driving branch + generator."""
        kp_d, depth_d = self.driving_keypoints(driving)
        out = self.render(state, kp_d)
        return Animation(out.prediction, depth_d, kp_d, out)

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> Animation:
        """Uncached reference: recomputes the whole source branch every call."""
        depth_s = self.estimate_depth(source)
        kp_s = self.detect_keypoints(source, depth_s)
        kp_d, depth_d = self.driving_keypoints(driving)
        out = self.generator(source, depth_s, kp_s, kp_d)
        return Animation(out.prediction, depth_d, kp_d, out)
