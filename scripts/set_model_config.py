"""Write a checkpoint with the same tensors under a changed model config: settings that change what a
network computes but none of its weights, such as ``generator.attention.kv_pool`` (keys and values of
the cross-modal attention pooled, docs/export.md "Pooled attention keys").

    python scripts/set_model_config.py --weights weights/dagan-default.safetensors \\
        --set generator.attention.kv_pool=4 --out runs/kv4.safetensors

Refused when the new config needs other tensors (a setting that adds, removes or resizes a weight: that
is a new model, which needs training) or when a key is unknown. The anti-alias blur kernels are not
weights but constants of a scale factor (``AntiAliasInterpolation2d``), so a changed scale factor (e.g.
``generator.dense_motion.scale_factor=0.5``, a finer motion field) re-makes them: the learned tensors stay
and the file is a fine-tuning start, since the nets were trained at the old scale. The metadata keeps the
source's entries and records the change under ``config_changes``. ``--check`` prints how far the new
model's frames are from the original's (PSNR, torch fp32) on held-out real frame pairs: every 6th of the
first 60 frames of clips d3, s18 and d20 of ``../shared/data/real-faces`` (``--clips`` to change) driving
their own clip's first frame and the next clip's (:func:`frame_pairs`). Measure the result before
shipping it (``dagan eval``, ``dagan eval-cross`` with ``--baseline-checkpoint``, ``dagan bench
--interleaved --baseline``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def set_model_config(weights: str | Path, changes: dict[str, Any], out: str | Path) -> dict[str, str]:
    """The checkpoint ``out`` as the module docstring says; returns its metadata."""
    from dagan.checkpoint import (
        CheckpointError,
        blur_kernels,
        checkpoint_metadata,
        describe_mismatch,
        inference_tensors,
        read_checkpoint,
        save_checkpoint,
    )
    from dagan.model import DaGAN

    config, tensors, meta = read_checkpoint(weights)
    new = config.replace(**changes)
    model = DaGAN(new)
    tensors = {**tensors, **blur_kernels(model)}
    problems = describe_mismatch(model, inference_tensors(model, tensors))
    if problems:
        raise CheckpointError(
            f"the new config needs other tensors than {weights} has ({len(problems)} differ, e.g. "
            f"{problems[0]}): that is a new model, train it"
        )
    done = ", ".join(f"{k}={v}" for k, v in changes.items())
    meta["config_changes"] = "; ".join(filter(None, [meta.get("config_changes", ""), done]))
    save_checkpoint(out, new, tensors, meta)
    return checkpoint_metadata(out)


CLIPS_DIR = ROOT.parent / "shared" / "data" / "real-faces" / "clips"
DEFAULT_CLIPS = [CLIPS_DIR / f"{name}.mp4" for name in ("d3", "s18", "d20")]


def frame_pairs(clips: list[Path], size: int) -> tuple[Any, Any]:
    """(sources, drivers): B×3×size×size tensors in [0, 1]. Every 6th of the first 60 frames of each clip
    drives two sources: the clip's own first frame (self-reenactment) and the next clip's first frame
    (another person), so 3 clips give 2 × 3 × 9 = 54 pairs."""
    import cv2
    import numpy as np
    import torch

    from dagan.media import read_video

    per_clip = []
    for clip in clips:
        video, _ = read_video(clip, max_frames=60)
        per_clip.append([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in video[::6]])
    sources, drivers = [], []
    for i, frames in enumerate(per_clip):
        for owner in (frames, per_clip[(i + 1) % len(per_clip)]):
            sources += [owner[0]] * (len(frames) - 1)
            drivers += frames[1:]

    def stack(images: list) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    return stack(sources), stack(drivers)


def check(original: str | Path, changed: str | Path, clips: list[Path]) -> tuple[float, float, int]:
    """(median, min) PSNR in dB of the changed checkpoint's frames against the original's, and the
    number of pairs (:func:`frame_pairs`)."""
    import torch

    from dagan.checkpoint import load_model

    a, b = load_model(original).eval(), load_model(changed).eval()
    sources, drivers = frame_pairs(clips, a.config.image_size)
    with torch.no_grad():
        mse = ((a(sources, drivers).prediction - b(sources, drivers).prediction) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1 / mse.clamp_min(1e-12))
    return float(psnr.median()), float(psnr.min()), len(psnr)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``4`` an int, ``true`` a bool, ``[1, 2]`` a list)."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        changes[key] = yaml.safe_load(value)
    return changes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="the checkpoint to start from")
    ap.add_argument("--set", action="append", required=True, metavar="KEY=VALUE", help="repeatable")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true", help="PSNR of the new frames against the original's")
    ap.add_argument("--clips", nargs="+", type=Path, default=DEFAULT_CLIPS, help="clips for --check")
    args = ap.parse_args()
    set_model_config(args.weights, parse_set(args.set), args.out)
    print(f"wrote {args.out}")
    if args.check:
        median, low, n = check(args.weights, args.out, args.clips)
        print(f"frames against {args.weights}: PSNR median {median:.1f} dB, min {low:.1f} dB over {n} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
