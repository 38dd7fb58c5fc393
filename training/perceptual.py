"""The pyramid perceptual loss L_P of the DaGAN stage (paper eq. 11) and its stand-ins.

The paper's L_P compares VGG19 features of a pyramid of the generated and the real frame
(:class:`PyramidPerceptualLoss`, with VGG19 weights from a LOCAL torchvision file). ImageNet VGG19
weights cannot always be had offline, and a pixel-only substitute gives blurry faces, so
:func:`build_perceptual_loss` falls back to features of face-api's 68-point landmark network
(:class:`FaceFeaturePyramidLoss`), and only without those to the named pixel substitute
(:class:`PixelPyramidSubstituteLoss`).

Why face-api's ``face_landmark_68_model`` (MIT, in the same npm package as the evaluation's identity
net): a small CNN (four dense blocks, 32/64/128/256 channels; ported in :mod:`dagan.face_api`) trained
to locate eyes, brows, nose, mouth and jaw, its features respond to exactly the face geometry and edges
the avatar must get right, and it is a different network, trained for a different task, from the
recognition net that AED/CSIM measure with, so those figures stay independent. (The expression net is
also a different net, but its features are what the evaluation's expression agreement reads, so it is
not used either.) That loss is the pixel substitute (which keeps colours exact) plus, for each pyramid
scale and each dense block, the mean absolute feature difference. Every feature network is frozen; it
only measures.

All of it computes in float32 even under autocast, like :mod:`training.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dagan.errors import UserError
from dagan.face_api import FaceFeatureExtractor, read_tfjs_weights
from dagan.nets.blocks import AntiAliasInterpolation2d

__all__ = [
    "FaceFeaturePyramidLoss",
    "FaceLandmarkFeatures",
    "FaceLossWeightsError",
    "ImagePyramid",
    "PixelPyramidSubstituteLoss",
    "PyramidPerceptualLoss",
    "VGG19Features",
    "VGGWeightsError",
    "build_perceptual_loss",
    "find_landmark_manifest",
    "load_face_landmark_features",
    "load_vgg19",
]

# ============================================================================================= VGG19

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg19 "features" layout up to relu5_1 (index 29): channel counts of the convs, "M" = pool.
_VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
# Outputs taken after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (indices in ``features``), as FOMM.
_VGG19_TAPS = (1, 6, 11, 20, 29)


class VGG19Features(nn.Module):
    """VGG19 (Simonyan & Zisserman) up to relu5_1: B×3×H×W in [0, 1] → 5 feature maps.

    Maps: relu1_1 B×64×H×W, relu2_1 B×128×H/2×W/2, relu3_1 B×256×H/4×W/4, relu4_1 B×512×H/8×W/8,
    relu5_1 B×512×H/16×W/16. ``features`` is an ``nn.Sequential`` with torchvision's indices, so a
    torchvision ``vgg19`` state dict loads by name (``features.0.weight`` …); the classifier and the
    layers after relu5_1 are not built. The net is frozen: it only measures, it is never trained.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG19_TAPS:
                out.append(x)
        return out


class VGGWeightsError(UserError, ValueError):
    """The configured VGG19 weights file is missing or is not a torchvision-format VGG19."""


