"""How much the avatar shakes compared with its driver, before and after the One-Euro filters (issue 19).

The measure is the evaluation's (:func:`evaluation.motion.jitter_comparison`, what ``dagan eval-cross``
reports): mediapipe's 478 face-mesh points on every driving frame (the whole frame) and on every avatar
frame (upscaled to 256 px as the evaluation does); per frame triple the second difference
p(t+1) − 2·p(t) + p(t−1) of each point, its mean length in face sizes; averaged over the triples where
the driver is still (:data:`evaluation.motion.STILL_SPEED`): there, any motion of the avatar beyond the
driver's own is shake the pipeline added. The ratio avatar ÷ driver is the figure (≤ 1: no shakier than
the driver); the ratio over all frames is printed beside it. Lags: how many frames the filtered crop box
trails the raw detections and the filtered keypoints the unfiltered ones (:func:`track_lag`).

Run (held-out clips and photos of the bundled weights; about a minute per configuration on 2 cores):

    nice -n 15 python scripts/measure_jitter.py --clips d3 s18 d20 --photos s42 s8 s12 --configs before after

Configurations: ``before`` = the tracker's fixed average + dead zone, unfiltered keypoints (the pipeline
before issue 19); ``after`` = One-Euro on the box and on the keypoints at the defaults; ``kp:C,B`` /
``box:C,B`` / ``both:C,B`` = a sweep point (min cutoff C Hz, beta B). Landmarks are cached in
``--cache``. Prints one table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/real-faces")


def _as_tracks(lms: np.ndarray) -> list[np.ndarray | None]:
    """T×478×2 with NaN rows for frames without a face → the list ``evaluation.motion`` takes."""
    return [None if np.isnan(f[0, 0]) else f for f in lms]


def jitter(avatar: np.ndarray, driver: np.ndarray, fps: float) -> dict[str, float]:
    """The evaluation's jitter (:func:`evaluation.motion.jitter_comparison`, the measure of
    ``dagan eval-cross``) on the driver's still stretches, plus the same ratio over all frames."""
    from evaluation.motion import STILL_SPEED, jitter_comparison, landmark_jitter

    a, d = _as_tracks(avatar), _as_tracks(driver)
    r = jitter_comparison(a, d, STILL_SPEED / fps)
    all_a, all_d = landmark_jitter(a), landmark_jitter(d)
    return {
        "avatar": r["avatar"],
        "driver": r["driver"],
        "ratio": r["ratio"],
        "still_triples": r["triples"],
        "ratio_all": all_a.value / all_d.value,
    }


def track_lag(raw: np.ndarray, filtered: np.ndarray, max_lag: float = 4.0) -> float:
    """Frames by which ``filtered`` (T×N) trails ``raw``: the delay k (0 to ``max_lag``, steps of 0.05)
    for which raw delayed by k, linearly interpolated, is closest to the filtered track (squared error,
    so the moving stretches decide it). A causal filter's lag on this motion, in frames."""
    t = np.arange(len(raw), dtype=np.float64)
    best, best_err = 0.0, np.inf
    for k in np.arange(0.0, max_lag + 1e-9, 0.05):
        shifted = np.stack([np.interp(t - k, t, raw[:, j]) for j in range(raw.shape[1])], axis=1)
        sel = t >= max_lag + 1
        err = float(((filtered[sel] - shifted[sel]) ** 2).mean())
        if err < best_err:
            best, best_err = float(k), err
    return best


def _landmarks(image: np.ndarray, upscale_to: int = 0) -> np.ndarray:
    from dagan.face import face_landmarks

    if upscale_to and image.shape[0] < upscale_to:
        f = upscale_to / image.shape[0]
        image = cv2.resize(image, (upscale_to, upscale_to), interpolation=cv2.INTER_CUBIC)
    else:
        f = 1.0
    lm = face_landmarks(image)
    if lm is None:
        return np.full((478, 2), np.nan, np.float32)
    return lm[:, :2] / f


def driver_landmarks(clip: str, cache: Path, max_frames: int) -> tuple[list[np.ndarray], np.ndarray, float]:
    from dagan.media import VideoReader

    with VideoReader(DATA / "clips" / f"{clip}.mp4") as reader:
        frames = [f for _, f in zip(range(max_frames), reader, strict=False)]
        fps = reader.fps
    path = cache / f"driver-{clip}-{len(frames)}.npy"
    if path.is_file():
        return frames, np.load(path), fps
    lms = np.stack([_landmarks(f) for f in frames])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, lms)
    return frames, lms, fps


def _params(text: str):
    from dagan.smoothing import OneEuroParams

    c, b = (float(x) for x in text.split(","))
    return OneEuroParams(min_cutoff=c, beta=b)


class _Recorder:
    """Wraps a keypoint filter to keep what went in and came out (for its lag)."""

    def __init__(self, inner) -> None:
        self.inner, self.raw, self.out = inner, [], []

    def __call__(self, x: np.ndarray, t: float | None = None) -> np.ndarray:
        y = self.inner(x, t) if self.inner is not None else np.asarray(x, np.float64)
        self.raw.append(np.asarray(x, np.float64).copy())
        self.out.append(y.copy())
        return y


