"""Write a checkpoint whose generator comes from a fine-tune that trained only the generator: every
tensor of ``--weights`` but the ``generator.*`` ones, which come from ``--generator``, a checkpoint of
``dagan train dagan`` run with ``dagan.frozen`` [kp_detector].

Why not ship the run's own file: a run's config is its recipe's, so it lacks what was set on the bundled
file after training (the lip and Jacobian gains, the lid reader and its ``blink`` keypoints, the
open-mouth warp), and it has no lid reader. Those were chosen on the keypoint detector the bundled file
has; this script refuses a run whose keypoint detector (or depth net) is not exactly that one, and a
generator of another shape.

    python scripts/swap_generator.py --weights weights/dagan-default.safetensors \\
        --generator runs/reshape/dagan.safetensors --out runs/reshape/dagan-default.safetensors \\
        --note "generator fine-tuned with reshaped pairs (runs/reshape)"

Measure the result before shipping it (``dagan eval``, ``dagan eval-cross --baseline-checkpoint``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Tensors the run must not have changed: the settings and nets chosen on them stay valid only then.
#: BatchNorm's batch counters are not compared: they count steps, not what a net computes.
KEPT_GROUPS = ("kp_detector.", "depth_net.")


def swap_generator(
    weights: str | Path, generator: str | Path, out: str | Path, note: str = ""
) -> dict[str, str]:
    """The checkpoint ``out`` as the module docstring says; returns its metadata."""
    from dagan.checkpoint import CheckpointError, checkpoint_metadata, read_checkpoint, save_checkpoint

    config, tensors, meta = read_checkpoint(weights)
    run_config, run_tensors, _ = read_checkpoint(generator)
    new = {k: v for k, v in run_tensors.items() if k.startswith("generator.")}
    old = {k: v for k, v in tensors.items() if k.startswith("generator.")}
    if not new:
        raise CheckpointError(f"{generator} has no generator.* tensors")
    if set(new) != set(old) or any(new[k].shape != old[k].shape for k in old):
        raise CheckpointError(f"{generator}'s generator does not have the tensors of {weights}'s")
    if run_config.generator != config.generator:
        raise CheckpointError(f"{generator} was trained for another generator config than {weights}'s")
    for key, value in tensors.items():
        if not key.startswith(KEPT_GROUPS) or "num_batches_tracked" in key:
            continue
        if key not in run_tensors or not torch.equal(run_tensors[key], value):
            raise CheckpointError(
                f"{generator} changed {key}: train with dagan.frozen [kp_detector] and --depth of {weights}"
            )
    meta["generator"] = note or f"generator from {generator}"
    save_checkpoint(out, config, {**tensors, **new}, meta)
    return checkpoint_metadata(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="the DaGAN checkpoint to start from")
    ap.add_argument("--generator", required=True, help="a `dagan train dagan` checkpoint (its generator.*)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="", help="the new metadata `generator` entry (default: the path)")
    args = ap.parse_args()
    swap_generator(args.weights, args.generator, args.out, args.note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
