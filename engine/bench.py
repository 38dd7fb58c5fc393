"""Per-frame latency benchmark: cached engine path vs. the uncached full forward, same run, same machine.

Reports median and p99 latency and frames per second, and names the machine, so every performance figure
in the docs can be reproduced with ``dagan bench``. Weights do not change the cost of a forward pass, so
presets can be timed without trained weights (randomly initialised, and the report says so).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dagan.checkpoint import load_model
from dagan.config import load_config
from dagan.model import DaGAN

from .torch_backend import TorchEngine


def machine_description(device: torch.device) -> dict[str, str | int]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, str | int] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def _stats(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        "median_ms": statistics.median(ms),
        "p99_ms": p99,
        "mean_ms": statistics.fmean(ms),
        "fps": 1000.0 / statistics.fmean(ms),
        "frames": len(ms),
    }


def _time(fn, frames: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(frames):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - t0)
    return samples


def bench_model(model: DaGAN, label: str, frames: int = 20, warmup: int = 3, device: str = "auto") -> dict:
    """Time one model's cached per-frame path and its uncached forward on random uint8 frames."""
    engine = TorchEngine(model, device=device)
    size = engine.image_size
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    drivers = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    engine.set_source(source)
    i = [0]

    def cached() -> None:
        engine.animate(drivers[i[0] % len(drivers)])
        i[0] += 1

    src_t = engine._to_tensor([source], "source")

    @torch.inference_mode()
    def uncached() -> None:
        drv_t = engine._to_tensor([drivers[i[0] % len(drivers)]], "driving")
        engine._to_images(engine.model(src_t, drv_t).prediction)
        i[0] += 1

    result = {
        "model": label,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
        "cached": _stats(_time(cached, frames, warmup, engine.device)),
        "uncached": _stats(_time(uncached, frames, warmup, engine.device)),
        "machine": machine_description(engine.device),
    }
    result["speedup"] = result["uncached"]["median_ms"] / result["cached"]["median_ms"]
    return result


def run_bench(
    presets: list[str], checkpoint: str | None, frames: int, warmup: int, device: str, out: str | None
) -> list[dict]:
    results = []
    if checkpoint:
        results.append(
            bench_model(load_model(checkpoint), f"checkpoint {checkpoint}", frames, warmup, device)
        )
    for name in presets:
        torch.manual_seed(0)
        label = f"preset {name} (random init: latency does not depend on weights)"
        results.append(bench_model(DaGAN(load_config(name)), label, frames, warmup, device))
    for r in results:
        m = r["machine"]
        where = f"{m['device']} ({m.get('gpu', m['cpu'])})"
        print(f"{r['model']}: {r['parameters'] / 1e6:.2f} M parameters on {where}")
        for mode in ("cached", "uncached"):
            s = r[mode]
            print(
                f"  {mode:9s} median {s['median_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms   "
                f"{s['fps']:7.2f} fps   ({s['frames']} frames)"
            )
        print(f"  cache speedup (median): {r['speedup']:.2f}x")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    return results
