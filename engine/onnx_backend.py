"""ONNX Runtime backend, and the graph-engine logic it shares with the TensorRT backend.

A graph backend runs the exported graphs (:mod:`dagan.graph_contract`): ``source_encoder`` once per
source, and per frame the ``frame`` graph — :func:`dagan.graph_contract.frame_step`, the per-frame
function every backend runs — through the shared hot path (:mod:`engine.hot_path`). Relative motion needs
a reference pose per stream; that is the only time the separate ``depth`` and ``keypoints`` graphs run
(the first frame of a relative stream and after :meth:`~engine.base.Session.reset_reference`), because
the movement scale comes from a convex hull, which is host code. Which frame-graph inputs are a
session's cached source tensors and which are per-stream motion is read from the manifest's input roles.

Pre/post-processing (uint8 HWC ↔ float CHW) is done with torch on the runner's device, as in the PyTorch
backend; on CUDA the ONNX Runtime runner binds torch buffers directly (I/O binding), so a frame moves
only its input image to the device and its output image back.

**Parallel calls** (CPU): a batch of several streams runs as up to ``parallel`` concurrent calls of the
same session on slices of the batch, each on its own thread with its own ``threads`` intra-op threads
(an ``InferenceSession`` may be run from several threads at once, and ``run`` releases the GIL). The
live-128 graphs are many small ops at 32×32 and 64×64, too small to share among intra-op threads: on
the project's 2-core machine a batch of two int8 frames took 50.5 ms as one call on one thread, 39.5 ms
on two intra-op threads and **27.4 ms as two parallel one-thread calls** (`dagan bench --parallel 2`,
docs/benchmarks.md).

**A batch of one** (a lone stream, ``dagan cam``) has no sibling call to run beside it, so with
``parallel`` > 1 it runs on a second session of each graph whose intra-op threads are all of those
cores (``threads × parallel``): the cores the parallel calls would have used. On the 2-core machine one
int8 frame took 29.3–30.5 ms on two threads against 42.6 on one (`dagan bench --threads 1 --parallel
2`), and one server stream went from 18.7 to 24.6 fps (glass-to-glass p50 176 → 133 ms); a batch of two
ran at 35.6 frames/s as one two-thread call against 44.5 as two one-thread calls, which is why a batch
keeps the parallel calls (docs/benchmarks.md, "One stream on every inference core").
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dagan.config import config_from_dict
from dagan.graph_contract import (
    ROLE_CACHED,
    ExportError,
    load_lid_reader,
    names_with_role,
    read_manifest,
    source_keypoints,
)
from dagan.helpers import cache_key, depth_to_images, file_sha256
from dagan.nets.keypoints import Keypoints

from .base import EngineError, Session, resolve_device
from .hot_path import FramePathEngine

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def io_shapes(specs: list[dict[str, Any]], batch: int) -> dict[str, tuple[int, ...]]:
    """Manifest tensor specs (shape with ``"batch"`` first) → concrete shapes for a batch size."""
    out = {}
    for spec in specs:
        shape = spec["shape"]
        if shape[0] != "batch" or not all(isinstance(d, int) for d in shape[1:]):
            raise EngineError(f"tensor {spec['name']!r} has shape {shape}; expected ['batch', int, ...]")
        out[spec["name"]] = (batch, *shape[1:])
    return out


class GraphRunner(Protocol):
    """Runs one named graph on tensors that live on ``device``."""

    device: torch.device
    dtype: torch.dtype

    def run(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class GraphEngine(FramePathEngine):
    """The engine API over a :class:`GraphRunner` and an export manifest."""

    def __init__(
        self, manifest: dict[str, Any], runner: GraphRunner, directory: str | Path | None = None
    ) -> None:
        """``directory``: where the manifest's side files are (its lid reader), if any."""
        super().__init__()
        self.manifest = manifest
        self.runner = runner
        self.device = runner.device
        self.dtype = runner.dtype
        self.image_size = int(manifest["image_size"])
        graphs = manifest["graphs"]
        for needed in ("source_encoder", "frame", "keypoints"):
            if needed not in graphs:
                raise EngineError(f"the export has no {needed!r} graph; re-run `dagan export onnx`")
        self.frame_inputs = [s["name"] for s in graphs["frame"]["inputs"]]
        if any("role" not in s for s in graphs["frame"]["inputs"]):
            # an engine directory built from a version-1 export (TensorRT manifests copy the graphs)
            raise EngineError(
                "this export predates input roles in the manifest; re-run `dagan export onnx` "
                "(and `dagan export trt` for TensorRT engines)"
            )
        self.cached_inputs = names_with_role(graphs["frame"], ROLE_CACHED)
        self.jacobian = "kp_reference_jacobian" in self.frame_inputs
        kp_config = manifest["config"]["keypoints"]
        self.num_kp = int(kp_config["num_kp"])
        if "mouth_gain" in self.frame_inputs:  # an export of a model that names its lip keypoints
            self.mouth_keypoints = tuple(int(k) for k in kp_config["mouth_keypoints"])
            self.mouth_open_gain = float(kp_config["mouth_open_gain"])
        self.kp_inputs = [s["name"] for s in graphs["keypoints"]["inputs"]]
        config = config_from_dict(manifest["config"])
        self.lid_reader = load_lid_reader(directory, manifest, config.blink.keypoints, self.device)
        self._take_config(config)  # the Jacobian gain is also a constant of the frame graph

    def new_session(
        self, source_image: np.ndarray, relative: bool = False, adapt_scale: bool = True
    ) -> Session:
        with torch.inference_mode():
            out = self.runner.run(
                "source_encoder", {"source": self._to_tensor([source_image], "source image")}
            )
        depth = out.get("source_depth")
        depth_vis = depth_to_images(depth)[0] if depth is not None else None
        session = Session(source=out, relative=relative, adapt_scale=adapt_scale, source_depth=depth_vis)
        return self._attach_face(session, source_image)

    def driving_keypoints(self, driving: torch.Tensor) -> Keypoints:
        """B×3×H×W → keypoints via the depth and keypoint graphs (used for relative references)."""
        return self._drive(driving)[0]

    def _drive(self, driving: torch.Tensor) -> tuple[Keypoints, torch.Tensor | None]:
        feed = {"image": driving}
        depth = None
        if "depth" in self.kp_inputs:
            depth = feed["depth"] = self.runner.run("depth", {"image": driving})["depth"]
        out = self.runner.run("keypoints", feed)
        return Keypoints(out["kp_value"], out.get("kp_jacobian")), depth

    def _render(self, feed: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The export's ``generator`` graph, when the runner can run it (ONNX Runtime can; a TensorRT
        engine directory holds only the graphs it built, so it falls back to the fused frame graph)."""
        graph = self.manifest["graphs"].get("generator")
        if graph is None or not getattr(self.runner, "can_run", lambda _: False)("generator"):
            return None
        names = [spec["name"] for spec in graph["inputs"]]
        return self.runner.run("generator", {n: feed[n] for n in names})["prediction"]

    # -- hot-path hooks -----------------------------------------------------------------------------
    def _check_session(self, session: Session) -> None:
        if not isinstance(session.source, dict):
            raise EngineError(f"session was created by another backend; this is the {self.backend} engine")

    def _cached(self, session: Session) -> dict[str, torch.Tensor]:
        return session.source

    def _source_keypoints(self, session: Session) -> Keypoints:
        return source_keypoints(session.source)

    def _detect(self, driving: torch.Tensor) -> Keypoints:
        return self.driving_keypoints(driving)

    def _run_frame(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return self.runner.run("frame", {n: feed[n] for n in self.frame_inputs})


def choose_providers(device: torch.device, available: list[str], tensorrt: bool = False) -> list[str]:
    """Execution providers in preference order for a device (CPU always last as the fallback)."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    wanted = (["TensorrtExecutionProvider"] if tensorrt else []) + ["CUDAExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise EngineError(
            "onnxruntime here has no CUDA execution provider (install onnxruntime-gpu) — use device 'cpu'"
        )
    return [*chosen, "CPUExecutionProvider"]


