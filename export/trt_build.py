"""Build FP16 TensorRT engines from the ONNX export (TensorRT 10 Python API), and the engine-file format.

Everything that decides *what* is built lives in pure functions here (optimisation profiles, cache keys,
the engine-file header, the compatibility check) and is tested without TensorRT; the TensorRT calls are a
thin layer (:func:`build_engine`) that takes the ``tensorrt`` module as an argument, so tests drive it with
a fake and the real module is imported only when a build runs.

Engine file (``<graph>.engine``): ``MAGIC``, a 4-byte little-endian header length, a JSON header
(:class:`EngineMeta`: TensorRT version, GPU name and compute capability, precision, batch profile, I/O
specs, the ONNX file's SHA-256) and then TensorRT's serialized plan. A plan only runs on the GPU model and
TensorRT version it was built with, so loading checks the header first and fails with an
:class:`EngineMismatchError` that says what to rebuild, instead of TensorRT's own opaque deserialisation
error; the serving code catches it and rebuilds.

grid_sample maps to TensorRT's native GridSample layer (the ONNX parser handles opset-16 GridSample since
TensorRT 8.5), so no plugin is needed.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dagan.checkpoint import atomic_write
from dagan.errors import UserError
from dagan.graph_contract import copy_lid_reader, read_manifest
from dagan.helpers import cache_key as _cache_key
from dagan.helpers import file_sha256

MAGIC = b"DAGANTRT\x01\n"
ENGINE_MANIFEST = "engines.json"
TIMING_CACHE = "timing.cache"
MAX_BATCH_LIMIT = 256


class TRTBuildError(UserError, RuntimeError):
    """A TensorRT build that cannot run (TensorRT missing, no GPU, parse or build failure)."""


class EngineMismatchError(UserError, RuntimeError):
    """An engine file built for another GPU or TensorRT version (or not an engine file at all)."""


@dataclasses.dataclass(frozen=True)
class EngineMeta:
    """What an engine file was built for and from (stored in its header)."""

    graph: str
    tensorrt: str
    gpu: str
    compute_capability: str
    fp16: bool
    max_batch: int
    opt_batch: int
    onnx_sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profiles: dict[str, list[list[int]]]
    built_at: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> EngineMeta:
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(EngineMeta)}
        return EngineMeta(**{k: v for k, v in data.items() if k in fields})


def check_batch_profile(max_batch: int, opt_batch: int | None = None) -> tuple[int, int]:
    """Validate a build's batch profile (max_batch, opt_batch); opt defaults to the largest power of two
    ≤ min(max_batch, 8), the batch a multi-stream server runs most (TensorRT tunes kernels for ``opt``,
    runs all of 1..max). Not to be confused with :func:`engine.base.check_batch` (sessions vs frames)."""
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise TRTBuildError(f"--max-batch must be in 1..{MAX_BATCH_LIMIT}, got {max_batch}")
    if opt_batch is None:
        opt_batch = 1 << (min(max_batch, 8).bit_length() - 1)
    if not 1 <= opt_batch <= max_batch:
        raise TRTBuildError(f"opt batch must be in 1..{max_batch}, got {opt_batch}")
    return max_batch, opt_batch


def profile_shapes(
    inputs: list[dict[str, Any]], max_batch: int, opt_batch: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """One optimisation profile: for each input, (min, opt, max) shapes with batch 1, opt, max."""
    out = {}
    for spec in inputs:
        shape = spec["shape"]
        if shape[0] != "batch" or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise TRTBuildError(
                f"input {spec['name']!r} has shape {shape}; only the batch axis may be dynamic"
            )
        rest = tuple(shape[1:])
        out[spec["name"]] = ((1, *rest), (opt_batch, *rest), (max_batch, *rest))
    return out


def cache_key(onnx_sha256: str, gpu: str, tensorrt: str, fp16: bool, max_batch: int, opt_batch: int) -> str:
    """Directory name for a set of engines (:func:`dagan.helpers.cache_key`): changes with the weights,
    GPU model, TensorRT version, precision or batch profile — the things that make a cached plan
    unusable or different."""
    return _cache_key(onnx_sha256, gpu, tensorrt, fp16, max_batch, opt_batch)


def write_engine_file(path: str | Path, meta: EngineMeta, plan: bytes) -> None:
    header = meta.to_json().encode()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(plan)

    atomic_write(path, write)


def read_engine_header(path: str | Path) -> tuple[EngineMeta, int]:
    """(meta, offset of the plan) without reading the plan."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise EngineMismatchError(
                f"{path} is not a dagan TensorRT engine file; rebuild with `dagan export trt`"
            )
        (n,) = struct.unpack("<I", head[len(MAGIC) :])
        try:
            meta = EngineMeta.from_json(f.read(n).decode())
        except (ValueError, TypeError) as exc:
            raise EngineMismatchError(
                f"{path} has a damaged header ({exc}); rebuild with `dagan export trt`"
            ) from exc
    return meta, len(MAGIC) + 4 + n


def read_engine_file(path: str | Path) -> tuple[EngineMeta, bytes]:
    meta, offset = read_engine_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return meta, f.read()


def check_compatible(meta: EngineMeta, gpu: str, tensorrt: str, path: str | Path = "engine") -> None:
    """Raise :class:`EngineMismatchError` unless ``meta`` was built for this GPU and TensorRT version."""
    problems = []
    if meta.gpu != gpu:
        problems.append(f"GPU {meta.gpu!r} (this is {gpu!r})")
    if meta.tensorrt != tensorrt:
        problems.append(f"TensorRT {meta.tensorrt} (this is {tensorrt})")
    if problems:
        raise EngineMismatchError(
            f"{path} was built for {' and '.join(problems)}; TensorRT plans only run where they were built — "
            "rebuild with `dagan export trt` (the service rebuilds automatically)"
        )


