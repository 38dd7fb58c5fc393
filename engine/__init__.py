"""Inference runtime: one :class:`~engine.base.Engine` API over interchangeable backends."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError, FrameResult, Session

BACKENDS = ("auto", "torch")


def create_engine(
    checkpoint: str | Path, backend: str = "auto", device: str = "auto", precision: str = "fp32"
) -> Engine:
    """Build an engine for ``checkpoint``. ``auto`` picks the fastest backend available here.

    Only the PyTorch backend exists so far; ONNX Runtime and TensorRT backends plug in here.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    from .torch_backend import TorchEngine

    return TorchEngine.from_checkpoint(checkpoint, device=device, precision=precision)


__all__ = ["BACKENDS", "Engine", "EngineError", "FrameResult", "Session", "create_engine"]