def run_config(
    engine, photo: np.ndarray, frames: list[np.ndarray], fps: float, config: str
) -> tuple[np.ndarray, dict[str, float]]:
    """Animate the clip in one configuration: the avatar's landmark track, and the lags (frames) of the
    box against the raw detections and of the keypoints against the unfiltered ones."""
    from dagan.face import DrivingCropper, prepare_source
    from dagan.smoothing import DEFAULT_BOX, DEFAULT_KEYPOINTS, OneEuroFilter

    box = kp = None
    if config == "after":
        box, kp = DEFAULT_BOX, DEFAULT_KEYPOINTS
    elif config.startswith(("kp:", "box:", "both:")):
        which, spec = config.split(":")
        p = _params(spec)
        box = p if which in ("box", "both") else None
        kp = p if which in ("kp", "both") else None
    elif config != "before":
        raise SystemExit(f"unknown configuration {config!r}")
    size = engine.image_size
    session = engine.set_source(prepare_source(photo, size), relative=True)
    # Without a filter the recorder passes the keypoints through (the split path renders exactly what
    # the fused one does), so the unfiltered configuration is recorded the same way.
    recorder = _Recorder(OneEuroFilter(kp, rate=fps) if kp is not None else None)
    session.kp_filter = recorder
    cropper = DrivingCropper(size, box_filter=box)
    out, targets, boxes = [], [], []
    for i, frame in enumerate(frames):
        t = i / fps
        session.frame_time = t
        avatar = engine.animate(cropper(frame, t)).image
        tr = cropper.tracker
        if tr._target is not None and tr.box is not None:
            targets.append((tr._target.cx, tr._target.cy, tr._target.size))
            boxes.append((tr.box.cx, tr.box.cy, tr.box.size))
        out.append(_landmarks(avatar, upscale_to=256))
    cropper.close()
    lags = {
        "box_lag": track_lag(np.array(targets), np.array(boxes)),
        "kp_lag": track_lag(np.array(recorder.raw), np.array(recorder.out)),
        "kp_raw": np.array(recorder.raw),
        "box_raw": np.array(targets),
    }
    return np.stack(out), lags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", default=["d3", "s18"])
    ap.add_argument("--photos", nargs="+", default=["s42", "s8", "s12"])
    ap.add_argument("--configs", nargs="+", default=["before", "after"])
    ap.add_argument("--max-frames", type=int, default=300)
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "dagan-default.safetensors"))
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/dagan-jitter"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import os

    import torch

    from dagan.media import load_image
    from engine import create_engine

    torch.set_num_threads(1)
    engine = create_engine(args.checkpoint, backend=args.backend, device="cpu")
    rows = []
    t0 = time.time()
    load = os.getloadavg()
    for clip in args.clips:
        frames, driver, fps = driver_landmarks(clip, args.cache, args.max_frames)
        for photo_name in args.photos:
            photo = load_image(DATA / "photos" / f"{photo_name}.jpg")
            for config in args.configs:
                stem = f"avatar-{clip}-{photo_name}-{config.replace(':', '_')}-{len(frames)}"
                path, lag_path = args.cache / f"{stem}.npy", args.cache / f"{stem}.json"
                if path.is_file() and lag_path.is_file():
                    avatar, lags = np.load(path), json.loads(lag_path.read_text())
                else:
                    avatar, lags = run_config(engine, photo, frames, fps, config)
                    np.save(path, avatar)
                    np.save(args.cache / f"{stem}-kp.npy", np.array(lags.pop("kp_raw")))
                    np.save(args.cache / f"{stem}-box.npy", np.array(lags.pop("box_raw")))
                    lag_path.write_text(json.dumps(lags))
                r = jitter(avatar, driver, fps)
                r.update(clip=clip, photo=photo_name, config=config, **lags)
                rows.append(r)
                print(
                    f"{clip:4s} {photo_name:4s} {config:16s} "
                    f"avatar {r['avatar']:.5f} driver {r['driver']:.5f} "
                    f"ratio {r['ratio']:.2f} ({r['still_triples']} still triples; "
                    f"all frames {r['ratio_all']:.2f}) "
                    f"lag: box {r['box_lag']:.2f}, keypoints {r['kp_lag']:.2f} frames",
                    flush=True,
                )
    print(
        f"\nper configuration (mean ratio over clips × photos; load {load[0]:.1f}, {time.time() - t0:.0f} s):"
    )
    for config in args.configs:
        sel = [r for r in rows if r["config"] == config]
        ratios = [r["ratio"] for r in sel]
        print(
            f"  {config:16s} still-frame ratio mean {np.mean(ratios):.2f} max {np.max(ratios):.2f} "
            f"min {np.min(ratios):.2f}; all frames mean {np.mean([r['ratio_all'] for r in sel]):.2f}; "
            f"lag box {np.mean([r['box_lag'] for r in sel]):.2f}, keypoints "
            f"{np.mean([r['kp_lag'] for r in sel]):.2f} frames"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