# -- the TensorRT layer --------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise TRTBuildError(
            "TensorRT is not installed (it is not on PyPI's default index): use NVIDIA's TensorRT container "
            "or pip install tensorrt from pypi.nvidia.com"
        ) from exc
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability) of the current CUDA device, via torch."""
    import torch

    if not torch.cuda.is_available():
        raise TRTBuildError("building or running TensorRT engines needs a CUDA GPU; none is visible")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


class _Progress:
    """Adapter from TensorRT's IProgressMonitor callbacks to a tqdm bar per build phase."""

    def __init__(self, trt: Any, desc: str, enabled: bool) -> None:
        self.bars: dict[str, tqdm] = {}
        self.desc = desc
        self.enabled = enabled
        base = getattr(trt, "IProgressMonitor", None)
        self.monitor = None
        if base is not None and enabled:
            outer = self

            class Monitor(base):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    base.__init__(self)

                def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                    outer.bars[phase_name] = tqdm(
                        total=num_steps, desc=f"{outer.desc}: {phase_name}", leave=False
                    )

                def step_complete(self, phase_name: str, step: int) -> bool:
                    if phase_name in outer.bars:
                        outer.bars[phase_name].update(1)
                    return True

                def phase_finish(self, phase_name: str) -> None:
                    bar = outer.bars.pop(phase_name, None)
                    if bar is not None:
                        bar.close()

            self.monitor = Monitor()


def build_engine(
    trt: Any,
    onnx_path: Path,
    entry: dict[str, Any],
    fp16: bool,
    max_batch: int,
    opt_batch: int,
    timing_cache: bytes | None,
    workspace_bytes: int = 4 << 30,
    progress: bool = False,
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Parse one ONNX graph and build a serialized plan. Returns (plan, timing cache, profile as lists).

    TensorRT 10 API: networks are always explicit-batch; one optimisation profile covers batch 1..max.
    The timing cache from earlier builds is loaded first and returned updated, so rebuilding (another
    graph, another batch limit) skips the kernel timing it has already done.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TRTBuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise TRTBuildError("this GPU has no fast FP16; build without --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _Progress(trt, onnx_path.stem, progress).monitor
    if monitor is not None:
        config.progress_monitor = monitor
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(entry["inputs"], max_batch, opt_batch)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TRTBuildError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    new_cache = bytes(config.get_timing_cache().serialize())
    return bytes(plan), new_cache, {k: [list(s) for s in v] for k, v in shapes.items()}


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    fp16: bool = True,
    max_batch: int = 32,
    opt_batch: int | None = None,
    progress: bool = True,
    trt: Any = None,
    gpu: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """``dagan export trt``: one engine per graph of the ONNX export, plus ``engines.json``.

    ``trt`` and ``gpu`` (name, compute capability) are looked up when not given; tests pass fakes.
    """
    max_batch, opt_batch = check_batch_profile(max_batch, opt_batch)
    trt = trt or import_tensorrt()
    gpu_name, capability = gpu or gpu_identity()
    manifest = read_manifest(onnx_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / TIMING_CACHE
    timing = cache_path.read_bytes() if cache_path.is_file() else None
    engines: dict[str, Any] = {}
    graphs = [g for g in manifest["graphs"] if g != "generator"]  # the frame graph contains the generator
    for graph in tqdm(graphs, desc="build tensorrt", unit="engine", disable=not progress):
        entry = manifest["graphs"][graph]
        onnx_path = Path(onnx_dir) / entry["file"]
        t0 = time.perf_counter()
        plan, timing, profiles = build_engine(
            trt, onnx_path, entry, fp16, max_batch, opt_batch, timing, progress=progress
        )
        atomic_write(cache_path, lambda p, data=timing: Path(p).write_bytes(data))
        meta = EngineMeta(
            graph=graph,
            tensorrt=str(trt.__version__),
            gpu=gpu_name,
            compute_capability=capability,
            fp16=fp16,
            max_batch=max_batch,
            opt_batch=opt_batch,
            onnx_sha256=file_sha256(onnx_path),
            inputs=entry["inputs"],
            outputs=entry["outputs"],
            profiles=profiles,
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        write_engine_file(out / f"{graph}.engine", meta, plan)
        engines[graph] = {"file": f"{graph}.engine", "build_s": round(time.perf_counter() - t0, 1)}
    result = {
        "format": "dagan-tensorrt",
        "tensorrt": str(trt.__version__),
        "gpu": gpu_name,
        "compute_capability": capability,
        "fp16": fp16,
        "max_batch": max_batch,
        "opt_batch": opt_batch,
        "image_size": manifest["image_size"],
        "checkpoint_sha256": manifest.get("checkpoint_sha256"),
        "onnx_dir": str(Path(onnx_dir).resolve()),
        "config": manifest["config"],
        "onnx_graphs": manifest["graphs"],
        "engines": engines,
    }
    if manifest.get("lid_reader"):  # run in torch beside the engines (engine/hot_path.py, step 6)
        copy_lid_reader(onnx_dir, out, manifest)
        result["lid_reader"] = manifest["lid_reader"]
    atomic_write(out / ENGINE_MANIFEST, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    return result


def read_engine_manifest(engine_dir: str | Path) -> dict[str, Any]:
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_dir} has no {ENGINE_MANIFEST}: build engines with `dagan export trt`"
        )
    data = json.loads(path.read_text())
    if data.get("format") != "dagan-tensorrt":
        raise EngineMismatchError(f"{path} is not a dagan TensorRT engine manifest")
    return data
