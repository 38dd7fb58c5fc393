"""``python -m bench.gpu``, the prepared GPU check (run by scripts/gpu_check.sh): PyTorch variants × models
× batch sizes, one table.

For the bundled default weights, ``tiny`` and ``vox-256`` (random weights: cost does not depend on them)
and each PyTorch variant (fp32, fp16, fp16 + channels_last, fp16 + channels_last + CUDA graphs, and
torch.compile when asked and time allows), at batch 1, 2, 4, …, 64 sessions per engine call:

- per-call p50/p99 (ms) and per-frame p50 (call ÷ batch), throughput (frames/s),
- streams at 30 fps: throughput ÷ 30, counted only when the call's p99 fits in 33 ms (else 0),
- fp16 vs fp32: max and mean absolute difference of the uint8 avatar frames, and their PSNR.

It writes ``gpu_check.md``, ``gpu_check.json`` and ``gpu_check.log`` to ``--out`` (scripts/gpu_check.sh
passes ``$OUT``), keeps to ``--budget-s``
(default 7 minutes: the whole check must fit in 8 on an H100/H200), and records what it skipped and why.
``--smoke`` runs on whatever device there is (the CPU in CI) with tiny sizes and few iterations, so the
script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan.checkpoint import DEFAULT_CHECKPOINT
from dagan.helpers import resolve_device
from dagan.model import DaGAN
from engine import create_engine
from engine.base import Engine

from .engines import BenchModel, checkpoint_model, preset_model
from .paths import GPU_CHECK_OUT
from .report import load_average, machine_description, percentile, timestamp, write_report

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def variants(device: torch.device, compile_: bool) -> list[tuple[str, dict]]:
    if device.type != "cuda":
        return [
            ("fp32", {"precision": "fp32"}),
            ("fp32 channels_last", {"precision": "fp32", "channels_last": True}),
        ]
    out = [
        ("fp32", {"precision": "fp32"}),
        ("fp16", {"precision": "fp16"}),
        ("fp16 channels_last", {"precision": "fp16", "channels_last": True}),
        ("fp16 channels_last cuda_graphs", {"precision": "fp16", "channels_last": True, "cuda_graphs": True}),
    ]
    if compile_:
        out.append(
            (
                "fp16 channels_last torch.compile",
                {"precision": "fp16", "channels_last": True, "compile": True},
            )
        )
    return out


def models(names: list[str], checkpoint: Path = DEFAULT_CHECKPOINT) -> list[BenchModel]:
    """``bundled``: the weights at ``checkpoint`` (skipped when the file is missing); any other name: that
    preset with random weights."""
    out = []
    for name in names:
        if name == "bundled":
            if checkpoint.is_file():
                out.append(checkpoint_model(checkpoint, f"bundled ({checkpoint.name})"))
            continue
        out.append(preset_model(name, f"{name} (random init)"))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def make_engine(model: DaGAN, device: torch.device, options: dict) -> Engine:
    """The torch engine of one variant (the shared fp32 model, cast in place as the variants go, as
    this check always ran); ``compile``: its frame step through ``torch.compile``."""
    options = dict(options)
    compile_ = options.pop("compile", False)
    engine = create_engine(model, backend="torch", device=str(device), **options)
    if compile_:
        engine._run_frame = torch.compile(engine._run_frame, dynamic=False)  # type: ignore[method-assign]
    return engine


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def check_model(
    label: str,
    model: DaGAN,
    device: torch.device,
    batches: tuple[int, ...],
    iters: int,
    warmup: int,
    deadline: float,
    compile_: bool,
    log: Callable[[str], None],
) -> dict:
    size = model.config.image_size
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    drivers = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    entry = {"model": label, "image_size": size, "parameters": sum(p.numel() for p in model.parameters())}
    entry["variants"], entry["skipped"] = [], {}
    reference = None  # fp32 outputs at batch 1, to compare fp16 against
    for name, options in variants(device, compile_):
        if time.monotonic() > deadline:
            entry["skipped"][name] = "time budget reached"
            continue
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.monotonic()
            engine = make_engine(model, device, options)
            sessions0 = [engine.new_session(sources[0], relative=False)]
            outputs = [engine.animate_batch(sessions0, [d])[0].image for d in drivers]
            first_s = time.monotonic() - t0  # build + first calls (compile/capture time)
            row = {"name": name, "setup_s": round(first_s, 2), "batches": []}
            if reference is None and options.get("precision") == "fp32" and not options.get("channels_last"):
                reference = outputs
            elif reference is not None:
                got, ref = np.stack(outputs).astype(np.int16), np.stack(reference).astype(np.int16)
                row["vs_fp32"] = {
                    "max_abs": int(np.abs(got - ref).max()),
                    "mean_abs": float(np.abs(got - ref).mean()),
                    "psnr_db": psnr(got, ref),
                }
            for b in batches:
                if time.monotonic() > deadline:
                    row.setdefault("stopped_at_batch", b)
                    break
                sessions = [engine.new_session(sources[k % 4]) for k in range(b)]
                frames = [drivers[k % 4] for k in range(b)]
                samples = time_calls(
                    lambda e=engine, s=sessions, f=frames: e.animate_batch(s, f), iters, warmup, device
                )
                ms = [x * 1000 for x in samples]
                p50, p99 = statistics.median(ms), percentile(ms, 0.99)
                fps = b * 1000 / p50
                row["batches"].append(
                    {
                        "batch": b,
                        "call_p50_ms": round(p50, 3),
                        "call_p99_ms": round(p99, 3),
                        "frame_p50_ms": round(p50 / b, 3),
                        "fps": round(fps, 1),
                        "streams_30fps": int(fps // 30) if p99 <= 1000 / 30 else 0,
                    }
                )
                log(f"  {label} | {name} | B={b}: call p50 {p50:.2f} ms p99 {p99:.2f} ms, {fps:.0f} frames/s")
            if device.type == "cuda":
                row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            entry["variants"].append(row)
            del engine
        except Exception as exc:  # one variant failing must not hide the others
            entry["skipped"][name] = f"{type(exc).__name__}: {exc}"
            log(f"  {label} | {name}: failed: {exc}")
            log(traceback.format_exc(limit=3))
    return entry


def markdown(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu", m["cpu"])
    lines = [
        f"GPU check on {where} (torch {m['torch']}, CUDA {m.get('cuda', '-')}, "
        f"driver {m.get('driver', '-')}), "
        f"{'SMOKE RUN (tiny sizes, few iterations: not a measurement)' if report['smoke'] else 'full run'}, "
        f"{report['iterations']} timed calls per cell, {report['elapsed_s']:.0f} s in all.",
        "",
        "Per-call p50 / p99 ms at batch B (B sessions, one frame each, per engine call); frames/s; "
        "streams at 30 fps (0 when the call's p99 exceeds 33 ms).",
        "",
    ]
    for e in report["models"]:
        lines += [f"### {e['model']}: {e['image_size']} px, {e['parameters'] / 1e6:.2f} M parameters", ""]
        batches = sorted({b["batch"] for v in e["variants"] for b in v["batches"]})
        lines.append(
            "| variant | setup s | "
            + " | ".join(f"B={b}" for b in batches)
            + " | vs fp32 (max / mean abs, PSNR) |"
        )
        lines.append("|---|---:|" + "---|" * len(batches) + "---|")
        for v in e["variants"]:
            cells = []
            by_b = {b["batch"]: b for b in v["batches"]}
            for b in batches:
                c = by_b.get(b)
                cells.append(
                    f"{c['call_p50_ms']:.2f} / {c['call_p99_ms']:.2f} ms, {c['fps']:.0f} f/s, "
                    f"{c['streams_30fps']} str"
                    if c
                    else "-"
                )
            d = v.get("vs_fp32")
            diff = (
                f"{d['max_abs']} / {d['mean_abs']:.2f}, {d['psnr_db']:.1f} dB"
                if d
                else "reference"
                if v["name"] == "fp32"
                else "-"
            )
            lines.append(f"| {v['name']} | {v['setup_s']} | " + " | ".join(cells) + f" | {diff} |")
        for name, why in e["skipped"].items():
            lines.append(f"\n{name}: not measured ({why})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few iterations (CI, no GPU needed)")
    p.add_argument(
        "--out", default=str(GPU_CHECK_OUT), help="folder for gpu_check.md/.json/.log (default %(default)s)"
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this long")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default %(default)s)")
    p.add_argument(
        "--models",
        default="bundled,tiny,vox-256",
        help="comma list: bundled (the --checkpoint weights) and presets with random weights",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="the weights the 'bundled' model loads (default: the shipped weights; skipped if missing)",
    )
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default %(default)s)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per cell (default %(default)s)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compilation)")
    a = p.parse_args(argv)
    started = time.monotonic()
    device = resolve_device(a.device)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    batches = tuple(int(b) for b in a.batches.split(","))
    iters, warmup = a.iters, 3
    if a.smoke:
        names = [n for n in names if n != "vox-256"][:1] or ["tiny"]
        batches, iters, warmup = tuple(b for b in batches if b <= 2) or (1,), 2, 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the fp16 comparison's reference)
        torch.backends.cudnn.allow_tf32 = False
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    deadline = started + a.budget_s
    report: dict[str, Any] = {
        "machine": machine_description(device),
        "smoke": a.smoke,
        "iterations": iters,
        "date": timestamp(),
        "load_before": load_average(),
        "models": [],
    }
    log(
        f"gpu_check on {report['machine'].get('gpu', report['machine']['cpu'])}: "
        f"models {names}, batches {batches}"
    )
    # Small models first: if the budget runs out it is the big model's large batches that are missing.
    for bm in models(names, a.checkpoint):
        report["models"].append(
            check_model(bm.label, bm.model, device, batches, iters, warmup, deadline, a.compile, log)
        )
    report["elapsed_s"] = time.monotonic() - started
    report["load_after"] = load_average()
    (out / "gpu_check.log").write_text("\n".join(log_lines) + "\n")
    write_report(report, markdown(report), out / "gpu_check.json", out / "gpu_check.md")
    print(f"written: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
