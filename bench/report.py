"""What every benchmark report holds, computed one way: the statistics of a set of timings, the machine
they were taken on, the load around them and the date, and the JSON + markdown files they are written to.

The statistics are defined once (:func:`stats`, :func:`percentile`) so that a p99 in the model table and
a p99 in the GPU table are the same quantity; :func:`machine_description` names the CPU, GPU, driver and
runtime versions a figure belongs to; :func:`write_report` writes the JSON (everything measured) and the
markdown (the tables of docs/benchmarks.md) and prints the markdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank on the sorted values; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(samples_s: list[float]) -> dict[str, float]:
    """Median, p99 and mean in ms, fps (1000 / mean ms) and the count of a list of durations in seconds."""
    ms = [s * 1000.0 for s in samples_s]
    mean = statistics.fmean(ms)
    return {
        "median_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": mean,
        "fps": 1000.0 / mean,
        "frames": len(ms),
    }


def timestamp() -> str:
    """The date and time a run started, as the reports print it (``2026-12-04 13:00 UTC``)."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> list[float]:
    """The 1/5/15-minute load average, rounded: on a shared machine it says how much a figure is worth."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_description(device: torch.device) -> dict[str, str | int]:
    """CPU model and count, torch threads and version, the device, and on a GPU its name, CUDA, memory and
    driver; the onnxruntime and TensorRT versions where installed."""
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
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["driver"] = _nvidia_driver()
    for mod in ("onnxruntime", "tensorrt"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


def _nvidia_driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(
    data: Any,
    markdown: str,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    echo: bool = True,
) -> None:
    """Write ``data`` as JSON and ``markdown`` as text where asked (creating the folders), and print the
    markdown unless ``echo`` is off (a harness that printed its lines as it measured)."""
    for path, text in ((json_path, lambda: json.dumps(data, indent=2)), (markdown_path, lambda: markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text())
    if echo:
        print(markdown)
