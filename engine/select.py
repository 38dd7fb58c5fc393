"""The engine a command runs by default: on a CPU, the fastest backend and precision that holds quality.

``dagan serve``, ``dagan cam``, ``dagan animate`` and ``python -m bench.server`` all call
:func:`default_engine`, so the benchmark measures what the service runs. With ``--backend`` or
``--precision`` given, that is what runs. Otherwise, on a CPU with trained weights:

1. **onnxruntime int8** when the int8 copy's avatar frames stay within :data:`INT8_MIN_PSNR_DB` of the
   fp32 engine's on held-out faces (measured when the copy is made and kept in its manifest; the bound
   and the eval table behind it are in docs/export.md);
2. else **torch bf16** where the CPU has native bf16 (AVX-512 BF16 / AMX);
3. else **onnxruntime fp32**.

Both onnxruntime variants run the frame graph rewritten for the CPU provider (:mod:`export.optimize`).
The order is the measured one (docs/benchmarks.md: on the project's 2-core AVX2 CPU, per frame, int8 on
the CPU graph 42 ms < fp32 on the CPU graph 47 < plain onnxruntime fp32 72 < torch fp32 85; torch bf16
matched plain onnxruntime int8 on the AVX-512 machine where it was measured). The exports are prepared on
first use — ONNX export, CPU graph, int8 calibration on real faces, held-out check: about a minute on two
cores, with progress lines — and cached in ``$DAGAN_CACHE`` keyed by the weights, so later starts take a
second. On a GPU, or for an export directory, ``backend="auto"`` of :func:`engine.create_engine` decides
as before. Untrained (random) weights run on torch fp32: there is nothing worth calibrating.
:func:`split_threads` divides the cores between inference and the media work by their measured costs, and
onnxruntime on a CPU splits a batch of several streams into concurrent calls (:func:`default_parallel`), so
one batch uses every core; a lone stream's frame runs on all of those cores' intra-op threads instead
(engine/onnx_backend.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import Engine, EngineError

#: int8 is the default only while its avatar frames are at least this close to fp32's (mean PSNR over
#: the held-out check frames). At 35 dB the int8 error (RMS 4.5/255) adds about 0.1 dB to the model's
#: own ~20 dB error against the real frames (if independent: 20·log10(√(25.5² + 4.5²) / 25.5) = 0.13 dB);
#: docs/export.md has the eval table at the measured values.
INT8_MIN_PSNR_DB = 35.0
#: Server CPU per stream-frame of everything but inference (decode, convert, detect, crop, compose,
#: encode, WebRTC) on a quiet 2-core machine with the server's defaults (detection on every 3rd frame):
#: 9.2 ms measured with the zero-cost engine by ``python -m bench.server`` (docs/benchmarks.md). What
#: :func:`split_threads` weighs the inference cost against.
MEDIA_MS_PER_FRAME = 9.0


@dataclass
class EngineChoice:
    """What :func:`default_engine` chose and why (the start-up line is :meth:`describe`)."""

    backend: str
    precision: str
    reason: str
    threads: int | None = None
    parallel: int = 1  # concurrent calls a batch of several streams is split into (onnxruntime, CPU)
    frame_ms: float | None = None  # measured per-frame time of the chosen engine, batch 1
    frame_threads: int = 1  # the inference threads frame_ms was measured on
    quality: dict[str, Any] = field(default_factory=dict)
    prepared_s: float = 0.0  # time spent preparing exports in this process (0: all cached)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"

    def describe(self) -> str:
        parts = [self.label]
        if self.threads:
            parts.append(f"{self.threads} inference thread{'s' if self.threads > 1 else ''}")
        if self.parallel > 1:
            parts.append(f"a batch of streams split into {self.parallel} parallel calls")
            if self.threads:
                parts.append(f"a lone stream on {self.threads * self.parallel} threads")
        if self.frame_ms:
            plural = "s" if self.frame_threads > 1 else ""
            parts.append(
                f"{self.frame_ms:.1f} ms/frame on {self.frame_threads} thread{plural} measured at start"
            )
        return f"{', '.join(parts)} — {self.reason}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineChoice:
        """The choice :meth:`as_dict` wrote (e.g. sent by a server process to the benchmark)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "reason": self.reason,
            "threads": self.threads,
            "parallel": self.parallel,
            "frame_ms": self.frame_ms,
            "frame_threads": self.frame_threads,
            "quality": self.quality,
        }


