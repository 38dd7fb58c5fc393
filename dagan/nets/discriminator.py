"""Patch discriminator for the LSGAN + feature-matching losses (paper §3.5, A.1, Fig. 11h)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AntiAliasInterpolation2d


class DiscriminatorBlock(nn.Module):
    """4×4 conv (no padding) → optional InstanceNorm → LeakyReLU(0.2) → optional 2×2 avg-pool."""

    def __init__(self, in_ch: int, out_ch: int, norm: bool, pool: bool, spectral_norm: bool) -> None:
        super().__init__()
        conv = nn.Conv2d(in_ch, out_ch, kernel_size=4)
        # The classic (non-parametrization) spectral norm keeps weight_orig/_u/_v names, which is what
        # published FOMM-family discriminators use.
        self.conv = nn.utils.spectral_norm(conv) if spectral_norm else conv
        self.norm = nn.InstanceNorm2d(out_ch, affine=True) if norm else None
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.norm is not None:
            out = self.norm(out)
        out = F.leaky_relu(out, 0.2)
        return F.avg_pool2d(out, 2) if self.pool else out


class Discriminator(nn.Module):
    """B×3×H×W → (list of intermediate feature maps for feature matching, B×1×h×w patch scores).

    For 256×256 input with 4 blocks the score map is 26×26 (the paper's Fig. 11h size).
    """

    def __init__(
        self,
        num_channels: int = 3,
        block_expansion: int = 32,
        max_features: int = 512,
        num_blocks: int = 4,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            in_ch = num_channels if i == 0 else min(max_features, block_expansion * 2**i)
            out_ch = min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(
                DiscriminatorBlock(
                    in_ch, out_ch, norm=i != 0, pool=i != num_blocks - 1, spectral_norm=spectral_norm
                )
            )
        self.down_blocks = nn.ModuleList(blocks)
        conv = nn.Conv2d(out_ch, 1, kernel_size=1)
        self.conv = nn.utils.spectral_norm(conv) if spectral_norm else conv

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = []
        for block in self.down_blocks:
            x = block(x)
            features.append(x)
        return features, self.conv(x)


class MultiScaleDiscriminator(nn.Module):
    """One :class:`Discriminator` per image scale (the paper uses a single scale, 1.0).

    Returns ``{scale: (features, scores)}`` so losses can sum over scales uniformly.
    """

    def __init__(self, scales: tuple[float, ...] = (1.0,), **kwargs) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.discs = nn.ModuleDict({_key(s): Discriminator(**kwargs) for s in self.scales})
        channels = kwargs.get("num_channels", 3)
        self.downs = nn.ModuleDict({_key(s): AntiAliasInterpolation2d(channels, s) for s in self.scales})

    def forward(self, image: torch.Tensor) -> dict[float, tuple[list[torch.Tensor], torch.Tensor]]:
        return {s: self.discs[_key(s)](self.downs[_key(s)](image)) for s in self.scales}


def discriminator_from_config(cfg) -> MultiScaleDiscriminator:
    """The discriminator described by a :class:`dagan.config.DiscriminatorConfig` (training builds it)."""
    return MultiScaleDiscriminator(
        scales=cfg.scales,
        block_expansion=cfg.block_expansion,
        max_features=cfg.max_features,
        num_blocks=cfg.num_blocks,
        spectral_norm=cfg.spectral_norm,
    )


def _key(scale: float) -> str:
    return f"disc_{scale:g}".replace(".", "_")