def load_vgg19(path: str | Path) -> VGG19Features:
    """VGG19 features with weights from a LOCAL torchvision-format file (``.pth`` state dict as
    torchvision saves it, e.g. vgg19-dcbb9e9d.pth, or a ``.safetensors`` with the same keys)."""
    path = Path(path)
    if not path.is_file():
        raise VGGWeightsError(f"VGG19 weights {path} do not exist (dagan.vgg19_weights in the config)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix
        raise VGGWeightsError(f"{path} could not be read as VGG19 weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = VGG19Features()
    expected = net.state_dict()
    problems = []
    for key, value in expected.items():
        if key not in state:
            problems.append(f"missing {key}")
        elif tuple(state[key].shape) != tuple(value.shape):
            problems.append(f"{key} has shape {list(state[key].shape)}, VGG19 needs {list(value.shape)}")
    if problems:
        raise VGGWeightsError(f"{path} is not a torchvision VGG19 state dict: " + "; ".join(problems[:4]))
    net.load_state_dict({k: state[k] for k in expected}, strict=True)
    return net.eval()


class ImagePyramid(nn.Module):
    """B×C×H×W → {scale: anti-aliased downscaled image} for each scale (1, 0.5, 0.25, 0.125 …)."""

    def __init__(self, scales: Sequence[float], channels: int = 3) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.downs = nn.ModuleList(AntiAliasInterpolation2d(channels, s) for s in self.scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [down(x) for down in self.downs]


class PyramidPerceptualLoss(nn.Module):
    """L_P (paper eq. 11): Σ over pyramid scales, Σ over VGG19 taps of mean |φ(G_i) − φ(R_i)|.

    prediction, target: B×3×H×W in [0, 1] → scalar. Target features carry no gradient.
    """

    name = "vgg19-pyramid"

    def __init__(self, vgg: VGG19Features, scales: Sequence[float]) -> None:
        super().__init__()
        self.vgg = vgg
        self.pyramid = ImagePyramid(scales)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = prediction.new_zeros((), dtype=torch.float32)
        for p, t in zip(self.pyramid(prediction.float()), self.pyramid(target.float()), strict=True):
            with torch.no_grad():
                t_feats = self.vgg(t)
            for pf, tf in zip(self.vgg(p), t_feats, strict=True):
                total = total + (pf.float() - tf.float()).abs().mean()
        return total


class PixelPyramidSubstituteLoss(nn.Module):
    """SUBSTITUTE for L_P when no ImageNet VGG19 weights are available ("pixel-pyramid-l1-grad").

    Σ over the same pyramid scales of mean |R − G| + mean |∂x R − ∂x G| + mean |∂y R − ∂y G|. The
    gradient terms keep some of the edge sensitivity a perceptual loss gives, but this is NOT a
    perceptual loss: it has no learned features and expect blurrier results than with VGG19. It is
    deterministic and needs no download; the trainer announces it at start and records its name in
    every checkpoint (``perceptual_loss`` metadata).
    """

    name = "pixel-pyramid-l1-grad (substitute: no VGG19 weights configured)"

    def __init__(self, scales: Sequence[float]) -> None:
        super().__init__()
        self.pyramid = ImagePyramid(scales)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = prediction.new_zeros((), dtype=torch.float32)
        for p, t in zip(self.pyramid(prediction.float()), self.pyramid(target.float()), strict=True):
            total = total + (p - t).abs().mean()
            total = total + ((p[..., :, 1:] - p[..., :, :-1]) - (t[..., :, 1:] - t[..., :, :-1])).abs().mean()
            total = total + ((p[..., 1:, :] - p[..., :-1, :]) - (t[..., 1:, :] - t[..., :-1, :])).abs().mean()
        return total


# ===================================================================== face-api landmark features

MANIFEST = "face_landmark_68_model-weights_manifest.json"


class FaceLandmarkFeatures(FaceFeatureExtractor):
    """face-api's landmark-68 feature extractor, frozen: B×3×H×W in [0, 1] → 4 maps at H/2 … H/16.

    It was trained at 112×112; it is fully convolutional, so other sizes work (the pyramid feeds it 128,
    64, 32, ...). The landmark regression head is not built.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.feature_maps(x)

    def load_tfjs(self, weights: dict) -> FaceLandmarkFeatures:
        used: set[str] = set()
        self.load_blocks(weights, used)
        left = sorted(set(weights) - used - {"fc/weights", "fc/bias"})
        if left:
            raise FaceLossWeightsError(f"landmark model has tensors this network does not use: {left[:4]}")
        return self


class FaceLossWeightsError(UserError, ValueError):
    """The configured face-landmark weights are missing or are not face-api's landmark-68 model."""


def find_landmark_manifest(path: str | Path) -> Path:
    """face-api's landmark-68 manifest: the file itself, in its folder, or in a ``dagan
    fetch-eval-assets`` folder (``model/`` inside)."""
    path = Path(path)
    for candidate in (path, path / MANIFEST, path / "model" / MANIFEST):
        if candidate.is_file():
            return candidate
    raise FaceLossWeightsError(
        f"no {MANIFEST} at {path} (dagan.face_landmark_weights): run `dagan fetch-eval-assets DIR` "
        "and point the setting at DIR"
    )


def load_face_landmark_features(path: str | Path) -> FaceLandmarkFeatures:
    """The frozen feature extractor from :func:`find_landmark_manifest`'s weights."""
    return FaceLandmarkFeatures().load_tfjs(read_tfjs_weights(find_landmark_manifest(path))).eval()


class FaceFeaturePyramidLoss(nn.Module):
    """Pixel pyramid L1 + gradient terms, plus Σ scales Σ blocks mean |φ(G_i) − φ(R_i)| of the landmark net.

    prediction, target: B×3×H×W in [0, 1] → scalar. Target features carry no gradient.
    """

    name = "face-landmark-pyramid (face-api landmark-68 features + pixel-pyramid-l1-grad)"

    def __init__(self, net: FaceLandmarkFeatures, scales: Sequence[float], feature_weight: float = 1.0):
        super().__init__()
        self.net = net
        self.pixel = PixelPyramidSubstituteLoss(scales)
        self.pyramid = ImagePyramid(scales)
        self.feature_weight = float(feature_weight)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.pixel(prediction, target)
        for p, t in zip(self.pyramid(prediction.float()), self.pyramid(target.float()), strict=True):
            if min(p.shape[-2:]) < 16:  # four stride-2 blocks: nothing left to compare below 16 px
                continue
            with torch.no_grad():
                t_feats = self.net(t)
            for pf, tf in zip(self.net(p), t_feats, strict=True):
                total = total + self.feature_weight * (pf - tf).abs().mean()
        return total


# ========================================================================================== choice


def build_perceptual_loss(
    vgg19_weights: str, scales: Sequence[float], face_landmark_weights: str = ""
) -> nn.Module:
    """VGG19 pyramid loss when a weights path is given; else face-api landmark features when those are
    given; else the named pixel substitute (the caller warns)."""
    if vgg19_weights:
        return PyramidPerceptualLoss(load_vgg19(vgg19_weights), scales)
    if face_landmark_weights:
        return FaceFeaturePyramidLoss(load_face_landmark_features(face_landmark_weights), scales)
    return PixelPyramidSubstituteLoss(scales)
