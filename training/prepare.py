"""``dagan prepare``: raw talking-head videos → face-cropped training clips (ROOT/<split>/<clip>/NNNNN.png).

Each raw video is read twice. Pass 1 runs the shared face tracker (:class:`dagan.face.FaceTracker`, the
same mediapipe detector and smoothing the avatar uses at run time) on every frame and marks where a
clip must end: a shot cut (the colour histogram of consecutive frames changes abruptly, or the tracked
face jumps), or a frame without a face. Pass 2 writes every long-enough clip with ONE fixed square crop —
the box holding all of the clip's tracked face boxes — so inside a clip the head moves in a still frame,
as in VoxCeleb crops that DaGAN/FOMM are trained on (a crop that followed the head would remove the
motion the model has to learn).

Resumable: a clip is written to a hidden temporary folder and renamed into place, and a marker file per
raw video (``OUT_ROOT/.prepare/``) is written after its last clip, so an interrupted run redoes at most the
video it was in. Unreadable files are skipped with a warning and counted; they are tried again next run.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dagan.checkpoint import atomic_write
from dagan.errors import UserError
from dagan.face import FaceBox, FaceTracker
from dagan.media import MediaError, VideoReader

from .data import VIDEO_EXTENSIONS

SPLITS = ("train", "test")


@dataclass
class PrepareReport:
    videos: int = 0  # raw videos found
    processed: int = 0  # processed in this run
    already_done: int = 0  # skipped because a previous run finished them
    clips: int = 0  # clips written in this run
    frames: int = 0  # frames written in this run
    broken: list[str] = field(default_factory=list)  # unreadable files (skipped)


@dataclass
class _Scan:
    boxes: list[FaceBox | None]
    cuts: list[bool]  # cuts[i]: frame i starts a new shot


def find_raw_videos(raw_dir: Path, default_split: str) -> list[tuple[str, Path]]:
    """(split, path) for every video file under ``raw_dir``; ``raw_dir/train`` and ``raw_dir/test``
    subfolders keep their split, anything else goes to ``default_split``."""
    out = []
    for path in sorted(raw_dir.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        if any(part.startswith(".") for part in path.relative_to(raw_dir).parts):
            continue
        first = path.relative_to(raw_dir).parts[0]
        out.append(
            (first if first in SPLITS and len(path.relative_to(raw_dir).parts) > 1 else default_split, path)
        )
    return out


def _histogram(frame: np.ndarray) -> np.ndarray:
    small = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(hist, hist).astype(np.float32)


def _scan(path: Path, tracker: FaceTracker, cut_threshold: float, jump: float) -> _Scan:
    """Pass 1: tracked face box per frame (None = no face) and shot-cut flags."""
    boxes: list[FaceBox | None] = []
    cuts: list[bool] = []
    prev_hist = None
    prev_box: FaceBox | None = None
    tracker.reset()
    with VideoReader(path) as reader:
        for frame in reader:
            hist = _histogram(frame)
            cut = prev_hist is not None and (
                cv2.compareHist(prev_hist, hist, cv2.HISTCMP_BHATTACHARYYA) > cut_threshold
            )
            if cut:
                tracker.reset()
            _, box = tracker.update(frame)
            box = box if tracker.face_found else None
            if box is not None and prev_box is not None and not cut:
                moved = np.hypot(box.cx - prev_box.cx, box.cy - prev_box.cy)
                if moved > jump * prev_box.size or abs(np.log(box.size / prev_box.size)) > np.log1p(jump):
                    cut = True
            boxes.append(box)
            cuts.append(bool(cut))
            prev_hist, prev_box = hist, box
    return _Scan(boxes, cuts)


def _segments(scan: _Scan, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges with a face on every frame and no cut inside, split at ``max_frames``."""
    segs = []
    start = None
    for i, box in enumerate([*scan.boxes, None]):
        breaks = box is None or (i < len(scan.cuts) and scan.cuts[i])
        if start is not None and breaks:
            segs.append((start, i))
            start = None
        if box is not None and start is None:
            start = i
    out = []
    for a, b in segs:
        for s in range(a, b, max_frames):
            if min(b, s + max_frames) - s >= min_frames:
                out.append((s, min(b, s + max_frames)))
    return out


def _clip_box(boxes: list[FaceBox]) -> FaceBox:
    """The smallest square holding every tracked box of a clip (one fixed crop for the whole clip)."""
    x0 = min(b.bbox[0] for b in boxes)
    y0 = min(b.bbox[1] for b in boxes)
    x1 = max(b.bbox[2] for b in boxes)
    y1 = max(b.bbox[3] for b in boxes)
    return FaceBox((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0))


