"""Building blocks shared by the keypoint detector, the dense-motion net, the generator and the discriminator.

They follow the FOMM family's conventions (conv → BatchNorm → ReLU, average-pool downsampling,
nearest-neighbour upsampling, pre-activation residual blocks) because DaGAN's published weights were
trained with exactly those layers; matching them keeps imported checkpoints loadable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_coordinate_grid(height: int, width: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Regular grid in [-1, 1]: returns H×W×2 with ``[..., 0] = x`` and ``[..., 1] = y``.

    The corners are exactly ±1 (the ``align_corners=True`` convention) since keypoints are expressed
    in this frame; ``like`` sets dtype and device.
    """
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else None
    x = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    y = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then integer-stride subsampling, so downscaled inputs do not alias.

    Input B×C×H×W → output B×C×(H·scale)×(W·scale). ``1/scale`` must be an integer (0.25, 0.5, 1).
    Strided slicing equals nearest-neighbour resizing at integer factors and exports cleanly to ONNX.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        step = round(1.0 / scale)
        if abs(step * scale - 1.0) > 1e-6:
            raise ValueError(f"scale must be 1/n for an integer n, got {scale}")
        self.step = step
        self.channels = channels
        sigma = (1.0 / scale - 1.0) / 2.0
        ksize = 2 * round(sigma * 4) + 1
        self.pad = ksize // 2
        coords = torch.arange(ksize, dtype=torch.float32) - (ksize - 1) / 2
        g = torch.exp(-(coords**2) / (2 * sigma**2)) if sigma > 0 else torch.ones(1)
        kernel = torch.outer(g, g)
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, ksize, ksize).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step == 1:
            return x
        x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        x = F.conv2d(x, self.weight, groups=self.channels)
        return x[:, :, :: self.step, :: self.step]


class ResBlock2d(nn.Module):
    """Pre-activation residual block keeping C×H×W (BN → ReLU → conv, twice, plus identity)."""

    def __init__(self, features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(features, features, kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(features, affine=True)
        self.norm2 = nn.BatchNorm2d(features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


class UpBlock2d(nn.Module):
    """×2 nearest upsample then conv → BN → ReLU: B×Cin×H×W → B×Cout×2H×2W."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """conv → BN → ReLU → 2×2 average pool: B×Cin×H×W → B×Cout×H/2×W/2 (paper Fig. 11d)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class SameBlock2d(nn.Module):
    """conv → BN → ReLU at the same resolution: B×Cin×H×W → B×Cout×H×W."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


def _width(block_expansion: int, level: int, max_features: int) -> int:
    return min(max_features, block_expansion * (2**level))


class HourglassEncoder(nn.Module):
    """``num_blocks`` DownBlocks; returns every intermediate map (input first) for the skip connections."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock2d(
                in_features if i == 0 else _width(block_expansion, i, max_features),
                _width(block_expansion, i + 1, max_features),
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    """``num_blocks`` UpBlocks, each followed by concatenation with the encoder map of the same size."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            mult = 1 if i == num_blocks - 1 else 2
            blocks.append(
                UpBlock2d(
                    mult * _width(block_expansion, i + 1, max_features),
                    _width(block_expansion, i, max_features),
                )
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        skips = list(skips)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    """U-Net style hourglass: B×Cin×H×W → B×(block_expansion+Cin)×H×W. H, W divisible by 2^num_blocks."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def kp2gaussian(kp_value: torch.Tensor, height: int, width: int, kp_variance: float) -> torch.Tensor:
    """Render keypoints as isotropic Gaussians: B×K×2 (x, y in [-1, 1]) → B×K×H×W."""
    grid = make_coordinate_grid(height, width, like=kp_value)  # H×W×2
    diff = grid[None, None] - kp_value[:, :, None, None, :]  # B×K×H×W×2
    return torch.exp(-0.5 * (diff**2).sum(-1) / kp_variance)


def inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of ...×2×2 matrices; avoids torch.linalg.inv, which ONNX lacks."""
    a, b = m[..., 0, 0], m[..., 0, 1]
    c, d = m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    row0 = torch.stack([d, -b], dim=-1)
    row1 = torch.stack([-c, a], dim=-1)
    return torch.stack([row0, row1], dim=-2) / det[..., None, None]
