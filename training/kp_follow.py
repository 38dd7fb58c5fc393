"""Do the keypoints follow the face? Keypoints against the face-mesh points the prior anchors them to.

An avatar that does not open its mouth can fail at two places: the keypoint detector does not see the
mouth open (its lip keypoints stay put), or it does and the generator does not render it. `dagan
eval-cross --self` scores the end result; this scores the first half on its own. For the keypoints the
landmark prior anchors to a face-mesh point (``dagan.kp_landmark_points`` of the training config), on
prepared clips with their stored mesh tracks (``dagan landmarks``):

- **gaps**: the vertical distance between the upper and lower inner lip keypoints (mouth opening) and
  between each eye's upper and lower lid keypoints (blinks), against the same distance of their mesh
  points, per clip: Pearson r and least-squares gain (slope of keypoint gap on mesh gap, 1 = the keypoint
  opens exactly as far as the mesh point does);
- **motion**: every anchored keypoint's displacement since the clip's first frame against its mesh
  point's, x and y pooled, per clip: r and gain (what relative motion transfers; head turns move these).

Both in the keypoints' [−1, 1] frame, so a gain is scale-free. The gap sizes are reported too: at 128 px
a mouth opens by 2–3 px, less than one cell of a 32×32 keypoint heatmap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from dagan.errors import UserError
from dagan.media import load_image

from .data import Video
from .landmarks import clip_folders

# Gaps scored, as (name, upper mesh point, lower mesh point): inner lips, then each eye's lids.
GAPS: tuple[tuple[str, int, int], ...] = (("mouth", 13, 14), ("left eye", 159, 145), ("right eye", 386, 374))
MEASURES: tuple[str, ...] = (*(g[0] for g in GAPS), "motion")  # the report's columns, in order
MIN_GAP_STD = 0.005  # in [−1, 1] units (0.3 px at 128): a clip whose mesh gap barely moves is not scored

KeypointFn = Callable[[np.ndarray], np.ndarray]  # N×H×W×3 uint8 frames → N×K×2 keypoints in [−1, 1]


def fit(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(Pearson r, least-squares slope with intercept) of ``pred`` on ``ref`` (1-D, finite).

    The same measure as ``evaluation.motion.gain_and_correlation``, which this application may not import
    (tests/test_layers.py: applications import only the library); NaN here where that one says None."""
    p, r = pred - pred.mean(), ref - ref.mean()
    denom = float((r * r).sum())
    if denom <= 0 or float((p * p).sum()) <= 0:
        return float("nan"), 0.0 if denom > 0 else float("nan")
    return float((p * r).sum() / np.sqrt((p * p).sum() * denom)), float((p * r).sum() / denom)


def score_clip(kp: np.ndarray, marks: np.ndarray, points: Sequence[int]) -> dict[str, dict[str, float]]:
    """Gaps and motion of one clip. ``kp`` N×K×2 keypoints, ``marks`` N×K×2 their anchors' mesh tracks
    (NaN where no face), both in [−1, 1]; ``points`` the mesh index of each keypoint."""
    ok = np.isfinite(marks).all(axis=(1, 2))
    out: dict[str, dict[str, float]] = {}
    if ok.sum() < 3:
        return out
    kp, marks = kp[ok], marks[ok]
    for name, upper, lower in GAPS:
        if upper not in points or lower not in points:
            continue
        i, j = points.index(upper), points.index(lower)
        mesh_gap = marks[:, j, 1] - marks[:, i, 1]
        if mesh_gap.std() < MIN_GAP_STD:
            continue
        kp_gap = kp[:, j, 1] - kp[:, i, 1]
        r, gain = fit(kp_gap, mesh_gap)
        out[name] = {
            "r": r,
            "gain": gain,
            "mesh_gap_std": float(mesh_gap.std()),
            "kp_gap": float(kp_gap.mean()),
        }
    move_kp = (kp - kp[:1]).reshape(-1)
    move_mesh = (marks - marks[:1]).reshape(-1)
    r, gain = fit(move_kp, move_mesh)
    out["motion"] = {"r": r, "gain": gain, "mesh_std": float(move_mesh.std())}
    return out