def _frames(path: Path) -> Iterator[np.ndarray]:
    with VideoReader(path) as reader:
        yield from reader


def _marker(out_root: Path, split: str, raw_dir: Path, path: Path) -> Path:
    rel = path.relative_to(raw_dir).as_posix().replace("/", "__")
    return out_root / ".prepare" / split / f"{rel}.json"


def _clip_name(raw_dir: Path, path: Path, k: int) -> str:
    rel = path.relative_to(raw_dir).with_suffix("")
    parts = [p for p in rel.parts if p not in SPLITS] or [rel.name]
    return "__".join(parts) + f"_{k:03d}"


def prepare_dataset(
    raw_dir: str | Path,
    out_root: str | Path,
    size: int = 256,
    min_frames: int = 32,
    max_frames: int = 1024,
    split: str = "train",
    cut_threshold: float = 0.5,
    jump: float = 0.5,
    progress: bool = True,
) -> PrepareReport:
    """Crop every raw video under ``raw_dir`` into clips under ``out_root/<split>/``; see the module doc.

    ``cut_threshold``: Bhattacharyya distance between the hue/saturation histograms of consecutive
    frames above which a shot cut is declared. ``jump``: a tracked face moving by more than this fraction
    of its box (or rescaling by 1 + jump) between frames also ends the clip.
    """
    from tqdm import tqdm

    raw_dir, out_root = Path(raw_dir), Path(out_root)
    if not raw_dir.is_dir():
        raise UserError(f"{raw_dir} is not a folder of raw videos")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if min_frames < 2 or max_frames < min_frames:
        raise UserError("need 2 <= min_frames <= max_frames")
    videos = find_raw_videos(raw_dir, split)
    if not videos:
        raise UserError(f"{raw_dir} contains no videos ({'/'.join(VIDEO_EXTENSIONS)})")
    report = PrepareReport(videos=len(videos))
    bar = tqdm(videos, disable=not progress, unit="video", dynamic_ncols=True)
    with FaceTracker(out_size=size) as tracker:
        for video_split, path in bar:
            marker = _marker(out_root, video_split, raw_dir, path)
            if marker.is_file():
                report.already_done += 1
                continue
            bar.set_postfix_str(path.name[-30:])
            try:
                scan = _scan(path, tracker, cut_threshold, jump)
                segments = _segments(scan, min_frames, max_frames)
                written = _write_clips(raw_dir, path, out_root / video_split, scan, segments, size)
            except (MediaError, cv2.error, OSError) as exc:
                report.broken.append(str(path))
                tqdm.write(f"warning: skipped {path}: {exc}", file=sys.stderr)
                continue
            report.processed += 1
            report.clips += len(written)
            report.frames += sum(n for _, n in written)
            info = {"clips": [name for name, _ in written], "frames": len(scan.boxes)}
            atomic_write(marker, lambda tmp, info=info: Path(tmp).write_text(json.dumps(info)))
            bar.set_postfix(clips=report.clips, broken=len(report.broken))
    return report


def _write_clips(
    raw_dir: Path,
    path: Path,
    split_dir: Path,
    scan: _Scan,
    segments: list[tuple[int, int]],
    size: int,
) -> list[tuple[str, int]]:
    """Pass 2: write each segment with its fixed crop; returns (clip name, frames) per clip."""
    if not segments:
        return []
    split_dir.mkdir(parents=True, exist_ok=True)
    plans = [(a, b, _clip_box([bx for bx in scan.boxes[a:b] if bx is not None])) for a, b in segments]
    tmp_dirs = []
    for k in range(len(plans)):
        tmp = split_dir / f".tmp-{_clip_name(raw_dir, path, k)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tmp_dirs.append(tmp)
    seg = 0
    for i, frame in enumerate(_frames(path)):
        while seg < len(plans) and i >= plans[seg][1]:
            seg += 1
        if seg == len(plans):
            break
        a, _, box = plans[seg]
        if i >= a:
            crop = box.crop(frame, size)
            ok = cv2.imwrite(str(tmp_dirs[seg] / f"{i - a:05d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"could not write a frame into {tmp_dirs[seg]}")
    written = []
    for k, (tmp, (a, b, _)) in enumerate(zip(tmp_dirs, plans, strict=True)):
        final = split_dir / _clip_name(raw_dir, path, k)
        count = len(list(tmp.glob("*.png")))
        if count < min(2, b - a):  # the second decode ended early (truncated file): keep what is complete
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        written.append((final.name, count))
    return written
