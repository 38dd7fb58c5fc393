"""A user's frame through the engine, every host step included: ``python -m bench.hot_path``.

Why this harness: ``dagan bench`` times the networks' graphs on random frames, and each host step on its
own (the lid reader, the mouth's warp, the nod's face mesh); issue 18 asks for 30 fps at batch 1 with
them together. This times :meth:`engine.base.Engine.animate_batch` for one relative stream, on the
engine the server builds (:func:`engine.select.default_engine`: on a CPU the int8 CPU graph, a lone
stream on every inference core), with the server's keypoint filter, a real photo and a face that moves,
so every step a user's frame runs does run: the driving branch and the generator, the keypoint filter,
the nod's face mesh, the lid reader and, on the frames where they act, the lid and mouth warps. It does
not time what the server does around the engine (decode, crop, compose, encode: ``python -m
bench.server`` has those stages).

1. The engine, as ``dagan serve`` builds it for the checkpoint (``--backend``/``--precision`` pin it).
2. The photo: ``--photo``, cropped as the server crops an upload (default: scikit-image's astronaut).
3. The driver: ``--clip``, tracked and cropped as the server crops a camera (its face tracker), or
   the photo itself turned and nodded a few degrees (the default: no video needed).
4. A relative session with the server's keypoint filter on the clip's clock; ``--warmup`` frames, then
   ``--frames`` timed frames, cycling through the driver's.
5. The report: p50 / p99 / mean ms and fps per frame, which host steps the model runs, the machine, its
   load before and after, the date; ``--json`` and ``--markdown`` write it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .report import load_average, machine_description, stats, timestamp

# The most driving frames taken from a clip (they are cycled through for the timed frames).
MAX_CLIP_FRAMES = 300


def moved_photo(crop: np.ndarray, frames: int = 60) -> list[np.ndarray]:
    """``frames`` copies of a face crop turned in the image plane by up to 5° and moved up and down by up
    to 4 % of its size, on two slow periods: a driver who moves, for the face detector and the face
    mesh, without a video."""
    h, w = crop.shape[:2]
    out = []
    for t in range(frames):
        angle = 5.0 * np.sin(2 * np.pi * t / 50)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        m[1, 2] += 0.04 * h * np.sin(2 * np.pi * t / 37)
        out.append(cv2.warpAffine(crop, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return out


def load_driver(clip: Path | None, photo_crop: np.ndarray, size: int) -> tuple[list[np.ndarray], float, str]:
    """Step 3: the driving crops (a clip tracked and cropped by the server's tracker, its detection
    cadence and box filter, the frames before the first face left out as the server leaves them out; at
    most :data:`MAX_CLIP_FRAMES`), their frame rate and a name for the report."""
    if clip is None:
        return moved_photo(photo_crop), 25.0, "the photo, moved"
    from dagan.face import tracked_crops
    from dagan.media import VideoReader
    from dagan.smoothing import DEFAULT_PARAMS

    with VideoReader(clip) as reader:
        fps = float(reader.fps)
        with contextlib.closing(tracked_crops(reader, fps, size, box_filter=DEFAULT_PARAMS)) as tracked:
            crops = [frame.crop for frame in itertools.islice(tracked, MAX_CLIP_FRAMES)]
    if not crops:
        raise SystemExit(f"bench.hot_path: no face found in any frame of {clip}")
    return crops, fps, clip.name


def host_steps(engine: Any, session: Any) -> list[str]:
    """The host steps this model and session run each frame (empty for a model with none)."""
    steps = []
    if getattr(engine, "nod", None) is not None and session.nod is not None:
        steps.append("nod (face mesh)")
    if getattr(engine, "lid_reader", None) is not None and session.lids is not None:
        steps.append("lid reader + warp")
    if getattr(engine, "mouth", None) is not None and session.mouth is not None:
        steps.append("mouth warp")
    if session.kp_filter is not None:
        steps.append("keypoint filter")
    return steps


def run(
    checkpoint: str | None = None,
    photo: Path | None = None,
    clip: Path | None = None,
    frames: int = 200,
    warmup: int = 20,
    backend: str = "auto",
    precision: str | None = None,
) -> dict[str, Any]:
    """Steps 1–4; the report's numbers as a dict."""
    from dagan.checkpoint import resolve_checkpoint
    from dagan.face import crop_source
    from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter
    from engine.select import default_engine

    path = resolve_checkpoint(checkpoint)
    engine, choice = default_engine(path, backend=backend, precision=precision, progress=False)  # 1.
    size = engine.image_size
    if photo is None:  # 2.
        try:
            from skimage import data
        except ImportError as exc:
            raise SystemExit("bench.hot_path: pass --photo (scikit-image is not installed)") from exc
        image, photo_name = data.astronaut(), "scikit-image astronaut"
    else:
        from dagan.media import load_image

        image, photo_name = load_image(photo), photo.name
    photo_crop, _ = crop_source(image, out_size=size)
    driving, fps, driver_name = load_driver(clip, photo_crop, size)  # 3.
    t0 = time.perf_counter()
    session = engine.new_session(photo_crop, relative=True)  # 4.
    upload_ms = 1000 * (time.perf_counter() - t0)
    session.kp_filter = OneEuroFilter(DEFAULT_PARAMS)
    date, load_before = timestamp(), load_average()
    samples = []
    for i in range(warmup + frames):
        session.frame_time = i / fps
        frame = driving[i % len(driving)]
        t = time.perf_counter()
        engine.animate_batch([session], [frame])
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    return {
        "checkpoint": str(path),
        "engine": choice.describe(),
        "photo": photo_name,
        "driver": driver_name,
        "host_steps": host_steps(engine, session),
        "upload_ms": upload_ms,
        "frame": stats(samples),
        "machine": machine_description(torch.device("cpu")),
        "date": date,
        "load_before": load_before,
        "load_after": load_average(),
    }


