"""DaGAN generator: feature encoder E_I, depth encoder E_d, feature warping, cross-modal attention, decoder.

The generator is split at the boundary that makes real-time serving cheap: :meth:`encode_source` holds
everything that depends on the source alone (E_I(I_s), the attention queries from E_d(D_s), the
dense-motion net's source inputs) and runs once per source photo; :meth:`decode` is the per-frame path.
``forward`` is the two composed, which is exactly the uncached model.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig
from .attention import CrossModalAttention
from .blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d
from .dense_motion import DenseMotionNetwork, MotionSourceCache
from .keypoints import Keypoints


class SourceFeatures(NamedTuple):
    """Per-source cache. features: B×C×h×w E_I(I_s). query: B×(h·w)×c attention queries from
    E_d(D_s), or None without attention. motion: the dense-motion net's source inputs. skips: with
    ``warped_skips``, E_I's maps before each down block (level l: B×C_l×H/2^l×W/2^l, l = 0 first),
    otherwise empty."""

    features: torch.Tensor
    query: torch.Tensor | None
    motion: MotionSourceCache
    skips: tuple[torch.Tensor, ...] = ()


class GeneratorOutput(NamedTuple):
    """prediction: B×3×H×W in (0,1). deformation: B×h×w×2 backward flow at feature size.
    occlusion: B×1×h×w or None. mask: B×(K+1)×hm×wm motion blend weights."""

    prediction: torch.Tensor
    deformation: torch.Tensor
    occlusion: torch.Tensor | None
    mask: torch.Tensor


def _resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×h×w×2 → B×H×W×2 by bilinear resampling (coordinates are normalised, so values stay)."""
    if tuple(flow.shape[1:3]) == tuple(size):
        return flow
    flow = F.interpolate(flow.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return flow.permute(0, 2, 3, 1)


def _resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[2:]) == tuple(size):
        return m
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def _encoder(in_ch: int, block_expansion: int, max_features: int, num_down: int) -> nn.ModuleDict:
    """SameBlock (7×7) + ``num_down`` DownBlocks (paper Fig. 11f/g): B×in×H×W → B×C×H/2^n×W/2^n."""
    downs = [
        DownBlock2d(
            min(max_features, block_expansion * 2**i),
            min(max_features, block_expansion * 2 ** (i + 1)),
            kernel_size=3,
            padding=1,
        )
        for i in range(num_down)
    ]
    return nn.ModuleDict(
        {
            "first": SameBlock2d(in_ch, block_expansion, kernel_size=7, padding=3),
            "down_blocks": nn.ModuleList(downs),
        }
    )


