"""Write a checkpoint with the same tensors under a changed model config: settings that change what a
network computes but none of its weights, such as ``generator.attention.kv_pool`` (keys and values of
the cross-modal attention pooled, docs/export.md "Pooled attention keys").

    python scripts/set_model_config.py --weights weights/dagan-default.safetensors \\
        --set generator.attention.kv_pool=4 --out runs/kv4.safetensors

Refused when the new config needs other tensors (a setting that adds, removes or resizes a weight: that
is a new model, which needs training) or when a key is unknown. The metadata keeps the source's entries
and records the change under ``config_changes``. Measure the result before shipping it (``dagan eval``,
``dagan eval-cross`` with ``--baseline-checkpoint``, ``dagan bench --interleaved --baseline``).
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
    from dagan.checkpoint import CheckpointError, describe_mismatch, read_checkpoint, save_checkpoint
    from dagan.model import DaGAN

    config, tensors, meta = read_checkpoint(weights)
    new = config.replace(**changes)
    model = DaGAN(new)
    problems = [
        p
        for name in ("depth_net", "kp_detector", "generator")
        for p in describe_mismatch(getattr(model, name), tensors, f"{name}.")
    ]
    if problems:
        raise CheckpointError(
            f"the new config needs other tensors than {weights} has ({len(problems)} differ, e.g. "
            f"{problems[0]}): that is a new model, train it"
        )
    meta = {k: v for k, v in meta.items() if k not in ("format", "config")}
    done = ", ".join(f"{k}={v}" for k, v in changes.items())
    meta["config_changes"] = "; ".join(filter(None, [meta.get("config_changes", ""), done]))
    save_checkpoint(out, new, tensors, meta)
    return meta


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
    args = ap.parse_args()
    set_model_config(args.weights, parse_set(args.set), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