def report_text(r: dict[str, Any]) -> str:
    """Step 5, as printed."""
    f = r["frame"]
    steps = ", ".join(r["host_steps"]) or "none"
    m = r["machine"]
    return "\n".join(
        [
            f"engine: {r['engine']}",
            f"checkpoint {r['checkpoint']}",
            f"photo {r['photo']}, driver {r['driver']}; host steps each frame: {steps}",
            f"a frame at batch 1, every host step: p50 {f['median_ms']:.1f} ms  p99 {f['p99_ms']:.1f} ms  "
            f"mean {f['mean_ms']:.1f} ms  {1000 / f['median_ms']:.1f} fps at p50, {f['fps']:.1f} at the "
            f"mean  ({f['frames']} frames)",
            f"the photo's upload (new_session): {r['upload_ms']:.0f} ms",
            f"{m['cpu']}, {m['cpu_count']} CPUs; {r['date']}, load average (1/5/15 min) before "
            f"{r['load_before']}, after {r['load_after']}",
        ]
    )


def report_markdown(r: dict[str, Any]) -> str:
    """Step 5 as a markdown table (docs/benchmarks.md, "A user's frame")."""
    f = r["frame"]
    return "\n".join(
        [
            f"Engine: {r['engine']}. Host steps each frame: {', '.join(r['host_steps']) or 'none'}. "
            f"{r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs, {r['date']}.",
            "",
            "| photo, driver | p50 / p99 / mean ms | fps at p50 / mean | upload (new_session) | load |",
            "|---|---|---|---|---|",
            f"| {r['photo']}, {r['driver']} | {f['median_ms']:.1f} / {f['p99_ms']:.1f} / {f['mean_ms']:.1f} "
            f"| {1000 / f['median_ms']:.1f} / {f['fps']:.1f} | {r['upload_ms']:.0f} ms "
            f"| {r['load_before'][0]} → {r['load_after'][0]} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.hot_path",
        description="Time a user's frame through the engine the server builds, every host step included.",
    )
    p.add_argument("--checkpoint", help="weights (default: $DAGAN_CHECKPOINT, then the bundled file)")
    p.add_argument("--photo", type=Path, help="the photo (default: scikit-image's astronaut)")
    p.add_argument("--clip", type=Path, help="a driving video (default: the photo, turned and nodded)")
    p.add_argument("--frames", type=int, default=200, help="timed frames (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="frames before timing (default 20)")
    p.add_argument("--backend", default="auto", help="pin the backend (default: as `dagan serve` picks)")
    p.add_argument("--precision", help="pin the precision (default: as `dagan serve` picks)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the report as a markdown table here")
    args = p.parse_args(argv)
    if args.frames < 1 or args.warmup < 0:
        p.error("--frames must be at least 1 and --warmup at least 0")
    for given in (args.photo, args.clip):
        if given is not None and not given.is_file():
            p.error(f"no such file: {given}")
    from dagan.errors import UserError

    try:
        r = run(
            args.checkpoint, args.photo, args.clip, args.frames, args.warmup, args.backend, args.precision
        )
    except UserError as exc:  # no face in the photo, an unreadable file, no weights: one line, no traceback
        raise SystemExit(f"bench.hot_path: {exc}") from exc
    print(report_text(r), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=2))
    if args.markdown is not None:
        args.markdown.write_text(report_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