class OrtRunner:
    """onnxruntime sessions for each graph; numpy hand-off on CPU, torch-buffer I/O binding on CUDA."""

    def __init__(
        self,
        onnx_dir: str | Path,
        manifest: dict[str, Any],
        device: torch.device,
        threads: int | None = None,
        tensorrt: bool = False,
        fp16: bool = False,
        spin: bool = False,
        parallel: int = 1,
    ) -> None:
        import onnxruntime as ort

        if parallel < 1:
            raise EngineError(f"parallel must be at least 1, got {parallel}")
        self.device = device
        # concurrent calls a CPU batch is split into (module docstring); the calling thread makes one
        self.parallel = parallel if device.type == "cpu" else 1
        self._parallel_pool = (
            concurrent.futures.ThreadPoolExecutor(self.parallel - 1, thread_name_prefix="dagan-parallel")
            if self.parallel > 1
            else None
        )
        # CPU seconds the parallel calls spent on their own threads (the caller's thread time misses them)
        self.parallel_cpu_s = 0.0
        self._cpu_lock = threading.Lock()
        self.dtype = torch.float32
        self.manifest = manifest
        self.providers = choose_providers(device, ort.get_available_providers(), tensorrt)

        def options(intra_threads: int | None) -> Any:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if intra_threads:
                opts.intra_op_num_threads = intra_threads
            # Idle intra-op threads spin-wait for the next op by default: on a machine whose other cores
            # decode, track and encode video, that spinning takes their CPU (measured: docs/benchmarks.md).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            return opts

        opts = options(threads)
        # a batch of one runs on every core the parallel calls would use (module docstring)
        self.solo_threads = threads * self.parallel if threads and self.parallel > 1 else None
        solo_opts = options(self.solo_threads) if self.solo_threads else None
        provider_options: list[dict[str, Any]] = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                cache = str(Path(onnx_dir) / "ort-trt-cache")
                provider_options.append(
                    {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}
                )
            elif p == "CUDAExecutionProvider":
                provider_options.append({"device_id": device.index or 0})
            else:
                provider_options.append({})
        self.sessions: dict[str, Any] = {}
        self.solo_sessions: dict[str, Any] = {}
        self._open = lambda entry, solo=False: ort.InferenceSession(
            str(Path(onnx_dir) / entry["file"]),
            solo_opts if solo else opts,
            providers=self.providers,
            provider_options=provider_options,
        )
        for graph, entry in manifest["graphs"].items():
            if graph == "generator":
                # the frame graph contains it; opened on first use (streams with filtered keypoints)
                continue
            self.sessions[graph] = self._open(entry)
        if self.solo_threads:  # the same graphs again for a lone stream (a steadied one runs depth,
            # keypoints and generator instead of frame; a photo is encoded alone): ~0.1 s and 8 MB each
            for graph in list(self.sessions):
                self.solo_sessions[graph] = self._open(manifest["graphs"][graph], solo=True)
        self.provider = self.sessions["frame"].get_providers()[0]

    def can_run(self, graph: str) -> bool:
        return graph in self.manifest["graphs"]

    def _session(self, graph: str, solo: bool = False) -> Any:
        """The graph's session (opened on first use); ``solo``: the one on every inference core."""
        sessions = self.solo_sessions if solo else self.sessions
        if graph not in sessions:
            sessions[graph] = self._open(self.manifest["graphs"][graph], solo)
        return sessions[graph]

    def run(self, graph: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.manifest["graphs"][graph]["outputs"]
        if self.device.type == "cpu":
            feed = {k: v.detach().contiguous().numpy() for k, v in inputs.items()}
            batch = len(next(iter(feed.values())))
            sess = self._session(graph, solo=batch == 1 and self.solo_threads is not None)
            if self._parallel_pool is None or batch < 2:
                res = sess.run(None, feed)
            else:
                res = self._run_parallel(sess, feed, batch)
            return {spec["name"]: torch.from_numpy(r) for spec, r in zip(outputs, res, strict=True)}
        sess = self._session(graph)
        batch = next(iter(inputs.values())).shape[0]
        # ONNX Runtime's CUDA provider runs on its own stream and knows nothing of torch's: wait for
        # the torch work that wrote the bound inputs (upload, resize, stacking) before it reads them.
        torch.cuda.current_stream(self.device).synchronize()
        binding = sess.io_binding()
        keep = []
        for name, t in inputs.items():
            t = t.contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", self.device.index or 0, np.float32, list(t.shape), t.data_ptr())
        result = {}
        for name, shape in io_shapes(outputs, batch).items():
            buf = torch.empty(shape, device=self.device, dtype=torch.float32)
            binding.bind_output(name, "cuda", self.device.index or 0, np.float32, list(shape), buf.data_ptr())
            result[name] = buf
        sess.run_with_iobinding(binding)
        return result

    def _run_parallel(self, sess: Any, feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        """Concurrent CPU calls on consecutive slices of the batch (every graph input and output is
        batch-first, :func:`io_shapes`), outputs joined in order; the calling thread makes the first."""
        assert self._parallel_pool is not None
        edges = np.linspace(0, batch, min(self.parallel, batch) + 1).round().astype(int)
        parts = [{k: v[a:b] for k, v in feed.items()} for a, b in itertools.pairwise(edges)]
        futures = [self._parallel_pool.submit(self._timed_run, sess, part) for part in parts[1:]]
        first = sess.run(None, parts[0])
        rest = [f.result() for f in futures]
        return [np.concatenate(outs) for outs in zip(first, *rest, strict=True)]

    def _timed_run(self, sess: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        c0 = time.thread_time()
        try:
            return sess.run(None, feed)
        finally:
            with self._cpu_lock:
                self.parallel_cpu_s += time.thread_time() - c0


class OnnxRuntimeEngine(GraphEngine):
    backend = "onnxruntime"

    def __init__(
        self,
        onnx_dir: str | Path,
        device: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        tensorrt_provider: bool | None = None,
        spin: bool = False,
        parallel: int = 1,
    ) -> None:
        if precision == "bf16":
            raise EngineError(
                "onnxruntime has no bf16 CPU kernels for this model; use backend 'torch' with precision "
                "bf16, or int8 here (a quantized export from `dagan export quantize`)"
            )
        if precision not in ("fp32", "fp16", "int8"):
            raise EngineError(f"precision must be fp32, fp16 or int8, got {precision!r}")
        dev = _ort_device(device)
        trt = bool(tensorrt_provider) if tensorrt_provider is not None else precision == "fp16"
        if precision == "fp16" and dev.type == "cpu":
            raise EngineError("onnxruntime fp16 needs its TensorRT provider on a GPU; use fp32 on the CPU")
        manifest = read_manifest(onnx_dir)
        _check_export_precision(manifest, precision, onnx_dir, dev)
        runner = OrtRunner(
            onnx_dir,
            manifest,
            dev,
            threads=threads,
            tensorrt=trt,
            fp16=precision == "fp16",
            spin=spin,
            parallel=parallel,
        )
        if precision == "fp16" and runner.provider != "TensorrtExecutionProvider":
            raise EngineError(
                "onnxruntime fp16 needs the TensorRT execution provider, which is not available"
            )
        super().__init__(manifest, runner, onnx_dir)
        self.precision = precision
        self.provider = runner.provider
        self.parallel = runner.parallel

    @property
    def parallel_cpu_s(self) -> float:
        """CPU seconds spent so far by parallel calls on threads other than the caller's (a caller that
        times its thread's CPU adds the change of this across a call: the server's infer stage)."""
        return self.runner.parallel_cpu_s


def _check_export_precision(
    manifest: dict[str, Any], precision: str, onnx_dir: str | Path, device: torch.device
) -> None:
    """An int8 engine needs an int8 export (its precision is in the graphs, not a runtime switch), and
    an fp32/fp16 engine must not silently run one."""
    exported = manifest.get("precision", "fp32")
    if precision == "int8" and exported != "int8":
        raise EngineError(
            f"{onnx_dir} is an {exported} export; int8 needs a quantized one: "
            f"dagan export quantize --onnx {onnx_dir} --calib-clips CLIPS --out DIR"
        )
    if precision != "int8" and exported == "int8":
        raise EngineError(f"{onnx_dir} is an int8 export; open it with precision 'int8'")
    if exported == "int8" and device.type != "cpu":
        raise EngineError("int8 exports are for the CPU provider (VNNI kernels); use device 'cpu'")


def _ort_device(device: str) -> torch.device:
    if device == "auto":
        import onnxruntime as ort

        gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        return torch.device("cuda" if gpu else "cpu")
    return resolve_device(device)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DAGAN_CACHE", Path.home() / ".cache" / "dagan"))


def onnx_cache_dir(
    checkpoint: str | Path, cache_dir: str | Path | None = None, sha: str | None = None
) -> Path:
    """Where the cached export of ``checkpoint`` lives: keyed (:func:`dagan.helpers.cache_key`) by the
    weights' SHA-256 and the manifest version, so a new export format never reads an old entry."""
    from dagan.graph_contract import MANIFEST_VERSION

    sha = sha or file_sha256(checkpoint)
    return Path(cache_dir or default_cache_dir()) / "onnx" / cache_key(sha, MANIFEST_VERSION)


def _checked_source(checkpoint: str | Path) -> tuple[Path, bool]:
    """(path, is an export directory) for what an ``*_dir_for`` was given: an export directory (its
    manifest checked; used as it is, the user chose it) or a weights file; EngineError otherwise."""
    path = Path(checkpoint)
    if path.is_dir():
        read_manifest(path)
        return path, True
    if not path.is_file():
        raise EngineError(f"checkpoint not found: {path}")
    return path, False


def onnx_dir_for(checkpoint: str | Path, cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """An ONNX export of ``checkpoint``: the path itself if it is an export directory, else a cached
    export keyed by the checkpoint's SHA-256 (exported on first use, locally — nothing is downloaded)."""
    from export.onnx_export import export_onnx

    path, is_export = _checked_source(checkpoint)
    if is_export:
        return path
    cached = cached_onnx_dir(path, cache_dir)
    if cached is not None:
        return cached
    out = onnx_cache_dir(path, cache_dir)
    export_onnx(path, out, progress=progress)
    return out


#: Bump when export/optimize.py (the CPU graph) or the int8 recipe changes what it writes: old cache
#: entries are then simply not found, and rebuilt.
CPU_GRAPH_VERSION = 3
INT8_VERSION = 3


def _cached_variant(kind: str, checkpoint: Path, cache_dir: str | Path | None, *key: Any) -> tuple[Path, str]:
    """``$DAGAN_CACHE/<kind>/<key>`` for a derived export of ``checkpoint`` (the key hashes the weights'
    SHA-256 with ``key``) and that SHA-256."""
    from dagan.graph_contract import MANIFEST_VERSION

    sha = file_sha256(checkpoint)
    return Path(cache_dir or default_cache_dir()) / kind / cache_key(sha, MANIFEST_VERSION, *key), sha


def _ready(path: Path, sha: str) -> bool:
    try:
        return read_manifest(path).get("checkpoint_sha256") == sha
    except ExportError:
        return False


def _build_into(out: Path, build: Any) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``out`` in one rename, so a second process starting
    at the same time, or one killed half-way, never sees a half-written export."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the cache is shared like a plain mkdir's
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cpu_onnx_dir_for(
    checkpoint: str | Path, cache_dir: str | Path | None = None, progress: bool = False
) -> Path:
    """The fp32 export of ``checkpoint`` with its frame graph rewritten for the CPU provider
    (:mod:`export.optimize`: same function, same weights), cached in ``$DAGAN_CACHE/onnx-cpu/<key>``.
    An export directory is returned as it is (the user chose it)."""
    path, is_export = _checked_source(checkpoint)
    if is_export:
        return path
    out, sha = _cached_variant("onnx-cpu", path, cache_dir, CPU_GRAPH_VERSION)
    if _ready(out, sha):
        return out
    from export.optimize import optimize_export

    plain = onnx_dir_for(path, cache_dir, progress=progress)
    return _build_into(out, lambda tmp: optimize_export(plain, tmp, progress=progress))


def int8_onnx_dir_for(
    checkpoint: str | Path, cache_dir: str | Path | None = None, progress: bool = False
) -> Path:
    """An int8 export of ``checkpoint`` for the CPU provider, cached in ``$DAGAN_CACHE/onnx-int8/<key>``:
    the CPU graph (:func:`cpu_onnx_dir_for`) quantized by :func:`export.quantize.quantize_export`,
    calibrated on :func:`export.quantize.default_calibration` (real face clips when this machine has
    them, else the portraits shipped with the install), and its held-out quality against fp32 recorded in
    the manifest (``"quality"``). An export directory is returned as it is."""
    path, is_export = _checked_source(checkpoint)
    if is_export:
        return path
    from export.quantize import default_calibration, quantize_export, record_quality

    source = default_calibration()
    out, sha = _cached_variant("onnx-int8", path, cache_dir, CPU_GRAPH_VERSION, INT8_VERSION, source.label)
    if _ready(out, sha):
        return out
    fp32 = cpu_onnx_dir_for(path, cache_dir, progress=progress)

    def build(tmp: Path) -> None:
        calib, check = source.load(int(read_manifest(fp32)["image_size"]), progress=progress)
        quantize_export(fp32, tmp, calib, progress=progress)
        record_quality(fp32, tmp, check, source.label)

    return _build_into(out, build)


def cached_int8_dir(checkpoint: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The cached int8 export :func:`int8_onnx_dir_for` would return, if it is there already."""
    from export.quantize import default_calibration

    path = Path(checkpoint)
    if not path.is_file():
        return None
    label = default_calibration().label
    out, sha = _cached_variant("onnx-int8", path, cache_dir, CPU_GRAPH_VERSION, INT8_VERSION, label)
    return out if _ready(out, sha) else None


def cached_onnx_dir(checkpoint: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The cached export of ``checkpoint`` if one exists and matches its SHA-256, else None."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    sha = file_sha256(path)
    out = onnx_cache_dir(path, cache_dir, sha)
    try:
        return out if read_manifest(out).get("checkpoint_sha256") == sha else None
    except ExportError:  # missing or broken cache entry: not ready
        return None
