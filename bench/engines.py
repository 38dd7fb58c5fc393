"""The models the benchmarks time and the engines they run them on, built one way for every harness.

- Models: a checkpoint (:func:`checkpoint_model`) or a preset with random weights (:func:`preset_model`,
  seeded: the cost of a forward pass does not depend on the weights, and the same seed gives the same
  weights, so a kept export stays valid).
- Cache key: :attr:`BenchModel.key`, made by :func:`dagan.helpers.cache_key` from the checkpoint's
  :func:`~dagan.helpers.file_sha256` or from what determines a random preset (name, seed, config, torch
  version) — the scheme the engine's own export caches use. :func:`workdir` keeps a benchmark's exports
  under it, so a rerun with ``--workdir`` reuses them and another model never does.
- Engines: :func:`engine.create_engine` for every backend. The torch rows run the in-memory model; the
  graph rows run export folders prepared here (the plain export, the CPU graph with all or one of its
  rewrites, their int8 copies), because the benchmark compares variants the service itself never picks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan.checkpoint import load_model
from dagan.config import load_config
from dagan.helpers import cache_key, file_sha256
from dagan.model import DaGAN
from engine import create_engine
from engine.base import Engine

#: The seed of every randomly initialised preset.
SEED = 0


@dataclass
class BenchModel:
    """A model to time, the label the reports give it, and the key of its weights (:func:`workdir`)."""

    label: str
    model: DaGAN
    key: str


def checkpoint_model(path: str | Path, label: str | None = None) -> BenchModel:
    path = Path(path)
    return BenchModel(label or f"checkpoint {path}", load_model(path), cache_key(file_sha256(path)))


def preset_model(name: str, label: str | None = None) -> BenchModel:
    torch.manual_seed(SEED)
    model = DaGAN(load_config(name))
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    key = cache_key("random-init", name, SEED, config, torch.__version__, label=name)
    return BenchModel(label or f"preset {name} (random init)", model, key)


@contextlib.contextmanager
def workdir(model: BenchModel, root: str | Path | None) -> Iterator[Path]:
    """Where the exports of a benchmark live: a temporary folder, or ``root/<key of the weights>`` kept
    between runs (so only the same model reuses it)."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix="dagan-bench-") as tmp:
            yield Path(tmp)
        return
    path = Path(root) / model.key
    path.mkdir(parents=True, exist_ok=True)
    yield path


def torch_engine(model: DaGAN, device: str, precision: str = "fp32", **options: Any) -> Engine:
    """The torch engine on an in-memory model; for another precision on a copy (the engine casts its
    model in place, and the other rows need the fp32 weights)."""
    if precision != "fp32":
        model = copy.deepcopy(model)
    return create_engine(model, backend="torch", device=device, precision=precision, **options)


def calibration_clips(size: int, clips: Sequence[str | Path] | None) -> tuple[list, str]:
    """Calibration material for an int8 row: real face clips (files or folders) when given, else four
    random frames — latency does not depend on the ranges calibration picks, only the output quality
    does, and quality is measured elsewhere (docs/export.md)."""
    from export.quantize import FaceClip, face_clips, find_clips

    if clips:
        found = face_clips(find_clips(list(clips)), size, frames_per_clip=2)
        return found, f"{sum(len(c.drivers) for c in found)} real frames"
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    return [FaceClip("random", frames[0], list(frames[1:]))], "4 random frames (latency only)"


#: The optional steps of the int8 recipe (export/quantize.py) that ``dagan bench --passes`` times
#: without, one at a time: what each buys.
INT8_STEPS = ("quantize_before_resize",)


def variant_engine(
    model: DaGAN,
    backend: str,
    precision: str,
    options: dict[str, Any],
    device: str,
    work: Path,
    threads: int | None = None,
    calib: Sequence[str | Path] | None = None,
    max_batch: int = 32,
) -> Engine:
    """One benchmark row's engine. ``options``: the torch backend's own (``channels_last``,
    ``cuda_graphs``), or for onnxruntime ``cpu_graph`` (True: every rewrite of export/optimize.py; a pass
    name: that one alone), ``int8_without`` (the int8 recipe without one of :data:`INT8_STEPS`) and
    ``parallel`` (a batch split into that many concurrent calls). The exports are made in ``work`` on
    first use."""
    if backend == "torch":
        return torch_engine(model, device, precision, **options)
    onnx_dir = work / "onnx"
    if not (onnx_dir / "manifest.json").is_file():
        from export.onnx_export import export_model

        export_model(model, onnx_dir, progress=False)
    if backend == "tensorrt":
        return create_engine(
            onnx_dir,
            backend="tensorrt",
            device=device,
            precision=precision,
            max_batch=max_batch,
            cache_dir=work,
        )
    if options.get("cpu_graph"):
        from export.optimize import PASSES, optimize_export

        only = options["cpu_graph"]
        cpu_dir = work / ("onnx-cpu" if only is True else f"onnx-cpu-{only}")
        if not (cpu_dir / "manifest.json").is_file():
            optimize_export(onnx_dir, cpu_dir, PASSES if only is True else [only])
        onnx_dir = cpu_dir
    if precision == "int8":
        from export.quantize import quantize_export

        without = options.get("int8_without")
        if without is not None and without not in INT8_STEPS:
            raise ValueError(f"int8_without must be one of {', '.join(INT8_STEPS)}, got {without!r}")
        int8_dir = onnx_dir.parent / (f"{onnx_dir.name}-int8" + (f"-without-{without}" if without else ""))
        if not (int8_dir / "manifest.json").is_file():
            clips, _ = calibration_clips(model.config.image_size, calib)
            quantize_export(
                onnx_dir,
                int8_dir,
                clips,
                keep_float=("kp_detector",),
                before_resize=without != "quantize_before_resize",
                progress=False,
            )
        onnx_dir = int8_dir
    extra = {"parallel": options["parallel"]} if options.get("parallel", 1) > 1 else {}
    return create_engine(
        onnx_dir, backend="onnxruntime", device=device, precision=precision, threads=threads, **extra
    )
