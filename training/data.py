"""Training data: the FOMM/VoxCeleb layout, frame samplers for both stages, augmentation, resumable order.

Layout: ``ROOT/train/<video>`` and ``ROOT/test/<video>``, where each video is a folder of png/jpg frames or a
video file (``.mp4``; ``.avi``/``.mov``/``.mkv`` are read too). Frames are resized to the model's image size.

Reproducibility is built into the sampling rather than bolted on: a sample is a pure function of
``(seed, epoch, index)`` — the sampler yields ``(epoch, index)`` pairs and every random choice inside the
dataset (frames, flip, colour jitter) is drawn from a generator seeded with them. DataLoader workers
therefore need no RNG state, and resuming at step s only has to skip the first ``s mod steps_per_epoch``
batches of the epoch's permutation (:class:`ResumableSampler`) to continue exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dagan.errors import UserError
from dagan.media import MediaError, VideoReader, load_image

from .config import AugmentConfig

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Per-clip face-mesh tracks for the keypoint prior (training.landmarks).
LANDMARKS_FILE = "landmarks478.npy"
# The compact form `dagan pack-data` writes (training.pack): a compressed .npz whose ``mesh`` array has the
# same N×478×2 layout (only the packed ``points`` filled, the rest NaN). Read when the .npy is absent.
LANDMARKS_PACKED = "landmarks478.npz"


class DatasetError(UserError, ValueError):
    """A dataset root that does not have the expected layout or has too few usable videos."""


def _natural_key(name: str) -> list:
    import re

    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


class Video:
    """One training video: a folder of frames (random access) or a video file (decoded sequentially).

    ``num_frames`` is exact for folders; for files it is counted once by decoding the file when the
    dataset is indexed, because container frame counts can be off by a few frames.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.stem if path.is_file() else path.name
        if path.is_dir():
            self.frames: list[Path] | None = sorted(
                (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                key=lambda p: _natural_key(p.name),
            )
            self.num_frames = len(self.frames)
        else:
            self.frames = None
            with VideoReader(path) as reader:
                self.num_frames = sum(1 for _ in reader)

    def landmarks(self, points: Sequence[int]) -> np.ndarray | None:
        """N×K×2 tracks of the face-mesh ``points`` (K of them) in the keypoints' [−1, 1] frame (pixel
        centres at ±1, as :func:`dagan.nets.blocks.make_coordinate_grid`), from ``<clip>/landmarks478.npy``
        or, when absent, the packed ``landmarks478.npz`` (pixels of the stored frames, mediapipe's
        convention that pixel i spans [i, i+1); NaN = no face), or None when the clip has no tracks."""
        if not hasattr(self, "_mesh"):
            self._mesh = None
            self._mesh_points: np.ndarray | None = None
            path = self.path / LANDMARKS_FILE
            if not path.is_file():
                path = self.path / LANDMARKS_PACKED
            self._mesh_path = path
            if self.frames and path.is_file():
                mesh, self._mesh_points = read_mesh(path)
                if mesh.ndim != 3 or mesh.shape[0] != self.num_frames or mesh.shape[2] != 2:
                    raise DatasetError(
                        f"{path} has shape {mesh.shape}; expected {self.num_frames}×points×2 "
                        "(re-run `dagan landmarks`)"
                    )
                h, w = load_image(self.frames[0]).shape[:2]
                mesh[..., 0] = 2.0 * (mesh[..., 0] - 0.5) / (w - 1) - 1.0
                mesh[..., 1] = 2.0 * (mesh[..., 1] - 0.5) / (h - 1) - 1.0
                self._mesh = mesh
        if self._mesh is None:
            return None
        if max(points, default=0) >= self._mesh.shape[1]:
            raise DatasetError(f"{self._mesh_path} has no mesh point {max(points)}")
        if self._mesh_points is not None:
            # A packed file keeps only some points (NaN elsewhere): asking for another would silently
            # switch the prior off for this clip.
            missing = sorted(set(points) - set(self._mesh_points.tolist()))
            if missing:
                raise DatasetError(
                    f"{self._mesh_path} was packed without mesh points {missing[:5]}: re-run "
                    "`dagan pack-data` with --points covering dagan.kp_landmark_points and dagan.flow_points"
                )
        return self._mesh[:, list(points)]

    def read(self, indices: Sequence[int], size: int) -> list[np.ndarray]:
        """Frames at ``indices`` as size×size×3 uint8 RGB (in the order asked)."""
        if self.frames is not None:
            return [_resize(load_image(self.frames[i]), size) for i in indices]
        wanted = set(indices)
        got: dict[int, np.ndarray] = {}
        with VideoReader(self.path) as reader:
            for i, frame in enumerate(reader):
                if i in wanted:
                    got[i] = _resize(frame, size)
                    if len(got) == len(wanted):
                        break
        missing = wanted - got.keys()
        if missing:
            raise MediaError(f"{self.path}: frames {sorted(missing)} could not be decoded")
        return [got[i] for i in indices]


def read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A clip's face-mesh track file as float32 N×478×2 pixels, and the mesh points it holds (None = all).

    ``.npy``: the array as `dagan landmarks` wrote it. ``.npz`` (`dagan pack-data`): array ``mesh``, plus
    ``points`` naming the points kept (the others are NaN so the file compresses to almost nothing).
    """
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "mesh" not in z.files:
                raise DatasetError(f"{path} has no 'mesh' array (re-run `dagan pack-data`)")
            points = np.asarray(z["points"], dtype=np.int64) if "points" in z.files else None
            return z["mesh"].astype(np.float32), points
    return np.load(path).astype(np.float32), None


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    interp = cv2.INTER_AREA if frame.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(frame, (size, size), interpolation=interp)


def find_videos(root: str | Path, split: str, min_frames: int = 2) -> list[Video]:
    """Every video under ``root/split`` with at least ``min_frames`` frames, sorted by name.

    Unreadable or too-short videos are skipped with one warning that counts them; no usable video at all
    is a :class:`DatasetError`.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist: expected ROOT/{split}/<video> (see docs/training.md)")
    videos, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if not (entry.is_dir() or entry.suffix.lower() in VIDEO_EXTENSIONS):
            continue
        try:
            video = Video(entry)
        except (MediaError, OSError) as exc:
            skipped.append(f"{entry.name} ({exc})")
            continue
        if video.num_frames < min_frames:
            skipped.append(f"{entry.name} ({video.num_frames} frames < {min_frames})")
            continue
        videos.append(video)
    if skipped:
        warnings.warn(
            f"{folder}: skipped {len(skipped)} unusable videos: " + "; ".join(skipped[:5]), stacklevel=2
        )
    if not videos:
        raise DatasetError(f"{folder} has no usable videos (each needs >= {min_frames} frames)")
    return videos


# ------------------------------------------------------------------------------------------- augment


def augment_frames(
    frames: list[np.ndarray], cfg: AugmentConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """FOMM-style augmentation with ONE set of random parameters for all ``frames`` of a sample.

    uint8 H×W×3 in, float32 H×W×3 in [0, 1] out. Flip (p = 0.5), then brightness, contrast, saturation
    and hue jitter in a random order, as torchvision's ColorJitter does. Using the same parameters for
    source and driving keeps the motion the only difference between them.
    """
    out = [f.astype(np.float32) / 255.0 for f in frames]
    if cfg.flip and rng.random() < 0.5:
        out = [np.ascontiguousarray(f[:, ::-1]) for f in out]
    ops = []
    if cfg.brightness > 0:
        b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        ops.append(lambda f, b=b: f * b)
    if cfg.contrast > 0:
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        ops.append(lambda f, c=c: (f - _gray(f).mean()) * c + _gray(f).mean())
    if cfg.saturation > 0:
        s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        ops.append(lambda f, s=s: (f - _gray(f)[..., None]) * s + _gray(f)[..., None])
    if cfg.hue > 0:
        h = rng.uniform(-cfg.hue, cfg.hue)
        ops.append(lambda f, h=h: _shift_hue(f, h))
    for k in rng.permutation(len(ops)):
        out = [np.clip(ops[k](f), 0.0, 1.0).astype(np.float32) for f in out]
    return out


def _gray(f: np.ndarray) -> np.ndarray:
    return f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114


def _shift_hue(f: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(f, dtype=np.float32), cv2.COLOR_RGB2HSV)  # H in [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * shift, 360.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def to_tensor(frame: np.ndarray) -> torch.Tensor:
    """H×W×3 float32 in [0, 1] → 3×H×W tensor."""
    return torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------ datasets


class _VideoDataset(Dataset):
    """Base: ``len = num_videos × repeats``; item ``(epoch, i)`` is drawn from video ``i mod num_videos``."""

    min_frames = 2

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int,
        repeats: int = 1,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.videos = find_videos(root, split, self.min_frames)
        self.image_size = int(image_size)
        self.repeats = int(repeats)
        self.augment = augment
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.videos) * self.repeats

    def _rng(self, key: tuple[int, int] | int) -> tuple[np.random.Generator, Video]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        return rng, self.videos[int(index) % len(self.videos)]

    def _finish(self, frames: list[np.ndarray], rng: np.random.Generator) -> list[torch.Tensor]:
        if self.augment is not None:
            floats = augment_frames(frames, self.augment, rng)
        else:
            floats = [f.astype(np.float32) / 255.0 for f in frames]
        return [to_tensor(f) for f in floats]


class ConsecutiveFramesDataset(_VideoDataset):
    """Depth stage: a target frame I_i and its neighbours I_{i+o} for each offset o (paper §3.2).

    With ``offsets=(1,)`` an item is exactly the paper's consecutive pair (I_i, I_{i+1}). Returns
    ``{"target": 3×H×W, "sources": S×3×H×W}`` in [0, 1], S = len(offsets).
    """

    def __init__(self, *args, offsets: Sequence[int] = (1,), **kwargs) -> None:
        self.offsets = tuple(int(o) for o in offsets)
        self.min_frames = 1 + max(self.offsets) - min(0, *self.offsets)
        super().__init__(*args, **kwargs)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        rng, video = self._rng(key)
        lo, hi = -min(0, *self.offsets), video.num_frames - 1 - max(0, *self.offsets)
        i = int(rng.integers(lo, hi + 1))
        frames = self._finish(video.read([i, *(i + o for o in self.offsets)], self.image_size), rng)
        return {"target": frames[0], "sources": torch.stack(frames[1:])}


class SourceDrivingDataset(_VideoDataset):
    """DaGAN stage: two different random frames of one video, ``{"source", "driving"}`` 3×H×W in [0, 1]
    (self-reenactment: same identity, the generator must reproduce the driving frame).

    With ``landmark_points`` (face-mesh indices, the keypoint prior's targets) every item also carries
    ``source_landmarks`` / ``driving_landmarks`` K×2 in [−1, 1]: NaN where the clip has no tracks or the
    frame had no face, so clips with and without tracks can share a batch (the losses skip NaN points).

    ``expressive_pairs`` p: with probability p the driving frame is, of ``candidates`` random frames, the
    one whose expression differs most from the source's — the change of the pairwise distances between
    the ``focus`` landmarks (eyelids, lips). Blinks and wide mouths are a few percent of talking-head
    frames, so uniform pairs rarely ask the generator to close an eye; these pairs do, at no cost to the
    self-reenactment objective (both frames are still the same video).
    """

    def __init__(
        self,
        *args,
        landmark_points: Sequence[int] = (),
        expressive_pairs: float = 0.0,
        focus: Sequence[int] = (),
        candidates: int = 8,
        **kwargs,
    ) -> None:
        self.landmark_points = tuple(int(p) for p in landmark_points)
        self.expressive_pairs = float(expressive_pairs)
        self.focus = tuple(int(i) for i in focus)
        self.candidates = int(candidates)
        super().__init__(*args, **kwargs)

    def _driving_index(self, rng: np.random.Generator, n: int, a: int, marks: np.ndarray | None) -> int:
        b = int(rng.choice(n - 1))
        b += b >= a  # uniform over the other frames
        if marks is None or len(self.focus) < 2 or rng.random() >= self.expressive_pairs:
            return b
        others = np.delete(np.arange(n), a)
        cands = rng.choice(others, size=min(self.candidates, n - 1), replace=False)
        f = marks[np.concatenate(([a], cands))][:, list(self.focus)]  # (1+C)×F×2: the source, candidates
        dist = np.linalg.norm(f[:, :, None] - f[:, None, :], axis=-1)  # (1+C)×F×F
        change = np.abs(dist[1:] - dist[0]).sum(axis=(1, 2))
        change = np.nan_to_num(change, nan=-1.0)  # frames without a face are never preferred
        return int(cands[int(np.argmax(change))]) if change.max() >= 0 else b

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        rng, video = self._rng(key)
        marks = video.landmarks(self.landmark_points) if self.landmark_points else None
        a = int(rng.integers(video.num_frames))
        b = self._driving_index(rng, video.num_frames, a, marks)
        source, driving = self._finish(video.read([a, b], self.image_size), rng)
        item = {"source": source, "driving": driving}
        if self.landmark_points:
            none = np.full((len(self.landmark_points), 2), np.nan, np.float32)
            for key, i in (("source_landmarks", a), ("driving_landmarks", b)):
                item[key] = torch.from_numpy(none if marks is None else np.ascontiguousarray(marks[i]))
        return item


# ------------------------------------------------------------------------------------------- sampler


class ResumableSampler(Sampler):
    """Epoch-seeded shuffling split across ranks, that can start in the middle of an epoch.

    Yields ``(epoch, index)`` keys. Epoch e's order is a permutation drawn from ``(seed, e)`` — identical
    on every rank — padded to a multiple of ``world_size × batch_size`` and strided by rank (as
    ``DistributedSampler`` does), so each rank gets ``steps_per_epoch × batch_size`` keys per epoch. A
    sampler built with ``start_step`` yields the keys of steps ``start_step, start_step + 1, …`` forever
    (epochs roll over); the training loop decides when to stop.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if dataset_len < 1:
            raise DatasetError("the dataset is empty")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = max(1, math.ceil(dataset_len / (world_size * batch_size)))

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.dataset_len, generator=g).tolist()
        total = self.steps_per_epoch * self.world_size * self.batch_size
        order = (order * math.ceil(total / len(order)))[:total]
        return [(epoch, i) for i in order[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        skip = offset * self.batch_size
        while True:
            yield from self.epoch_keys(epoch)[skip:]
            skip = 0
            epoch += 1

    def __len__(self) -> int:  # one epoch's worth; iteration itself is endless
        return self.steps_per_epoch * self.batch_size
