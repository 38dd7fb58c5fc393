"""Face depth network F_d (paper §3.2, appendix A.2): a ResNet18 encoder and a multi-scale disparity decoder.

The encoder is a plain ResNet18 without the average pool and the classifier, because the paper (A.2)
says so and because ImageNet-pretrained ResNet18 weights are the usual starting point for
self-supervised depth; its submodules are named like torchvision's ``resnet18`` so such weights (or
DaGAN's published depth checkpoint) can be mapped onto it by name. The decoder follows the design of
self-supervised monocular depth work (Godard et al., ICCV 2019, the paper's [4]): reflection-padded
3×3 convs with ELU, nearest upsampling, U-Net skips, and a sigmoid disparity head at several scales
so the photometric loss can be applied at each of them during training.

Images enter :class:`FaceDepthNet` in [0, 1]; the normalisation happens there, not in the encoder,
so that the same encoder class can serve the pose network (which sees two stacked frames).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Normalisation applied to [0, 1] images before the ResNet encoders (depth and pose). These constants
# (rather than per-channel ImageNet statistics) are the ones DaGAN's depth/pose nets were trained with.
IMAGE_MEAN = 0.45
IMAGE_STD = 0.225


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """Map a B×C×H×W image in [0, 1] to roughly zero-mean, unit-variance input for the ResNet encoders."""
    return (image - IMAGE_MEAN) / IMAGE_STD


# --------------------------------------------------------------------------------------------------
# ResNet18 encoder
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs + identity): B×Cin×H×W → B×Cout×(H/stride)×(W/stride).

    ``downsample`` (1×1 conv + BN) is only created when the shortcut must change shape, since
    torchvision's checkpoints only contain it for those blocks and the names must line up.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet18 feature pyramid (no avgpool / fc): B×C×H×W → 5 maps at strides 2, 4, 8, 16, 32.

    Output ``i`` has ``num_ch_enc[i]`` channels and spatial size (H/2^(i+1))×(W/2^(i+1)); all five
    are returned because the depth decoder uses every one of them as a skip connection. H and W should
    be multiples of 32 so that the decoder's ×2 upsampling lands exactly on the skip sizes.

    Args:
        in_channels: 3 for one RGB image, 3·n when n frames are stacked (pose network).
        width: stem width; stages are ``width·[1, 1, 2, 4, 8]``. 64 is the standard ResNet18
            (11,176,512 parameters with 3 input channels); smaller values give cheap test networks.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.num_ch_enc: list[int] = [width, width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(width, width, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, stride=2)
        self.layer4 = self._make_stage(4 * width, 8 * width, stride=2)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, stride: int, blocks: int = 2) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He initialisation (fan_out) for ReLU networks and identity BN, as ResNet training from scratch
        # expects; pretrained weights loaded later simply overwrite these.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B×C×H×W (already normalised) → [B×w×H/2×W/2, B×w×H/4×W/4, B×2w×H/8×W/8,
        B×4w×H/16×W/16, B×8w×H/32×W/32]."""
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f0, f1, f2, f3, f4]


# --------------------------------------------------------------------------------------------------
# Disparity decoder
# --------------------------------------------------------------------------------------------------


class ReflectConv3x3(nn.Module):
    """3×3 conv with reflection padding: B×Cin×H×W → B×Cout×H×W.

    Reflection rather than zero padding avoids the dark border artefacts zero padding causes in dense
    depth predictions.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class ConvBlock(nn.Module):
    """Reflection-padded 3×3 conv followed by ELU: B×Cin×H×W → B×Cout×H×W.

    ELU (not ReLU) keeps gradients alive for negative pre-activations, which helps the smooth
    disparity regression.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ReflectConv3x3(in_channels, out_channels)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.conv(x))


class DepthDecoder(nn.Module):
    """U-Net style decoder turning the 5 encoder maps into sigmoid disparities at several scales.

    For each level i = 4 … 0: ``reduce[i]`` (ConvBlock to ``channels[i]``), ×2 nearest upsampling, concat
    of encoder map i−1 (if i > 0), ``fuse[i]`` (ConvBlock to ``channels[i]``), and for i in ``scales`` a
    disparity head ``disp[i]`` (reflection-padded 3×3 conv to 1 channel + sigmoid). Level i works at
    resolution (H/2^i)×(W/2^i), so scale s of the output is B×1×(H/2^s)×(W/2^s).

    Module keys are the level numbers as strings (``reduce.4``, ``fuse.0``, ``disp.0`` …) so a
    checkpoint can be mapped by level.

    Args:
        num_ch_enc: channel counts of the five encoder maps (``ResNetEncoder.num_ch_enc``).
        channels: decoder channel count at levels 0 … 4.
        scales: levels that get a disparity head; training uses all of them, inference only 0.
    """

    def __init__(
        self,
        num_ch_enc: Sequence[int],
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        scales: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        if len(num_ch_enc) != 5 or len(channels) != 5:
            raise ValueError("num_ch_enc and channels must both have 5 entries (one per level)")
        if any(s < 0 or s > 4 for s in scales):
            raise ValueError(f"scales must be in 0..4, got {list(scales)}")
        self.num_ch_enc = list(num_ch_enc)
        self.channels = list(channels)
        self.scales = sorted(set(scales))

        self.reduce = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        for i in range(4, -1, -1):
            in_ch = self.num_ch_enc[4] if i == 4 else self.channels[i + 1]
            self.reduce[str(i)] = ConvBlock(in_ch, self.channels[i])
            fuse_in = self.channels[i] + (self.num_ch_enc[i - 1] if i > 0 else 0)
            self.fuse[str(i)] = ConvBlock(fuse_in, self.channels[i])
        self.disp = nn.ModuleDict({str(s): ReflectConv3x3(self.channels[s], 1) for s in self.scales})

    def forward(self, features: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """features: the 5 encoder maps (map i is B×C_i×H/2^(i+1)×W/2^(i+1)).

        Returns {s: B×1×(H/2^s)×(W/2^s)} for every s in ``scales``, values in (0, 1).
        """
        out: dict[int, torch.Tensor] = {}
        x = features[4]
        for i in range(4, -1, -1):
            x = self.reduce[str(i)](x)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], dim=1)
            x = self.fuse[str(i)](x)
            if i in self.scales:
                out[i] = torch.sigmoid(self.disp[str(i)](x))
        return out


