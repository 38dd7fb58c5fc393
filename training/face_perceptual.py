"""A perceptual loss that needs no ImageNet VGG: features of face-api's 68-point landmark network.

The paper's L_P compares VGG19 features of a pyramid of the generated and the real frame. ImageNet VGG19
weights cannot be had offline here, and a pixel-only substitute gives blurry faces. face-api's
``face_landmark_68_model`` (MIT, in the same npm package as the evaluation's identity net) is a small
CNN (four dense blocks, 32/64/128/256 channels) trained to locate eyes, brows, nose, mouth and jaw: its
features respond to exactly the face geometry and edges the avatar must get right, and it is a
different network, trained for a different task, from the recognition net that AED/CSIM measure with,
so those figures stay independent. (The expression net is also a different net, but its features are
what the evaluation's expression agreement reads, so it is not used either.)

The loss is the pixel substitute (:class:`training.losses.PixelPyramidSubstituteLoss`, which keeps
colours exact) plus, for each pyramid scale and each dense block, the mean absolute feature difference.
The landmark net is frozen; it only measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dagan.errors import UserError
from evaluation.face_id import FaceFeatureExtractor, read_tfjs_weights

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


def load_face_landmark_features(path: str | Path) -> FaceLandmarkFeatures:
    """From the manifest file, its folder, or a ``dagan fetch-eval-assets`` folder (``model/`` inside)."""
    path = Path(path)
    for candidate in (path, path / MANIFEST, path / "model" / MANIFEST):
        if candidate.is_file():
            return FaceLandmarkFeatures().load_tfjs(read_tfjs_weights(candidate)).eval()
    raise FaceLossWeightsError(
        f"no {MANIFEST} at {path} (dagan.face_landmark_weights): run `dagan fetch-eval-assets DIR` "
        "and point the setting at DIR"
    )


class FaceFeaturePyramidLoss(nn.Module):
    """Pixel pyramid L1 + gradient terms, plus Σ scales Σ blocks mean |φ(G_i) − φ(R_i)| of the landmark net.

    prediction, target: B×3×H×W in [0, 1] → scalar. Target features carry no gradient.
    """

    name = "face-landmark-pyramid (face-api landmark-68 features + pixel-pyramid-l1-grad)"

    def __init__(self, net: FaceLandmarkFeatures, scales: Sequence[float], feature_weight: float = 1.0):
        super().__init__()
        from .losses import ImagePyramid, PixelPyramidSubstituteLoss

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
