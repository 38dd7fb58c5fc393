"""Reconstruction metrics of the DaGAN paper (section 4.1) that can be computed offline.

Pixel metrics (images H×W×3, uint8 or float in [0, 1]; computed on the [0, 1] scale):

- ``l1``: mean absolute difference.
- ``psnr``: peak signal-to-noise ratio in dB; identical images give :data:`PSNR_CAP_DB` instead of +inf
  (so that averages and JSON stay finite).
- ``ssim``: structural similarity (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01,
  K2 = 0.03), the mean over the three colour channels.

Landmark metrics use mediapipe's 478-point face mesh (:func:`dagan.face.face_landmarks`) as the keypoint
detector, in place of the paper's pretrained detectors, which cannot be downloaded here:

- ``akd``: average keypoint distance, the mean distance in pixels between the mesh points of two images.
- ``head_pose``: yaw, pitch, roll in degrees from nine stable mesh points fitted to a canonical 3D face
  with ``cv2.solvePnP``; PRMSE is the RMS difference of these angles.
- ``expression_features``: mouth opening, mouth width, the two eye aspect ratios and the two eyebrow
  heights, each divided by the outer eye-corner distance. mediapipe 0.10.21 has no offline blendshape
  model (its face-landmarker blendshapes need a ``.task`` file that is not in the wheel), and OpenFace's
  action units (the paper's AUCON) are not available either, so these hand-made geometric features stand
  in for expression; :mod:`evaluation.face_id` adds face-api's 7-class expression classifier.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from dagan.head_pose import CANONICAL_FACE, head_pose

__all__ = [
    "CANONICAL_FACE",
    "EXPRESSION_FEATURES",
    "PSNR_CAP_DB",
    "akd",
    "expression_features",
    "head_pose",
    "l1",
    "psnr",
    "ssim",
]

PSNR_CAP_DB = 100.0


def _as_float(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fa, fb = _as_float(a), _as_float(b)
    if fa.shape != fb.shape:
        raise ValueError(f"images must have the same shape, got {fa.shape} and {fb.shape}")
    return fa, fb


def l1(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute difference on the [0, 1] scale."""
    a, b = _check_pair(pred, target)
    return float(np.mean(np.abs(a - b)))


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB for a peak of 1.0, capped at :data:`PSNR_CAP_DB` (identical images)."""
    a, b = _check_pair(pred, target)
    mse = float(np.mean((a - b) ** 2))
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(10.0 * math.log10(1.0 / mse))


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean SSIM over channels (Gaussian 11×11 window, σ = 1.5; statistics over the valid interior)."""
    a, b = _check_pair(pred, target)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

    values = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        if min(x.shape) < 11:
            raise ValueError(f"SSIM needs images of at least 11×11 pixels, got {x.shape[1]}×{x.shape[0]}")
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cov = blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------ landmarks


def akd(landmarks_pred: np.ndarray, landmarks_true: np.ndarray) -> float:
    """Average distance in pixels between corresponding mesh points (x, y only)."""
    p, t = np.asarray(landmarks_pred, np.float64)[:, :2], np.asarray(landmarks_true, np.float64)[:, :2]
    if p.shape != t.shape:
        raise ValueError(f"landmark sets differ in shape: {p.shape} vs {t.shape}")
    return float(np.linalg.norm(p - t, axis=1).mean())


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise a − b in degrees, wrapped into [−180, 180)."""
    return (np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0


EXPRESSION_FEATURES = (
    "mouth_open",
    "mouth_width",
    "right_eye_aspect",
    "left_eye_aspect",
    "right_brow_height",
    "left_brow_height",
)


def _dist(p: np.ndarray, i: int, j: int) -> float:
    return float(np.linalg.norm(p[i] - p[j]))


def expression_features(landmarks: np.ndarray) -> np.ndarray:
    """The six :data:`EXPRESSION_FEATURES` of a face, scale-free (divided by the outer eye-corner distance
    33–263, except the eye aspect ratios, which are divided by each eye's own width)."""
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    iod = max(_dist(p, 33, 263), 1e-6)
    right_eye = (_dist(p, 160, 144) + _dist(p, 158, 153)) / (2 * max(_dist(p, 33, 133), 1e-6))
    left_eye = (_dist(p, 385, 380) + _dist(p, 387, 373)) / (2 * max(_dist(p, 362, 263), 1e-6))
    return np.array(
        [
            _dist(p, 13, 14) / iod,  # inner lips apart
            _dist(p, 61, 291) / iod,  # mouth corners
            right_eye,
            left_eye,
            _dist(p, 105, 159) / iod,  # mid right brow to upper right lid
            _dist(p, 334, 386) / iod,  # mid left brow to upper left lid
        ]
    )
