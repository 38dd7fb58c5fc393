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

With a :data:`WarpFn` (the command always passes the model's) it scores the next link too, the
generator's **warp**, driving each clip's frames from its first frame (self-reenactment, absolute
motion): per gap, how far the backward flow read at the driving frame's two mesh points stretches the
source's gap, against how far it must (the mesh gap's change since the first frame): r and gain, 0 =
the warp moves upper and lower lip as one. And **apart**: the share of frames whose two gap points are
carried by different channels of the motion masks (the softmax that picks, per pixel, which keypoint's
motion applies); two points carried by one keypoint move as one, whatever the other keypoints do. Which
keypoints carry each point (``carriers``, counted over all frames) is in the result too.
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
# (N×H×W×3 uint8 frames, frame 0 the source; N×P×2 points in [−1, 1]) → (N×P×2 backward flow at the
# points, N×P int: the motion-mask channel carrying each point, 0 = background, k + 1 = keypoint k)
WarpFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


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


def score_warp(flow: np.ndarray, carrier: np.ndarray, marks: np.ndarray, points: Sequence[int]) -> dict:
    """Warp gaps of one clip driven from its first frame. ``flow`` N×K×2 the backward flow read at the
    anchors' mesh points of each frame, ``carrier`` N×K their mask channels, ``marks`` N×K×2 those points
    (every frame with a face), ``points`` the mesh index of each keypoint."""
    out: dict[str, dict[str, float]] = {}
    for name, upper, lower in GAPS:
        if upper not in points or lower not in points:
            continue
        i, j = points.index(upper), points.index(lower)
        gap = marks[:, j, 1] - marks[:, i, 1]
        must = gap[0] - gap  # the source's gap is fetched for the driving one: the stretch needed
        if must.std() < MIN_GAP_STD:
            continue
        stretch = (flow[:, j, 1] - flow[:, i, 1]) - gap  # 0: the warp moves both points as one
        r, gain = fit(stretch, must)
        out[name] = {"r": r, "gain": gain, "apart": float((carrier[:, i] != carrier[:, j]).mean())}
    return out


def carrier_shares(carriers: Sequence[np.ndarray], points: Sequence[int]) -> dict[str, dict[str, float]]:
    """For each gap point (mesh index), the share of all frames each mask channel carries it, named
    ``background`` or ``kp <mesh index of the keypoint's anchor>``, largest first."""
    every = np.concatenate(carriers)  # frames × K
    out: dict[str, dict[str, float]] = {}
    for point in sorted({p for g in GAPS for p in g[1:] if p in points}, key=list(points).index):
        values, counts = np.unique(every[:, list(points).index(point)], return_counts=True)
        order = np.argsort(-counts)
        out[str(point)] = {
            ("background" if values[o] == 0 else f"kp {points[values[o] - 1]}"): round(
                float(counts[o] / counts.sum()), 3
            )
            for o in order
        }
    return out