def model_keypoints(checkpoint: str | Path, batch_size: int = 16) -> tuple[KeypointFn, int]:
    """A :data:`KeypointFn` running a checkpoint's depth net and keypoint detector (torch, CPU), and the
    model's image size."""
    import torch

    from dagan.checkpoint import load_model

    model = load_model(checkpoint)
    size = model.config.image_size

    def run(frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                kp, _ = model.driving_keypoints(x[i : i + batch_size])
                out.append(kp.value.numpy())
        return np.concatenate(out)

    return run, size


def keypoint_follow(
    keypoints: KeypointFn,
    root: str | Path,
    points: Sequence[int],
    image_size: int,
    frame_stride: int = 2,
    max_frames: int | None = 120,
) -> dict:
    """Score every clip under ``root`` (a prepared dataset, or one split of it) that has mesh tracks.

    Returns ``{"clips": {name: score_clip(...)}, "median": {measure: {"r", "gain"}}, "frames": n}``.
    Frames whose size is not ``image_size`` are an error (the tracks are in the stored frames' pixels)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    if frame_stride < 1 or (max_frames is not None and max_frames < 3):
        raise UserError("--frame-stride must be >= 1 and --max-frames >= 3")
    # a dataset root (ROOT/train|test/<clip>) or one split of it (ROOT/test/<clip>)
    folders = clip_folders(root) or sorted(p for p in root.iterdir() if p.is_dir())
    points = list(points)
    clips: dict[str, dict] = {}
    frames_used = 0
    for folder in folders:
        video = Video(folder)
        marks = video.landmarks(points)
        if marks is None or not video.frames:
            continue
        idx = list(range(0, len(video.frames), frame_stride))[:max_frames]
        images = np.stack([load_image(video.frames[i]) for i in idx])
        if images.shape[1:3] != (image_size, image_size):
            raise UserError(
                f"{folder}: frames are {images.shape[2]}×{images.shape[1]}, the model takes {image_size} px "
                f"(prepare the data with `dagan prepare --size {image_size}`)"
            )
        kp = keypoints(images)
        if kp.shape[1] != len(points):
            raise UserError(f"the model has {kp.shape[1]} keypoints; {len(points)} anchor points were given")
        clips[folder.name] = score_clip(kp, marks[idx], points)
        frames_used += len(idx)
    if not clips:
        raise UserError(f"no clips with face-mesh tracks under {root} (run `dagan landmarks` on it first)")
    median: dict[str, dict[str, float]] = {}
    for name in MEASURES:
        rows = [c[name] for c in clips.values() if name in c]
        if rows:
            median[name] = {"r": _median(x["r"] for x in rows), "gain": _median(x["gain"] for x in rows)}
            median[name]["clips"] = len(rows)
    return {"clips": clips, "median": median, "frames": frames_used}


def _median(values: Iterable[float]) -> float:
    """Median of the finite values (NaN when none: keypoints that never move have no correlation)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def markdown(result: dict) -> str:
    """The per-clip table (r / gain per measure) and the medians."""
    lines = [
        "| clip | " + " | ".join(f"{n} r / gain" for n in MEASURES) + " | mouth gap std |",
        "|---|" + "---:|" * (len(MEASURES) + 1),
    ]

    def cell(d: dict | None) -> str:
        return "—" if d is None else f"{d['r']:.2f} / {d['gain']:.2f}"

    for clip, score in result["clips"].items():
        mouth = score.get("mouth")
        spread = "—" if mouth is None else f"{mouth['mesh_gap_std']:.4f}"
        lines.append(f"| {clip} | " + " | ".join(cell(score.get(n)) for n in MEASURES) + f" | {spread} |")
    med = result["median"]
    lines.append("| **median** | " + " | ".join(cell(med.get(n)) for n in MEASURES) + " | |")
    lines.append(
        f"\n{len(result['clips'])} clips, {result['frames']} frames. Gaps: upper-to-lower keypoint distance "
        "against the same mesh points' (gain 1 = the keypoints open as far as the face does); motion: "
        "each anchored keypoint's displacement since the first frame against its mesh point's. Mouth gap "
        "std in [−1, 1] units (0.016 = 1 px at 128 px).\n"
    )
    return "\n".join(lines) + "\n"
