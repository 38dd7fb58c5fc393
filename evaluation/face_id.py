"""Face identity (128-D embeddings) and facial expression of aligned face crops, for the evaluation's
identity metrics (AED, CSIM) and expression agreement.

The networks and their tfjs weights are face-api's, ported in :mod:`dagan.face_api`; this module crops
each face the way face-api does (from mediapipe landmarks) and runs the networks on batches of crops
(:class:`FaceAnalyzer`). ``dagan fetch-eval-assets`` (see :mod:`evaluation.assets`) puts the weight files
in a local folder at data-preparation time; nothing is fetched while evaluating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from dagan.face_api import (
    EXPRESSION_SIZE,
    RECOGNITION_SIZE,
    ExpressionNet,
    FaceRecognitionNet,
    TfjsWeightsError,
    read_tfjs_weights,
)

__all__ = [
    "EXPRESSION_SIZE",
    "RECOGNITION_SIZE",
    "SAME_PERSON_THRESHOLD",
    "FaceAnalyzer",
    "align_box",
    "crop_aligned",
    "open_analyzer",
]

# Euclidean distance under which face-api (and dlib) call two descriptors the same person.
SAME_PERSON_THRESHOLD = 0.6

# --------------------------------------------------------------------------------------- face crops

# mediapipe face-mesh indices that trace what dlib's 68-point model marks on the face outline (jaw from
# ear to ear through the chin) and the eyebrows: their bounding box is the box face-api computes from its
# 68 landmarks before cropping for the recognition and expression networks.
_JAW = (
    127,
    234,
    93,
    132,
    58,
    172,
    136,
    150,
    149,
    176,
    148,
    152,
    377,
    400,
    378,
    379,
    365,
    397,
    288,
    361,
    323,
    454,
    356,
)
_BROWS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
ALIGN_INDICES = _JAW + _BROWS
# face-api's FaceLandmarks.align() default: pad the landmarks' bounding box by 20% of its size in total.
ALIGN_PADDING = 0.2


def align_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the face crop for mediapipe landmarks (N×2+ pixels; N ≥ 468): the bounding box of the
    68-point-like outline, padded by 10% of its width/height on every side (face-api's alignment)."""
    pts = np.asarray(landmarks, dtype=np.float64)[list(ALIGN_INDICES), :2]
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    w, h = x1 - x0, y1 - y0
    return (
        x0 - ALIGN_PADDING * w / 2,
        y0 - ALIGN_PADDING * h / 2,
        w * (1 + ALIGN_PADDING),
        h * (1 + ALIGN_PADDING),
    )


def crop_aligned(image: np.ndarray, landmarks: np.ndarray, size: int = RECOGNITION_SIZE) -> np.ndarray:
    """The size×size×3 uint8 network input for the face with these landmarks, made the way face-api makes
    it: the aligned box clipped to the image, zero-padded to a square (centred), resized."""
    x, y, w, h = align_box(landmarks)
    img_h, img_w = image.shape[:2]
    x0, y0 = max(math.floor(x), 0), max(math.floor(y), 0)
    x1, y1 = min(math.ceil(x + w), img_w), min(math.ceil(y + h), img_h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError(f"face box {(x, y, w, h)} lies outside the {img_w}×{img_h} image")
    face = image[y0:y1, x0:x1]
    fh, fw = face.shape[:2]
    side = max(fh, fw)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - fh) // 2, (side - fw) // 2
    square[top : top + fh, left : left + fw] = face
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


def _to_batch(crops: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    batch = []
    for crop in crops:
        if crop.shape[:2] != (size, size):
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        batch.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
    return torch.stack(batch).to(device=device, dtype=torch.float32) / 255.0


class FaceAnalyzer:
    """face-api's recognition (and, when its files are there, expression) network on mediapipe-aligned crops.

    ``model_dir`` is a folder made by ``dagan fetch-eval-assets`` or its ``model/`` sub-folder.
    ``embed`` / ``expressions`` take images of a face plus its mediapipe landmarks (or ready crops) and
    return N×128 descriptors / N×7 probabilities as numpy arrays.
    """

    def __init__(
        self, model_dir: str | Path, device: str | torch.device = "cpu", expressions: bool = True
    ) -> None:
        model_dir = Path(model_dir)
        if (model_dir / "model").is_dir():  # the folder made by `dagan fetch-eval-assets`
            model_dir = model_dir / "model"
        self.device = torch.device(device)
        self.recognition = FaceRecognitionNet().load_tfjs(
            read_tfjs_weights(model_dir / "face_recognition_model-weights_manifest.json")
        )
        self.recognition.to(self.device).eval()
        self.expression: ExpressionNet | None = None
        manifest = model_dir / "face_expression_model-weights_manifest.json"
        if expressions and manifest.is_file():
            self.expression = ExpressionNet().load_tfjs(read_tfjs_weights(manifest)).to(self.device).eval()

    @torch.no_grad()
    def embed_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """N×128 descriptors of N aligned uint8 crops (150×150×3; other sizes are resized)."""
        if not crops:
            return np.zeros((0, 128), dtype=np.float32)
        return self.recognition(_to_batch(crops, RECOGNITION_SIZE, self.device)).cpu().numpy()

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """128-D descriptor of the face with these mediapipe landmarks in an RGB uint8 image."""
        return self.embed_crops([crop_aligned(image, landmarks, RECOGNITION_SIZE)])[0]

    @torch.no_grad()
    def expressions_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """N×7 expression probabilities of N aligned crops; needs the expression model files."""
        if self.expression is None:
            raise TfjsWeightsError("the face expression model files are not in the eval assets folder")
        if not crops:
            return np.zeros((0, 7), dtype=np.float32)
        return self.expression(_to_batch(crops, EXPRESSION_SIZE, self.device)).cpu().numpy()

    def expressions(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """7 expression probabilities of the face with these mediapipe landmarks."""
        return self.expressions_crops([crop_aligned(image, landmarks, EXPRESSION_SIZE)])[0]


def open_analyzer(
    use_identity: bool, assets: str | Path | None, device: str | torch.device
) -> tuple[FaceAnalyzer | None, Path | None, str | None]:
    """The analyzer the identity metrics run on, its assets folder, and — when there is none — why, as
    the end of a report note: switched off, or no face-api assets found. A folder given explicitly that
    lacks the models is an error (:func:`evaluation.assets.find_eval_assets`), never a silent skip."""
    from dagan.helpers import resolve_device

    from .assets import find_eval_assets

    if not use_identity:
        return None, None, "identity metrics were switched off"
    folder = find_eval_assets(assets, required=assets is not None)
    if folder is None:
        return None, None, "face-api assets not found (run dagan fetch-eval-assets)"
    return FaceAnalyzer(folder, device=resolve_device(device)), folder, None