def model_scorers(checkpoint: str | Path, batch_size: int = 16) -> tuple[KeypointFn, WarpFn, int]:
    """A :data:`KeypointFn` (the depth net and keypoint detector) and a :data:`WarpFn` (source cached
    from frame 0, then the generator per frame, as the engine runs it) of a checkpoint, torch on the
    CPU, and the model's image size."""
    import torch

    from dagan.checkpoint import load_model

    from .losses import read_at_points

    model = load_model(checkpoint)
    size = model.config.image_size

    def tensor(frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0

    def keypoints(frames: np.ndarray) -> np.ndarray:
        x, out = tensor(frames), []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                kp, _ = model.driving_keypoints(x[i : i + batch_size])
                out.append(kp.value.numpy())
        return np.concatenate(out)

    def warp(frames: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = tensor(frames)
        flows, carriers = [], []
        with torch.inference_mode():
            state = model.encode_source(x[:1])
            for i in range(len(x)):
                kp, _ = model.driving_keypoints(x[i : i + 1])
                out = model.render(state, kp)
                at = torch.from_numpy(pts[i : i + 1].astype(np.float32))  # 1×P×2
                flows.append(read_at_points(out.deformation.permute(0, 3, 1, 2), at)[0].T.numpy())
                carriers.append(read_at_points(out.mask, at)[0].argmax(0).numpy())  # mask: 1×(K+1)×P
        return np.stack(flows), np.stack(carriers)

    return keypoints, warp, size


def keypoint_follow(
    keypoints: KeypointFn,
    root: str | Path,
    points: Sequence[int],
    image_size: int,
    frame_stride: int = 2,
    max_frames: int | None = 120,
    warp: WarpFn | None = None,
) -> dict:
    """Score every clip under ``root`` (a prepared dataset, or one split of it) that has mesh tracks.

    Returns ``{"clips": {name: score_clip(...)}, "median": {measure: {"r", "gain"}}, "frames": n}``,
    with ``warp`` also ``"warp": {name: score_warp(...)}``, ``"warp_median": {gap: {"r", "gain",
    "apart"}}`` and ``"carriers"`` (:func:`carrier_shares`), on each clip's frames with a face, driven
    from the first of them. Frames whose size is not ``image_size`` are an error (the tracks are in the
    stored frames' pixels)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    if frame_stride < 1 or (max_frames is not None and max_frames < 3):
        raise UserError("--frame-stride must be >= 1 and --max-frames >= 3")
    # a dataset root (ROOT/train|test/<clip>) or one split of it (ROOT/test/<clip>)
    folders = clip_folders(root) or sorted(p for p in root.iterdir() if p.is_dir())
    points = list(points)
    clips: dict[str, dict] = {}
    warps: dict[str, dict] = {}
    carriers: list[np.ndarray] = []
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
        face = np.isfinite(marks[idx]).all(axis=(1, 2))
        if warp is not None and face.sum() >= 3:
            flow, carrier = warp(images[face], marks[idx][face])
            warps[folder.name] = score_warp(flow, carrier, marks[idx][face], points)
            carriers.append(carrier)
    if not clips:
        raise UserError(f"no clips with face-mesh tracks under {root} (run `dagan landmarks` on it first)")
    result = {"clips": clips, "median": _medians(clips, MEASURES, ("r", "gain")), "frames": frames_used}
    if warp is not None:
        gaps = [g[0] for g in GAPS]
        shares = carrier_shares(carriers, points) if carriers else {}
        result.update(warp=warps, warp_median=_medians(warps, gaps, ("r", "gain", "apart")), carriers=shares)
    return result


def _medians(scores: dict[str, dict], names: Sequence[str], keys: Sequence[str]) -> dict[str, dict]:
    """Per measure ``name`` that some clip has: the median over those clips of each of ``keys``, and
    ``"clips"``, their count. ``scores``: {clip: {name: {key: value}}}."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        rows = [c[name] for c in scores.values() if name in c]
        if rows:
            out[name] = {k: _median(x[k] for x in rows) for k in keys}
            out[name]["clips"] = len(rows)
    return out


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
    if "warp" in result:
        gaps = [g[0] for g in GAPS]
        lines += [
            "| clip (warp) | " + " | ".join(f"{n} r / gain / apart" for n in gaps) + " |",
            "|---|" + "---:|" * len(gaps),
        ]

        def warp_cell(d: dict | None) -> str:
            return "—" if d is None else f"{d['r']:.2f} / {d['gain']:.2f} / {d['apart']:.2f}"

        for clip, score in result["warp"].items():
            lines.append(f"| {clip} | " + " | ".join(warp_cell(score.get(n)) for n in gaps) + " |")
        med = result["warp_median"]
        lines.append("| **median** | " + " | ".join(warp_cell(med.get(n)) for n in gaps) + " |")
        lines.append(
            "\nWarp, each clip driven from its first frame: how far the generator's flow stretches the "
            "source's gap against how far the face's gap changed (gain 0 = upper and lower point move as "
            "one); apart = share of frames whose two points are carried by different keypoints.\n"
        )
        for point, shares in result["carriers"].items():
            top = ", ".join(f"{name} {share:.0%}" for name, share in list(shares.items())[:3])
            lines.append(f"- mesh point {point} is carried by {top}")
        lines.append("")
    return "\n".join(lines) + "\n"
