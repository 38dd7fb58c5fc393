"""Inference runtime: one :class:`~engine.base.Engine` API over interchangeable backends.

Backends: ``torch`` (reference; CPU/CUDA, fp32/fp16, channels_last, CUDA graphs), ``onnxruntime`` (the
exported graphs on the CPU, CUDA or TensorRT execution providers) and ``tensorrt`` (FP16 engines built
from the exported graphs). ``auto`` takes the fastest one that works here.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .base import Engine, EngineError, FrameResult, Session

if TYPE_CHECKING:
    from dagan.model import DaGAN

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def available_backends(path: str | Path | None = None) -> list[str]:
    """Backends usable here for ``path``, fastest first — what ``auto`` tries in order.

    A backend counts as available when its runtime is installed *and* its artefacts exist: ``auto`` never
    starts a minutes-long TensorRT build or an ONNX export on its own. So: ``tensorrt`` for an engine
    directory on a GPU; ``onnxruntime`` for an ONNX export directory or a checkpoint already exported
    into the cache (``dagan export onnx``, or once with ``backend="onnxruntime"``); ``torch`` for any
    checkpoint. On a GPU the PyTorch backend (fp16 + CUDA graphs) comes before onnxruntime; on the CPU
    onnxruntime comes first (it measured faster per frame than the PyTorch backend; the figures and the
    machine are in docs/benchmarks.md).
    """
    cuda = torch.cuda.is_available()
    p = Path(path) if path is not None else None
    is_dir = p is not None and p.is_dir()
    names = []
    if (
        cuda
        and importlib.util.find_spec("tensorrt") is not None
        and (p is None or (p / "engines.json").is_file())
    ):
        names.append("tensorrt")
    if cuda and not is_dir:
        names.append("torch")
    if importlib.util.find_spec("onnxruntime") is not None and (p is None or _onnx_ready(p)):
        names.append("onnxruntime")
    if not cuda and not is_dir:
        names.append("torch")
    return names


def _onnx_ready(path: Path) -> bool:
    if path.is_dir():
        return (path / "manifest.json").is_file()
    from .onnx_backend import cached_onnx_dir

    return cached_onnx_dir(path) is not None


def create_engine(
    checkpoint: str | Path | DaGAN,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    **options: Any,
) -> Engine:
    """Build an engine for ``checkpoint`` (a .safetensors file; for the graph backends also an ONNX
    export directory, and for ``tensorrt`` an engine directory; or a :class:`~dagan.model.DaGAN` already
    in memory, see below).

    Options are passed to the backend (:func:`backend_options` lists what each accepts): torch
    ``channels_last``/``cuda_graphs``; onnxruntime ``threads``, ``tensorrt_provider``, ``cache_dir``;
    tensorrt ``max_batch``, ``cache_dir``, ``progress``. An option the chosen backend does not take is an
    error, never silently dropped. ``auto`` tries :func:`available_backends` in order, skipping those
    that do not take every given option, passes the options through, and falls back to the next on an
    :class:`EngineError` (for example onnxruntime without a GPU provider on a CUDA machine).

    An in-memory model (the benchmarks' randomly initialised presets, which have no file) runs on the
    torch backend, which ``auto`` means for it: the graph backends need an export, made from a file
    (``dagan export onnx``). The model is used as is: the engine moves and casts it in place, so pass a
    copy to keep the original in fp32.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if isinstance(checkpoint, torch.nn.Module):
        if backend not in ("auto", "torch"):
            raise EngineError(
                f"an in-memory model runs on the torch backend, not {backend!r}: save it and export it "
                "(`dagan export onnx`) for the graph backends"
            )
        backend = "torch"
    if backend != "auto":
        unknown = sorted(set(options) - backend_options(backend))
        if unknown:
            raise EngineError(
                f"backend {backend!r} takes no option {', '.join(unknown)}; "
                f"it takes: {', '.join(sorted(backend_options(backend))) or 'none'}"
            )
        return _create(backend, checkpoint, device, precision, dict(options))
    errors = []
    for name in available_backends(checkpoint):
        unknown = sorted(set(options) - backend_options(name))
        if unknown:
            errors.append(f"{name}: takes no option {', '.join(unknown)}")
            continue
        try:
            return _create(name, checkpoint, device, precision, dict(options))
        except EngineError as exc:
            errors.append(f"{name}: {exc}")
    raise EngineError("no backend could be created: " + "; ".join(errors))


def backend_options(backend: str) -> set[str]:
    """The keyword options ``create_engine`` passes to ``backend`` (read from its constructor, so this
    list cannot drift from the code)."""
    if backend == "torch":
        from .torch_backend import TorchEngine

        fn, fixed = TorchEngine.__init__, {"self", "model", "device", "precision"}
        return set(inspect.signature(fn).parameters) - fixed
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeEngine

        params = set(inspect.signature(OnnxRuntimeEngine.__init__).parameters)
        return (params - {"self", "onnx_dir", "device", "precision"}) | {"cache_dir", "progress"}
    if backend == "tensorrt":
        from .trt_backend import TensorRTEngine

        params = set(inspect.signature(TensorRTEngine.from_path).parameters)
        return params - {"cls", "path", "device", "precision", "trt", "gpu"}
    raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def _create(
    backend: str, checkpoint: str | Path | DaGAN, device: str, precision: str, options: dict
) -> Engine:
    if backend == "torch":
        from .torch_backend import TorchEngine

        if isinstance(checkpoint, torch.nn.Module):
            return TorchEngine(checkpoint, device=device, precision=precision, **options)
        if Path(checkpoint).is_dir():
            raise EngineError("the torch backend needs a .safetensors checkpoint, not an export directory")
        return TorchEngine.from_checkpoint(checkpoint, device=device, precision=precision, **options)
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise EngineError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime)")
        from .onnx_backend import (
            OnnxRuntimeEngine,
            _ort_device,
            cpu_onnx_dir_for,
            int8_onnx_dir_for,
            onnx_dir_for,
        )

        cache, progress = options.pop("cache_dir", None), bool(options.pop("progress", False))
        if Path(checkpoint).is_file() and precision in ("fp32", "int8") and _ort_device(device).type == "cpu":
            # weights on the CPU: the frame graph rewritten for the CPU provider (export/optimize.py, the
            # same function), and for int8 its quantized copy, each prepared once and cached
            prepare = int8_onnx_dir_for if precision == "int8" else cpu_onnx_dir_for
            onnx_dir = prepare(checkpoint, cache, progress=progress)
        else:
            onnx_dir = onnx_dir_for(checkpoint, cache, progress=progress)
        return OnnxRuntimeEngine(onnx_dir, device=device, precision=precision, **options)
    from .trt_backend import TensorRTEngine

    return TensorRTEngine.from_path(checkpoint, device=device, precision=precision, **options)


__all__ = [
    "BACKENDS",
    "Engine",
    "EngineError",
    "FrameResult",
    "Session",
    "available_backends",
    "backend_options",
    "create_engine",
]
