"""Sample inputs that exist offline: real face photos shipped inside installed packages, and a driving
video made from a photo by smooth synthetic head motion (for the demo and end-to-end tests)."""

from __future__ import annotations

import math

import cv2
import numpy as np


def grace_hopper() -> np.ndarray:
    """Matplotlib's sample portrait (matplotlib is a mediapipe dependency, so it is always installed)."""
    import matplotlib.cbook as cbook

    from .media import load_image

    return load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def astronaut() -> np.ndarray:
    """scikit-image's astronaut portrait (512×512); falls back to Grace Hopper without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return grace_hopper()
    return np.ascontiguousarray(data.astronaut())


def head_motion(num_frames: int, amplitude: float = 1.0) -> list[tuple[float, float, float, float]]:
    """Smooth (angle°, dx, dy, scale) per frame: a nod, a shake and a slow zoom with different periods, so
    consecutive frames differ and no two motions are in phase."""
    out = []
    for i in range(num_frames):
        t = 2 * math.pi * i / max(num_frames, 1)
        out.append(
            (
                12.0 * amplitude * math.sin(t),
                0.06 * amplitude * math.sin(2 * t + 0.5),
                0.04 * amplitude * math.sin(3 * t),
                1.0 + 0.08 * amplitude * math.sin(t + 1.0),
            )
        )
    return out


def driving_frames(
    image: np.ndarray, num_frames: int = 32, size: int = 256, amplitude: float = 1.0
) -> list[np.ndarray]:
    """Frames of ``image`` (H×W×3 uint8) moved in-plane by :func:`head_motion`, each size×size×3.

    Whole-image motion is only a stand-in for a talking head (no mouth or eye movement), but it is a
    real moving face that the face tracker and the keypoints have to follow.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    base = cv2.resize(
        image[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2], (size, size)
    )
    frames = []
    for angle, dx, dy, scale in head_motion(num_frames, amplitude):
        m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        m[:, 2] += (dx * size, dy * size)
        frames.append(cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT101))
    return frames