def cpu_cores() -> int:
    """Cores this process may use (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def split_threads(cores: int, infer_ms: float | None, media_ms: float = MEDIA_MS_PER_FRAME) -> int:
    """Inference threads out of ``cores``, in proportion to the measured CPU cost of a frame's inference
    (``infer_ms``, one thread) against its media work (``media_ms``); at least one core is left to the
    media pool when there are two or more. With no measurement: half the cores.

    On the project's 2-core machine (inference 30–45 ms, media ~9 ms per stream-frame) this gives 1
    inference thread per call, which the server sweeps in docs/benchmarks.md measured ahead of 2 for two
    and three streams; a lone stream, which has no sibling call to share the cores with, runs on both
    (:func:`default_parallel`, engine/onnx_backend.py: 24.6 against 18.7 fps).
    """
    if cores <= 1:
        return 1
    if not infer_ms or infer_ms <= 0:
        return max(1, cores // 2)
    share = infer_ms / (infer_ms + max(media_ms, 0.0))
    return int(min(cores - 1, max(1, int(cores * share))))


def default_parallel(cores: int, threads: int) -> int:
    """Concurrent calls a batch of streams is split into, for onnxruntime on a CPU: one per group of
    ``threads`` cores, so one batch keeps every core busy. On the project's 2-core machine (1 inference
    thread) that is 2: a batch of two int8 frames in 27.4 ms against 50.5 ms as one call and 39.5 ms on
    two intra-op threads (`dagan bench --parallel 2`, docs/benchmarks.md, with the server sweep that
    chose it). A batch of one (a single stream) is one call on ``threads × parallel`` intra-op threads,
    every core these calls would use (engine/onnx_backend.py)."""
    return max(1, cores // max(1, threads))


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 / AMX): without it torch emulates bf16,
    slower than fp32, so neither the policy above nor the benchmark's bf16 row should use it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def _is_untrained(checkpoint: Path) -> bool:
    from dagan.checkpoint import checkpoint_metadata

    try:
        return checkpoint_metadata(checkpoint).get("trained") == "false"
    except Exception:  # a bad file fails later with the loader's own message
        return False


def _progress_printer(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None


def time_engine(engine: Engine, frames: int = 12, warmup: int = 3) -> float:
    """Median wall ms of one batch-1 frame (a random source and drivers; cost does not depend on them)."""
    size = engine.image_size
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    drivers = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    session = engine.new_session(source)
    samples = []
    for i in range(warmup + frames):
        t0 = time.perf_counter()
        engine.animate_batch([session], [drivers[i % 3]])
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def choose_cpu(
    checkpoint: Path, progress: Callable[[str], None], cache_dir: str | Path | None = None
) -> EngineChoice:
    """The CPU policy of the module docstring, for a trained checkpoint file; prepares (or finds) the
    int8 export and reads its held-out quality. Never raises for a failed preparation: it falls back."""
    import importlib.util

    bf16 = cpu_has_bf16()
    if importlib.util.find_spec("onnxruntime") is None:
        precision = "bf16" if bf16 else "fp32"
        return EngineChoice("torch", precision, "onnxruntime is not installed")
    from dagan.graph_contract import read_manifest

    from .onnx_backend import cached_int8_dir, default_cache_dir, int8_onnx_dir_for

    t0 = time.perf_counter()
    try:
        int8_dir = cached_int8_dir(checkpoint, cache_dir)
        if int8_dir is None:
            progress(
                f"preparing the CPU engines for {checkpoint.name} (first start with these weights only; "
                f"cached in {cache_dir or default_cache_dir()}): ONNX export, CPU graph, int8 calibration "
                "and a held-out check, about a minute …"
            )
            int8_dir = int8_onnx_dir_for(checkpoint, cache_dir, progress=True)
            progress(f"prepared in {time.perf_counter() - t0:.0f} s")
        quality = read_manifest(int8_dir).get("quality") or {}
    except Exception as exc:  # an export or a calibration that fails must not stop the service
        progress(f"could not prepare the int8 engine ({type(exc).__name__}: {exc}); trying fp32")
        quality = {}
    prepared = time.perf_counter() - t0
    psnr = quality.get("psnr_db")
    held = f"{psnr:.1f} dB from fp32 on {quality.get('frames')} held-out frames" if psnr is not None else ""
    if psnr is not None and psnr >= INT8_MIN_PSNR_DB:
        reason = f"fastest that holds quality here: int8 frames {held} (bound ≥ {INT8_MIN_PSNR_DB:g} dB)"
        return EngineChoice("onnxruntime", "int8", reason, quality=quality, prepared_s=prepared)
    why = f"int8 {held} misses the ≥ {INT8_MIN_PSNR_DB:g} dB bound" if held else "no int8 export"
    if bf16:
        return EngineChoice("torch", "bf16", f"{why}; this CPU has native bf16", quality=quality)
    reason = f"{why}; no native bf16 on this CPU; fp32 on the CPU graph (faster than torch fp32)"
    return EngineChoice("onnxruntime", "fp32", reason, quality=quality, prepared_s=prepared)


def default_engine(
    checkpoint: str | Path,
    backend: str = "auto",
    device: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    progress: bool | Callable[[str], None] = True,
    measure: bool = True,
    cache_dir: str | Path | None = None,
    parallel: int | None = None,
) -> tuple[Engine, EngineChoice]:
    """The engine for ``checkpoint`` as the commands run it, and why (see the module docstring).

    ``threads``: inference threads on a CPU (onnxruntime's intra-op threads, or torch's, which are
    process-wide); None: the chosen engine is timed on one thread (``measure``) and the cores are split
    by :func:`split_threads`. ``parallel``: concurrent calls a batch is split into (onnxruntime on a CPU
    only); None: :func:`default_parallel`.
    """
    from .base import resolve_device

    say = _progress_printer(progress)
    path = Path(checkpoint)
    cpu = resolve_device(device).type == "cpu"
    explicit = backend != "auto" or precision is not None
    if explicit or not cpu or path.is_dir() or not path.is_file() or _is_untrained(path):
        if explicit:
            reason = "as asked (--backend/--precision)"
        elif not cpu:
            reason = "on a GPU: the fastest backend available here"
        elif path.is_dir():
            reason = "an export directory: the backend that runs it"
        else:
            reason = "untrained weights: no export prepared for them"
        exported = _export_precision(path) if path.is_dir() else "fp32"
        choice = EngineChoice(backend, precision or exported, reason)
    else:
        choice = choose_cpu(path, say, cache_dir)
    trial = threads or 1
    # the split below weighs one frame's cost on ``trial`` threads: timed as one call with no parallel
    # sessions (with them a lone frame runs on every inference core, engine/onnx_backend.py)
    trial_parallel = (
        1 if not cpu or (measure and threads is None) else parallel or default_parallel(cpu_cores(), trial)
    )
    try:
        engine = _create(path, choice, device, trial if cpu else None, cache_dir, trial_parallel)
    except Exception as exc:
        if explicit or not cpu:
            raise
        say(f"could not start {choice.label} ({type(exc).__name__}: {exc}); using torch fp32")
        choice = EngineChoice("torch", "fp32", f"{choice.label} failed to start ({type(exc).__name__})")
        engine = _create(path, choice, device, trial, cache_dir, trial_parallel)
    choice.backend = engine.backend
    choice.precision = getattr(engine, "precision", choice.precision)
    if not cpu:
        return engine, choice
    if measure:
        choice.frame_ms, choice.frame_threads = time_engine(engine), trial
    if threads is None:
        threads = split_threads(cpu_cores(), choice.frame_ms)
    parallel = (parallel or default_parallel(cpu_cores(), threads)) if engine.backend == "onnxruntime" else 1
    if threads != trial or parallel != getattr(engine, "parallel", 1):
        engine = _create(path, choice, device, threads, cache_dir, parallel)
    choice.threads, choice.parallel = threads, parallel
    return engine, choice


def _create(
    path: Path, choice: EngineChoice, device: str, threads: int | None, cache_dir: Any, parallel: int = 1
) -> Engine:
    """``create_engine`` for a choice, with its inference threads (onnxruntime's per session; torch's are
    the process's, set here) and, for onnxruntime, its parallel calls."""
    from . import create_engine

    opts: dict[str, Any] = {}
    if choice.backend == "onnxruntime" and threads:
        opts["threads"] = threads
    if choice.backend == "onnxruntime" and parallel > 1:
        opts["parallel"] = parallel
    if choice.backend == "onnxruntime" and cache_dir is not None:
        opts["cache_dir"] = cache_dir
    import torch

    if choice.backend in ("torch", "auto") and threads:
        torch.set_num_threads(threads)
    elif choice.backend == "onnxruntime" and threads:
        # torch only converts images around the graphs here: more OpenMP threads would only wake (and
        # spin) for microsecond-sized ops, on the cores the media work needs
        torch.set_num_threads(1)
    return create_engine(path, backend=choice.backend, device=device, precision=choice.precision, **opts)


def _export_precision(path: Path) -> str:
    from dagan.graph_contract import read_manifest

    try:
        return read_manifest(path).get("precision", "fp32")
    except Exception:
        return "fp32"


__all__ = [
    "INT8_MIN_PSNR_DB",
    "MEDIA_MS_PER_FRAME",
    "EngineChoice",
    "EngineError",
    "cpu_cores",
    "cpu_has_bf16",
    "default_engine",
    "default_parallel",
    "split_threads",
    "time_engine",
]
