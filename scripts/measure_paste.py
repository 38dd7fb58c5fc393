"""Paste-back (issue 19): which mask looks best, and what a 1280×720 paste costs per frame.

Masks (``dagan.paste.MASKS``) are compared on held-out photos driven by a held-out clip, on the bundled
weights, relative motion with the One-Euro filters, every ``--stride``-th frame:

- **seam**: in the mask's transition band (0.05 < mask < 0.95) of the 1280×720 output, the gradient
  the blend creates that neither the photo nor the avatar has: mean of max(0, |∇out| − max(|∇photo|,
  |∇avatar|)), grey levels per pixel (0: no edge of its own at the seam);
- **colour step**: the mean colour difference avatar − photo on the transition ring, levels (before →
  after the colour match), what a viewer sees as a halo;
- **motion shown**: of the avatar's change from the photo (|avatar − source crop|, summed), the share
  inside the mask — what the viewer gets to see of the animation (1 − it is frozen or cut off);
- **sharp**: the share of the crop the mask leaves to the sharp photo.

Timing: the per-frame paste (colour match, resample, blend, copy of the frame) at 1280×720, OpenCV and
torch on the CPU, interleaved, median and p90 of ``--reps`` calls each, with the load average printed.

    nice -n 15 python scripts/measure_paste.py --photos s42 s8 s12 s10 --clip d3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data/real-faces")


def _grad(image: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy) / 8.0  # Sobel's gain: levels per pixel


def mask_metrics(plan, avatar: np.ndarray) -> dict[str, float]:
    """The four measures of the module doc for one frame."""
    from dagan.paste import colour_offset, paste

    out = paste(plan, avatar)
    x0, y0, x1, y1 = plan.roi
    off = colour_offset(avatar, plan)
    a = cv2.add(avatar, (float(off[0]), float(off[1]), float(off[2]), 0.0))
    if plan.avatar_side != plan.model_side:
        a = cv2.resize(a, (plan.avatar_side,) * 2, interpolation=cv2.INTER_AREA)
    warped = cv2.warpAffine(
        a,
        plan.matrix,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    band = (plan.mask > 0.05) & (plan.mask < 0.95)
    g_out, g_bg, g_av = _grad(out[y0:y1, x0:x1]), _grad(plan.background[y0:y1, x0:x1]), _grad(warped)
    seam = float(np.maximum(0.0, g_out - np.maximum(g_bg, g_av))[band].mean())
    ring = plan.ring[..., None]
    diff = avatar.astype(np.float32) - plan.source_crop.astype(np.float32)
    step_before = float(np.abs((diff * ring).sum(axis=(0, 1)) / ring.sum()).mean())
    step_after = float(np.abs(((diff + off) * ring).sum(axis=(0, 1)) / ring.sum()).mean())
    change = np.abs(diff).sum(axis=2)
    shown = float((change * plan.crop_mask).sum() / max(change.sum(), 1e-9))
    sharp = float(1.0 - plan.crop_mask.mean())
    return {
        "seam": seam,
        "step_before": step_before,
        "step_after": step_after,
        "shown": shown,
        "sharp": sharp,
    }


def time_paste(plan, avatar: np.ndarray, reps: int) -> dict[str, dict[str, float]]:
    """Median and p90 ms of the per-frame paste: OpenCV, and torch on the CPU, interleaved."""
    import torch

    from dagan.paste import paste
    from engine.paste import Paster

    torch_paster = Paster(plan, "cpu", on_device=True)
    pred = torch.from_numpy(avatar).permute(2, 0, 1).float() / 255
    runs = {"opencv": lambda: paste(plan, avatar), "torch-cpu": lambda: torch_paster(pred)}
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1000)
    return {
        k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90))}
        for k, v in samples.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="+", default=["s42", "s8", "s12", "s10"])
    ap.add_argument("--clip", default="d3")
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "dagan-default.safetensors"))
    ap.add_argument("--timing-only", action="store_true")
    args = ap.parse_args()

    import torch

    from dagan.face import DrivingCropper, locate_source
    from dagan.media import VideoReader, load_image
    from dagan.paste import MASKS, parse_size, plan_paste
    from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter
    from engine import create_engine

    torch.set_num_threads(1)
    size = parse_size(args.size)
    engine = create_engine(args.checkpoint, backend="torch", device="cpu")
    n = engine.image_size
    with VideoReader(DATA / "clips" / f"{args.clip}.mp4") as reader:
        frames = [f for _, f in zip(range(args.frames), reader, strict=False)]
        fps = reader.fps
    totals: dict[str, list[dict[str, float]]] = {m: [] for m in MASKS}
    timing = None
    for name in args.photos:
        photo = load_image(DATA / "photos" / f"{name}.jpg")
        source = locate_source(photo)
        crop = source.crop_box.crop(photo, n)
        plans = {m: plan_paste(photo, source, crop, size, m) for m in MASKS}
        if timing is None:
            load = os.getloadavg()
            timing = time_paste(plans["ellipse"], crop, args.reps)
            print(
                f"paste at {size[0]}x{size[1]} ({name}, ROI {plans['ellipse'].roi}), load {load[0]:.1f}/"
                f"{os.getloadavg()[0]:.1f} before/after: "
                + ", ".join(
                    f"{k} median {v['median_ms']:.2f} ms p90 {v['p90_ms']:.2f} ms" for k, v in timing.items()
                ),
                flush=True,
            )
            if args.timing_only:
                return 0
        session = engine.set_source(crop, relative=True)
        session.kp_filter = OneEuroFilter(DEFAULT_PARAMS, rate=fps)
        cropper = DrivingCropper(n, box_filter=DEFAULT_PARAMS)
        for i, frame in enumerate(frames):
            session.frame_time = i / fps
            avatar = engine.animate(cropper(frame, i / fps)).image
            if i % args.stride:
                continue
            for m, plan in plans.items():
                totals[m].append(mask_metrics(plan, avatar) | {"photo": name})
        cropper.close()
        for m in MASKS:
            rows = [r for r in totals[m] if r["photo"] == name]
            print(
                f"  {name} {m:8s} "
                + "  ".join(
                    f"{k} {np.mean([r[k] for r in rows]):.3f}"
                    for k in ("seam", "step_before", "step_after", "shown", "sharp")
                ),
                flush=True,
            )
    print("\nall photos:")
    for m in MASKS:
        rows = totals[m]
        print(
            f"  {m:8s} "
            + "  ".join(
                f"{k} {np.mean([r[k] for r in rows]):.3f}"
                for k in ("seam", "step_before", "step_after", "shown", "sharp")
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
