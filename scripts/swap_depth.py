"""Write a checkpoint whose depth net comes from another run: every tensor of ``--weights`` but the
``depth_net.*`` ones, which (with the ``depth`` section of the model config) come from ``--depth``, a
checkpoint of ``dagan train depth``. The rest of the config must match: the depth net is frozen in the
DaGAN stage, so the keypoint detector and generator of ``--weights`` keep the inputs they were trained on
only as far as the new depth net reproduces the old one's maps (check with ``dagan eval`` /
``dagan eval-cross``; a distilled net does, docs/training.md §2).

    python scripts/swap_depth.py --weights weights/dagan-default.safetensors \\
        --depth runs/depth-half/depth.safetensors --out runs/half.safetensors \\
        --note "depth net distilled at half resolution (runs/depth-half)"

This is how the bundled weights got their half-resolution depth net (weights/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def swap_depth(weights: str | Path, depth: str | Path, out: str | Path, note: str = "") -> dict[str, str]:
    """The checkpoint ``out`` as the module docstring says; returns its metadata."""
    from dagan.checkpoint import CheckpointError, checkpoint_metadata, read_checkpoint, save_checkpoint

    config, tensors, meta = read_checkpoint(weights)
    depth_config, depth_tensors, _ = read_checkpoint(depth)
    new_depth = {k: v for k, v in depth_tensors.items() if k.startswith("depth_net.")}
    if not new_depth:
        raise CheckpointError(f"{depth} has no depth_net.* tensors")
    old_keys = {k for k in tensors if k.startswith("depth_net.")}
    if old_keys != set(new_depth):
        raise CheckpointError(f"{depth}'s depth net does not have the tensors of {weights}'s (another size?)")
    rest = dataclasses.replace(depth_config, depth=config.depth)
    if rest != config:
        raise CheckpointError(f"{depth} was trained for another model than {weights} (configs differ)")
    tensors = {k: v for k, v in tensors.items() if k not in old_keys} | new_depth
    meta["depth"] = note or f"depth net from {depth}"
    save_checkpoint(out, dataclasses.replace(config, depth=depth_config.depth), tensors, meta)
    return checkpoint_metadata(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="the DaGAN checkpoint to start from")
    ap.add_argument("--depth", required=True, help="a `dagan train depth` checkpoint (its depth_net.*)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="", help="the new metadata `depth` entry (default: the --depth path)")
    args = ap.parse_args()
    swap_depth(args.weights, args.depth, args.out, args.note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
