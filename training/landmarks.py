"""Landmark tracks beside prepared clips, for the optional keypoint prior (``dagan.weights.kp_landmarks``).

DaGAN's keypoints are unsupervised: the equivariance and reconstruction losses alone place them, which
takes many GPU-days to settle. On a CPU budget of hours they barely move, and an avatar whose keypoints
do not follow the face cannot carry head pose, mouth or eyes. A cheap prior fixes that: each of the K = 15
keypoints is pulled towards one face-mesh landmark (mediapipe 478-point mesh, the project's face module)
of the same frame; which ones is the training config's ``dagan.kp_landmark_points``. The detector, its
RGB-D input, the Jacobians and every DaGAN loss stay as they are; the prior only says where "keypoint k"
should be, so the network learns motion from the first steps.

The whole mesh is stored, so the choice of points is a config setting rather than a re-annotation:
``<clip>/landmarks478.npy``: float16 N×478×2, pixel coordinates of the stored frames (mediapipe's
convention: pixel i spans [i, i+1)), NaN rows where no face was found (about 1.9 kB a frame). Written
atomically, skipped when present, so an interrupted run resumes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dagan.media import load_image

from .data import LANDMARKS_FILE, Video, _natural_key

MESH_POINTS = 478  # mediapipe face mesh with irises


def clip_folders(root: str | Path) -> list[Path]:
    """Every clip folder ROOT/<split>/<clip> (splits train and test, where present)."""
    root = Path(root)
    out = []
    for split in ("train", "test"):
        folder = root / split
        if folder.is_dir():
            out += sorted(
                (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: _natural_key(p.name),
            )
    return out


def track_landmarks(frames: Iterable[Path]) -> np.ndarray:
    """N×478×2 float16 landmark pixels of the frames (NaN where mediapipe finds no face)."""
    from dagan.face import face_landmarks

    rows = []
    for path in frames:
        marks = face_landmarks(load_image(path))
        rows.append(
            np.full((MESH_POINTS, 2), np.nan, np.float16)
            if marks is None
            else marks[:MESH_POINTS, :2].astype(np.float16)
        )
    return np.stack(rows) if rows else np.zeros((0, MESH_POINTS, 2), np.float16)


def annotate_clip(clip: Path) -> tuple[int, int] | None:
    """Write ``clip/landmarks478.npy`` unless present; returns (frames, frames without a face) or None."""
    out = clip / LANDMARKS_FILE
    if out.is_file():
        return None
    frames = Video(clip).frames or []  # the frames in the order the training dataset reads them
    marks = track_landmarks(frames)
    tmp = clip / f".{LANDMARKS_FILE}.tmp.npy"
    np.save(tmp, marks)
    os.replace(tmp, out)
    return len(frames), int(np.isnan(marks[:, 0, 0]).sum())


def annotate_dataset(root: str | Path, progress: bool = True) -> tuple[int, int, int]:
    """Landmark tracks for every clip under ROOT; returns (clips written, frames, frames without a face)."""
    from tqdm import tqdm

    clips = clip_folders(root)
    written = frames = missing = 0
    for clip in tqdm(clips, unit="clip", disable=not progress, desc="landmarks"):
        got = annotate_clip(clip)
        if got is not None:
            written += 1
            frames += got[0]
            missing += got[1]
    return written, frames, missing
