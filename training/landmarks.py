"""Landmark tracks beside prepared clips, for the optional keypoint prior (``dagan.weights.kp_landmarks``).

DaGAN's keypoints are unsupervised: the equivariance and reconstruction losses alone place them, which
takes many GPU-days to settle. On a CPU budget of hours they barely move, and an avatar whose keypoints
do not follow the face cannot carry head pose, mouth or eyes. A cheap prior fixes that: each of the K = 15
keypoints is pulled towards one face-mesh landmark (mediapipe 478-point mesh, the project's face module)
of the same frame — eye corners, nose tip, mouth corners and lips, chin, jaw, brows, forehead. The
detector, its RGB-D input, the Jacobians and every DaGAN loss stay as they are; the prior only says
where "keypoint k" should be, so the network learns motion from the first steps.

``<clip>/landmarks15.npy``: float32 N×15×2, pixel coordinates of the stored frames (mediapipe's
convention: pixel i spans [i, i+1)), NaN rows where no face was found. Written atomically, skipped when
present, so an interrupted run resumes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dagan.media import load_image

from .data import LANDMARKS_FILE, Video, _natural_key

# mediapipe face-mesh indices: outer/inner eye corners (both eyes), nose tip, mouth corners, upper and
# lower lip, chin, left/right jaw, left/right brow, forehead. Spread over the face so every region moves.
LANDMARK_INDICES = (33, 133, 362, 263, 1, 61, 291, 13, 14, 152, 234, 454, 105, 334, 10)


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
    """N×15×2 landmark pixels of the frames (NaN where mediapipe finds no face)."""
    from dagan.face import face_landmarks

    rows = []
    for path in frames:
        marks = face_landmarks(load_image(path))
        rows.append(
            np.full((len(LANDMARK_INDICES), 2), np.nan, np.float32)
            if marks is None
            else marks[list(LANDMARK_INDICES), :2].astype(np.float32)
        )
    return np.stack(rows) if rows else np.zeros((0, len(LANDMARK_INDICES), 2), np.float32)


def annotate_clip(clip: Path) -> tuple[int, int] | None:
    """Write ``clip/landmarks15.npy`` unless present; returns (frames, frames without a face) or None."""
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