def _run_encoder(enc: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return _run_encoder_levels(enc, x)[-1]


def _run_encoder_levels(enc: nn.ModuleDict, x: torch.Tensor) -> list[torch.Tensor]:
    """Every level of the encoder: [first (H), after down 1 (H/2), ..., after the last down block]."""
    levels = [enc["first"](x)]
    for block in enc["down_blocks"]:
        levels.append(block(levels[-1]))
    return levels


class DaGANGenerator(nn.Module):
    """Generate the driving frame from the source image, its depth and two keypoint sets.

    Shapes for vox-256: source 3×256×256, depth 1×256×256, E_I and E_d outputs 256×64×64, dense motion
    at 64×64, attention over 4096 positions, decoder back to 3×256×256.

    ``warped_skips`` (off in vox-256, so the published checkpoints keep their layout) also warps E_I's
    higher-resolution maps with the same deformation and occlusion and concatenates each onto the decoder
    output of its scale (a U-Net whose skips go through the motion). The bottleneck path alone has to
    re-synthesise every detail of the photo from h×w features; with the skips the photo's own
    full-resolution features reach the decoder, so the avatar keeps the photo's detail at a small width
    and learns to reproduce the source (identity motion) within a few hundred steps.
    """

    def __init__(self, config: GeneratorConfig, num_kp: int, num_channels: int = 3) -> None:
        """Built from the ``generator`` section of a config and the keypoint count."""
        block_expansion, max_features = config.block_expansion, config.max_features
        num_down_blocks, num_bottleneck_blocks = config.num_down_blocks, config.num_bottleneck_blocks
        warp_align_corners, warped_skips = config.warp_align_corners, config.warped_skips
        att = config.attention
        super().__init__()
        self.warp_align_corners = warp_align_corners
        self.warped_skips = warped_skips
        self.dense_motion_network = DenseMotionNetwork(
            num_kp=num_kp,
            num_channels=num_channels,
            estimate_occlusion_map=config.estimate_occlusion_map,
            align_corners=warp_align_corners,
            **dataclasses.asdict(config.dense_motion),
        )
        self.image_encoder = _encoder(num_channels, block_expansion, max_features, num_down_blocks)
        feat = min(max_features, block_expansion * 2**num_down_blocks)
        self.depth_encoder: nn.ModuleDict | None = None
        self.attention: CrossModalAttention | None = None
        if att.enabled:
            self.depth_encoder = _encoder(1, block_expansion, max_features, num_down_blocks)
            self.attention = CrossModalAttention(
                feat, att.qk_channels, att.implementation, att.activation, att.kv_pool
            )
        self.bottleneck = nn.Sequential(
            *[ResBlock2d(feat, kernel_size=3, padding=1) for _ in range(num_bottleneck_blocks)]
        )

        def width(level: int) -> int:
            return min(max_features, block_expansion * 2**level)

        # With skips, the decoder output at level l is concatenated with the warped E_I map of level l
        # (same width), so every block after the first and the final conv see twice the channels.
        grow = 2 if warped_skips else 1
        self.up_blocks = nn.ModuleList(
            UpBlock2d(
                width(i + 1) * (grow if i + 1 < num_down_blocks else 1),
                width(i),
                kernel_size=3,
                padding=1,
            )
            for i in reversed(range(num_down_blocks))
        )
        k = config.final_kernel_size
        self.final = nn.Conv2d(block_expansion * grow, num_channels, kernel_size=k, padding=k // 2)

    def encode_source(
        self, source_image: torch.Tensor, source_depth: torch.Tensor | None, kp_source: Keypoints
    ) -> SourceFeatures:
        """B×3×H×W image, B×1×H×W depth (needed only with attention) → :class:`SourceFeatures`."""
        levels = _run_encoder_levels(self.image_encoder, source_image)
        features = levels[-1]
        skips = tuple(levels[:-1]) if self.warped_skips else ()
        query = None
        if self.attention is not None:
            if source_depth is None:
                raise ValueError("this generator has cross-modal attention and needs the source depth map")
            query = self.attention.project_query(_run_encoder(self.depth_encoder, source_depth))
        motion = self.dense_motion_network.prepare_source(source_image, kp_source)
        return SourceFeatures(features, query, motion, skips)

    def decode(self, source: SourceFeatures, kp_source: Keypoints, kp_driving: Keypoints) -> GeneratorOutput:
        """Per-frame path: dense motion → warp E_I(I_s) → occlusion → attention → bottleneck → decoder."""
        motion = self.dense_motion_network(source.motion, kp_driving, kp_source)
        size = tuple(source.features.shape[2:])
        deformation = _resize_flow(motion.deformation, size)
        occlusion = None if motion.occlusion is None else _resize_map(motion.occlusion, size)
        warped = self._warp(source.features, motion.deformation, motion.occlusion, size)
        if self.attention is not None:
            warped = self.attention.attend(source.query, warped)
        out = self.bottleneck(warped)
        skips = list(source.skips)
        for block in self.up_blocks:
            out = block(out)
            if skips:
                skip = skips.pop()
                out = torch.cat([out, self._warp(skip, motion.deformation, motion.occlusion)], dim=1)
        prediction = torch.sigmoid(self.final(out))
        return GeneratorOutput(prediction, deformation, occlusion, motion.mask)

    def _warp(
        self,
        features: torch.Tensor,
        deformation: torch.Tensor,
        occlusion: torch.Tensor | None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Backward-warp B×C×h×w features with the dense motion (resized to h×w), times the occlusion."""
        size = size or tuple(features.shape[2:])
        warped = F.grid_sample(
            features,
            _resize_flow(deformation, size),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=self.warp_align_corners,
        )
        if occlusion is not None:
            warped = warped * _resize_map(occlusion, size)
        return warped

    def forward(
        self,
        source_image: torch.Tensor,
        source_depth: torch.Tensor | None,
        kp_source: Keypoints,
        kp_driving: Keypoints,
    ) -> GeneratorOutput:
        return self.decode(self.encode_source(source_image, source_depth, kp_source), kp_source, kp_driving)
