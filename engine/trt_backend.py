"""TensorRT backend: the engines built by ``dagan export trt``, run with pre-allocated device buffers.

Per graph, the output buffers are allocated once for the engine's max batch (torch CUDA tensors, so the
same on-device pre/post-processing as the other backends applies) and a call binds the first B rows of
each — the batch axis is outermost, so those rows are contiguous. Inputs are bound in place (no copy).
Work runs on a dedicated CUDA stream ordered against torch's current stream, so nothing synchronises the
host until the output image is downloaded. Batches larger than the engine's max are split.

Engine files carry the GPU and TensorRT version they were built for (:mod:`export.trt_build`); a
mismatch is an :class:`~export.trt_build.EngineMismatchError`, on which :meth:`TensorRTEngine.from_path`
rebuilds from the ONNX export recorded in the engine manifest.

The ``tensorrt`` module is imported lazily and can be injected (``trt=``) so the binding logic is tested on
the CPU with a fake; nothing here has run against real TensorRT in this repository's CI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dagan.graph_contract import read_manifest
from export.trt_build import (
    EngineMeta,
    EngineMismatchError,
    build_engines,
    cache_key,
    check_batch_profile,
    check_compatible,
    gpu_identity,
    import_tensorrt,
    read_engine_file,
    read_engine_manifest,
)

from .base import EngineError, resolve_device
from .onnx_backend import GraphEngine, default_cache_dir, io_shapes, onnx_dir_for


class TRTGraph:
    """One deserialized engine + execution context with its output buffers (batch ≤ ``max_batch``)."""

    def __init__(self, trt: Any, engine: Any, meta: EngineMeta, device: torch.device) -> None:
        self.trt = trt
        self.engine = engine
        self.meta = meta
        self.device = device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        want_in = [s["name"] for s in meta.inputs]
        want_out = [s["name"] for s in meta.outputs]
        if sorted(self.inputs) != sorted(want_in) or sorted(self.outputs) != sorted(want_out):
            raise EngineMismatchError(
                f"engine {meta.graph!r} has I/O {self.inputs} → {self.outputs}, its header says "
                f"{want_in} → {want_out}; rebuild with `dagan export trt`"
            )
        self.input_shapes = {s["name"]: tuple(s["shape"][1:]) for s in meta.inputs}
        self.buffers = {
            name: torch.empty(shape, device=device, dtype=torch.float32)
            for name, shape in io_shapes(meta.outputs, meta.max_batch).items()
        }
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, inputs: Mapping[str, torch.Tensor], copy_outputs: bool) -> dict[str, torch.Tensor]:
        batch = next(iter(inputs.values())).shape[0]
        if batch > self.meta.max_batch:
            parts = [
                self.run({k: v[i : i + self.meta.max_batch] for k, v in inputs.items()}, copy_outputs=True)
                for i in range(0, batch, self.meta.max_batch)
            ]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        keep = []
        for name in self.inputs:
            t = inputs[name]
            if tuple(t.shape[1:]) != self.input_shapes[name]:
                raise EngineError(
                    f"{self.meta.graph}: input {name} has shape {list(t.shape)}, "
                    f"expected [B, {', '.join(map(str, self.input_shapes[name]))}]"
                )
            t = t.to(self.device, torch.float32).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        views = {name: self.buffers[name][:batch] for name in self.outputs}
        for name, view in views.items():
            self.context.set_tensor_address(name, view.data_ptr())
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        else:
            ok = self.context.execute_async_v3(0)
        if not ok:
            raise EngineError(f"TensorRT failed to run the {self.meta.graph} engine at batch {batch}")
        return {k: v.clone() for k, v in views.items()} if copy_outputs else views


class TRTRunner:
    """All engines of one engine directory, checked against this GPU and TensorRT version."""

    def __init__(
        self,
        engine_dir: str | Path,
        device: torch.device,
        trt: Any = None,
        gpu: tuple[str, str] | None = None,
    ) -> None:
        self.trt = trt or import_tensorrt()
        self.device = device
        self.dtype = torch.float32
        self.manifest = read_engine_manifest(engine_dir)
        gpu_name = (gpu or gpu_identity())[0]
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.graphs: dict[str, TRTGraph] = {}
        for graph, entry in self.manifest["engines"].items():
            path = Path(engine_dir) / entry["file"]
            meta, plan = read_engine_file(path)
            check_compatible(meta, gpu_name, str(self.trt.__version__), path)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineMismatchError(
                    f"TensorRT could not deserialize {path}; rebuild with `dagan export trt`"
                )
            self.graphs[graph] = TRTGraph(self.trt, engine, meta, device)
        self.max_batch = int(self.manifest["max_batch"])
        self.fp16 = bool(self.manifest["fp16"])

    def run(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The frame graph's outputs are consumed before the next call; everything else (cached source
        # tensors, reference keypoints) outlives it and gets its own copy.
        return self.graphs[graph].run(inputs, copy_outputs=graph != "frame")


class TensorRTEngine(GraphEngine):
    backend = "tensorrt"

    def __init__(
        self, engine_dir: str | Path, device: str = "auto", trt: Any = None, gpu: Any = None
    ) -> None:
        dev = resolve_device(device)
        if dev.type != "cuda" and trt is None:
            raise EngineError("the tensorrt backend needs a CUDA GPU; use onnxruntime or torch on the CPU")
        runner = TRTRunner(engine_dir, dev, trt=trt, gpu=gpu)
        m = runner.manifest
        manifest = {"image_size": m["image_size"], "config": m["config"], "graphs": m["onnx_graphs"]}
        if m.get("lid_reader"):
            manifest["lid_reader"] = m["lid_reader"]
        super().__init__(manifest, runner, engine_dir)
        self.precision = "fp16" if runner.fp16 else "fp32"
        self.engine_dir = Path(engine_dir)

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: str = "auto",
        precision: str = "fp16",
        max_batch: int = 32,
        cache_dir: str | Path | None = None,
        trt: Any = None,
        gpu: tuple[str, str] | None = None,
        progress: bool = True,
    ) -> TensorRTEngine:
        """Engines for ``path`` — an engine directory, an ONNX export or a checkpoint — building (and
        caching, keyed by weights × GPU × TensorRT version × precision × batch) when needed, and
        rebuilding when an engine directory was built for another GPU or TensorRT version."""
        if precision not in ("fp16", "fp32"):
            raise EngineError(f"precision must be fp16 or fp32, got {precision!r}")
        trt = trt or import_tensorrt()
        gpu = gpu or gpu_identity()
        path = Path(path)
        if (path / "engines.json").is_file():
            try:
                return cls(path, device, trt=trt, gpu=gpu)
            except EngineMismatchError as exc:
                onnx_dir = read_engine_manifest(path).get("onnx_dir")
                if not onnx_dir or not Path(onnx_dir).is_dir():
                    raise
                print(f"dagan: {exc}; rebuilding")
                path = Path(onnx_dir)
        onnx_dir = onnx_dir_for(path, cache_dir, progress=progress)
        onnx_sha = str(read_manifest(onnx_dir).get("checkpoint_sha256") or onnx_dir.resolve())
        max_batch, opt_batch = check_batch_profile(max_batch)
        key = cache_key(onnx_sha, gpu[0], str(trt.__version__), precision == "fp16", max_batch, opt_batch)
        out = Path(cache_dir or default_cache_dir()) / "tensorrt" / key
        if not (out / "engines.json").is_file():
            build_engines(
                onnx_dir, out, precision == "fp16", max_batch, opt_batch, progress, trt=trt, gpu=gpu
            )
        return cls(out, device, trt=trt, gpu=gpu)