# --------------------------------------------------------------------------------------------------
# Full face depth network
# --------------------------------------------------------------------------------------------------


def disp_to_depth(
    disp: torch.Tensor, min_depth: float, max_depth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn sigmoid disparity (any shape, in [0, 1]) into (scaled_disp, depth) of the same shape.

    The sigmoid output is interpreted as a linear interpolation in *inverse* depth between 1/max_depth
    and 1/min_depth, so that depth = 1/scaled_disp is bounded to [min_depth, max_depth] and never
    divides by zero; this bounded depth is what the self-supervised geometric warping needs.
    """
    min_disp = 1.0 / max_depth
    max_disp = 1.0 / min_depth
    scaled_disp = min_disp + (max_disp - min_disp) * disp
    depth = 1.0 / scaled_disp
    return scaled_disp, depth


class FaceDepthNet(nn.Module):
    """Face depth network F_d: RGB image in [0, 1] → disparity map D in (0, 1).

    ``forward`` returns only the full-resolution disparity B×1×H×W, because that sigmoid map is what
    the keypoint detector and the cross-modal attention consume as "the depth map D" (as reference
    DaGAN does). Training needs all scales (:meth:`forward_multiscale`) and metric-like depth for the
    warping (:func:`disp_to_depth` with ``min_depth``/``max_depth``).

    H and W must be multiples of 32 (the encoder's total stride) after ``input_scale``: with
    ``input_scale`` < 1 the image is area-downsampled by that factor before the encoder and the
    full-resolution disparity is the scale-0 output upsampled (bilinear) back to H×W, so consumers see
    the same shapes at a quarter (½) or a sixteenth (¼) of the cost; the scales of
    :meth:`forward_multiscale` are then relative to the downsampled image.
    """

    def __init__(
        self,
        width: int = 64,
        decoder_channels: Sequence[int] = (16, 32, 64, 128, 256),
        scales: Sequence[int] = (0, 1, 2, 3),
        min_depth: float = 0.1,
        max_depth: float = 100.0,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if input_scale not in (1.0, 0.5, 0.25):
            raise ValueError(f"input_scale must be 1, 0.5 or 0.25, got {input_scale}")
        if 0 not in scales:
            raise ValueError("scales must include 0: forward() returns the full-resolution disparity")
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.input_scale = float(input_scale)
        self.encoder = ResNetEncoder(in_channels=3, width=width)
        self.decoder = DepthDecoder(self.encoder.num_ch_enc, decoder_channels, scales)

    disp_to_depth = staticmethod(disp_to_depth)

    def forward_multiscale(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """image: B×3×H×W in [0, 1] → {s: B×1×(h/2^s)×(w/2^s) disparity in (0, 1)} for each scale,
        where h×w = H×W × ``input_scale``."""
        h, w = image.shape[-2:]
        if self.input_scale != 1.0:
            factor = round(1 / self.input_scale)
            if h % factor or w % factor:
                raise ValueError(f"input_scale {self.input_scale:g} needs H and W divisible by {factor}")
            image = F.avg_pool2d(image, factor)  # area downsampling: exact for 2× and 4×
            h, w = h // factor, w // factor
        if h % 32 or w % 32:
            raise ValueError(
                f"FaceDepthNet needs H, W divisible by 32 after input_scale {self.input_scale:g}, got {h}×{w}"
            )
        return self.decoder(self.encoder(normalize_image(image)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B×3×H×W in [0, 1] → disparity D: B×1×H×W in (0, 1)."""
        disp = self.forward_multiscale(image)[0]
        if disp.shape[-2:] != image.shape[-2:]:
            disp = F.interpolate(disp, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return disp

    def depth(self, disp: torch.Tensor) -> torch.Tensor:
        """Depth in [min_depth, max_depth] (same shape as ``disp``) using this net's depth range."""
        return disp_to_depth(disp, self.min_depth, self.max_depth)[1]
