"""``dagan bench``: per-frame latency and multi-stream throughput of every backend available here.

For each model it reports, in one run on one machine (named in the output):

- the cached PyTorch path vs. the uncached full forward (the source branch recomputed every frame, as
  the reference DaGAN demo does), so the cache's speedup is a measured ratio;
- for each available backend × precision (torch fp32 / fp16 / fp16+channels_last+CUDA graphs on a GPU,
  onnxruntime, tensorrt): p50/p99 latency and fps at batch 1, then throughput at batch 1, 2, 4, 8, 16, 32
  (frames/s and how many concurrent 30-fps streams that is), and peak memory;
- the FLOPs of the per-frame path (and of the uncached forward), so fps can be set against a device's
  peak FLOP/s.

Weights do not change the cost of a forward pass, so presets are timed with random weights (the report
says so). The JSON written with ``--json`` holds everything printed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
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


BATCHES = (1, 2, 4, 8, 16, 32)


def count_flops(model: DaGAN) -> dict[str, float]:
    """FLOPs (2 × multiply-accumulates of convolutions, matmuls and attention, as counted by
    ``torch.utils.flop_counter``; element-wise ops are not counted) of one frame at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from export.graphs import FrameGraph, example_inputs

    model = model.to("cpu", torch.float32).eval()
    feed = example_inputs(model, "frame", batch=1)
    size = model.config.image_size
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            FrameGraph(model)(*feed.values())
        out["per_frame_gflops"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            model.encode_source(torch.rand(1, 3, size, size))
        out["source_encode_gflops"] = fc.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as fc:
            model(torch.rand(1, 3, size, size), torch.rand(1, 3, size, size))
        out["uncached_forward_gflops"] = fc.get_total_flops() / 1e9
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _variants(device: torch.device) -> list[tuple[str, str, dict]]:
    """(backend, precision, options) worth timing on this device, from the installed runtimes."""
    import importlib.util

    out: list[tuple[str, str, dict]] = [("torch", "fp32", {})]
    if device.type == "cuda":
        out += [("torch", "fp16", {}), ("torch", "fp16", {"channels_last": True, "cuda_graphs": True})]
    if device.type == "cpu" and cpu_has_bf16():
        out.append(("torch", "bf16", {}))
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append(("onnxruntime", "fp32", {}))
        if device.type == "cpu":
            # the plain export and the frame graph rewritten for the CPU provider (export/optimize.py),
            # which is what `dagan serve` runs on a CPU (engine/select.py), in fp32 and int8
            out += [
                ("onnxruntime", "fp32", {"cpu_graph": True}),
                ("onnxruntime", "int8", {}),
                ("onnxruntime", "int8", {"cpu_graph": True}),
            ]
            if os.environ.get("DAGAN_BENCH_PASSES"):  # what each CPU-graph rewrite buys on its own
                from export.optimize import PASSES

                out += [("onnxruntime", "fp32", {"cpu_graph": p}) for p in PASSES]
    if device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        out.append(("tensorrt", "fp16", {}))
    return out


def _variant_name(backend: str, precision: str, options: dict) -> str:
    """``onnxruntime fp32 +cpu_graph``, ``… +cpu_graph=gather_grid_sample`` (one pass alone)."""
    return f"{backend} {precision}" + "".join(
        f" +{k}" if v is True else f" +{k}={v}" for k, v in options.items()
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 / AMX): without it torch emulates bf16
    and the row would only show the emulation's cost."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def _calibration_clips(size: int) -> tuple[list, str]:
    """Calibration material for the int8 row: real face clips from ``DAGAN_BENCH_CALIB`` (files or
    folders, comma-separated) when set, else four random frames — latency does not depend on the ranges
    calibration picks, only the output quality does, and quality is measured elsewhere (docs/export.md)."""
    from export.quantize import FaceClip, face_clips, find_clips

    env = os.environ.get("DAGAN_BENCH_CALIB")
    if env:
        clips = face_clips(find_clips(env.split(",")), size, frames_per_clip=2)
        return clips, f"{sum(len(c.drivers) for c in clips)} real frames"
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    return [FaceClip("random", frames[0], list(frames[1:]))], "4 random frames (latency only)"


def _make_engine(model, backend, precision, options, device, workdir: Path):
    if backend == "torch":
        if precision != "fp32":  # .to(dtype) is in place: keep the shared fp32 weights for the others
            model = copy.deepcopy(model)
        return TorchEngine(model, device=device, precision=precision, **options)
    onnx_dir = workdir / "onnx"
    if not (onnx_dir / "manifest.json").is_file():
        from export.onnx_export import export_model

        export_model(model, onnx_dir, progress=False)
    threads = _bench_threads()
    if backend == "onnxruntime" and options.get("cpu_graph"):
        from export.optimize import PASSES, optimize_export

        only = options["cpu_graph"]
        cpu_dir = workdir / ("onnx-cpu" if only is True else f"onnx-cpu-{only}")
        if not (cpu_dir / "manifest.json").is_file():
            optimize_export(onnx_dir, cpu_dir, PASSES if only is True else [only])
        onnx_dir = cpu_dir
    if backend == "onnxruntime" and precision == "int8":
        from export.quantize import quantize_export

        from .onnx_backend import OnnxRuntimeEngine

        int8_dir = onnx_dir.parent / f"{onnx_dir.name}-int8"
        if not (int8_dir / "manifest.json").is_file():
            clips, _ = _calibration_clips(model.config.image_size)
            quantize_export(onnx_dir, int8_dir, clips, keep_float=("kp_detector",), progress=False)
        return OnnxRuntimeEngine(int8_dir, device=device, precision="int8", threads=threads)
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(onnx_dir, device=device, precision=precision, threads=threads)
    from .trt_backend import TensorRTEngine

    return TensorRTEngine.from_path(
        onnx_dir, device=device, precision=precision, max_batch=max(BATCHES), cache_dir=workdir
    )


def _bench_threads() -> int | None:
    """``DAGAN_BENCH_THREADS``: onnxruntime's intra-op threads (and torch's, set in :func:`run_bench`);
    unset: each runtime's default (one per core)."""
    value = os.environ.get("DAGAN_BENCH_THREADS")
    return int(value) if value else None


def op_profile(engine, frames: int = 30, warmup: int = 5) -> list[dict]:
    """Where an onnxruntime engine's frame graph spends its time, by operator type: onnxruntime's own
    profiler over ``frames`` batch-1 frames (after ``warmup``), kernel time per frame (median over the
    frames of each node's time, summed per op type), share, nodes. A profiled copy of the frame session
    is made with the engine's options, so the engine itself is not slowed."""
    import collections

    import onnxruntime as ort

    runner = engine.runner
    sess = runner.sessions["frame"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "dagan-op-profile")
    opts.intra_op_num_threads = sess.get_session_options().intra_op_num_threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    profiled = ort.InferenceSession(sess._model_path, opts, providers=["CPUExecutionProvider"])
    size = engine.image_size
    rng = np.random.default_rng(0)
    session = engine.new_session(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    feeds = []

    def capture(graph, inputs):
        feeds.append({k: v.detach().contiguous().numpy() for k, v in inputs.items()})
        return original(graph, inputs)

    original, runner.run = runner.run, capture
    try:
        engine.animate_batch([session], [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)])
    finally:
        del runner.run
    feed = feeds[-1]
    for _ in range(warmup):
        profiled.run(None, feed)
    Path(profiled.end_profiling()).unlink(missing_ok=True)  # the warm-up (allocation, first runs)
    profiled = ort.InferenceSession(sess._model_path, opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        profiled.run(None, feed)
    for _ in range(frames):
        profiled.run(None, feed)
    path = profiled.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"] / 1000)
            op_of[e["name"]] = e["args"]["op_name"]
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for node, times in per_node.items():
        by_op[op_of[node]][0] += statistics.median(times[-frames:])
        by_op[op_of[node]][1] += 1
    total = sum(v[0] for v in by_op.values()) or 1.0
    rows = [
        {"op": op, "ms": ms, "share": ms / total, "nodes": n}
        for op, (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])
    ]
    return rows


def bench_backend(engine, frames: int, warmup: int, batches: tuple[int, ...], device: torch.device) -> dict:
    """Latency at batch 1 and throughput at each batch size (B sessions, one frame each per call)."""
    size = engine.image_size
    rng = np.random.default_rng(1)
    sources = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    drivers = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    engine.set_source(sources[0])
    i = [0]

    def one() -> None:
        engine.animate(drivers[i[0] % 4])
        i[0] += 1

    result = {"latency": _stats(_time(one, frames, warmup, device)), "throughput": []}
    for b in batches:
        sessions = [engine.new_session(sources[k % 4]) for k in range(b)]
        batch_frames = [drivers[k % 4] for k in range(b)]
        reps = max(2, math.ceil(frames / b))  # about ``frames`` frames per batch size, at least 2 calls
        samples = _time(lambda s=sessions, f=batch_frames: engine.animate_batch(s, f), reps, 1, device)
        ms = statistics.median(samples) * 1000
        fps = b * 1000 / ms
        result["throughput"].append(
            {
                "batch": b,
                "batch_ms": ms,
                "fps": fps,
                "streams_30fps": int(fps // 30),
                "realtime": ms <= 1000 / 30,  # can each stream of the batch get 30 fps at this size?
            }
        )
    result["peak_memory_mb"] = _peak_memory_mb(device)
    return result


AUTHORS = "authors' forward (torch fp32, uncached)"


def bench_interleaved(
    model: DaGAN, engines: list[tuple[str, object]], frames: int, warmup: int, device: torch.device
) -> dict:
    """Batch-1 latency of the authors' per-frame forward (the full uncached ``DaGAN.forward``, source
    branch recomputed every frame, as their demo does), our torch fp32 engine and each engine in
    ``engines``, measured round-robin: every round times one frame of each, in a rotating order, so a
    change in machine load (a shared machine) hits every row alike and the ratios stay fair.
    """
    ref = TorchEngine(model, device=str(device))
    size = ref.image_size
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    drivers = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    src_t = ref._to_tensor([source], "source")
    i = [0]

    def driver() -> np.ndarray:
        i[0] += 1
        return drivers[i[0] % len(drivers)]

    @torch.inference_mode()
    def uncached() -> None:
        ref._to_images(ref.model(src_t, ref._to_tensor([driver()], "driving")).prediction)

    fns = {AUTHORS: uncached}
    for name, eng in [("torch fp32", ref), *engines]:
        eng.set_source(source)
        fns[name] = lambda e=eng: e.animate(driver())
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    for k in range(frames):
        for n in names[k % len(names) :] + names[: k % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[n]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[n].append(time.perf_counter() - t0)
    rows = {n: _stats(v) for n, v in samples.items()}
    base = rows[AUTHORS]["median_ms"]
    for r in rows.values():
        r["vs_authors"] = base / r["median_ms"]
    return {"rows": rows, "load_before": list(load_before), "load_after": list(os.getloadavg())}


def run_bench(
    presets: list[str],
    checkpoint: str | None,
    frames: int,
    warmup: int,
    device: str,
    out: str | None,
    backends: list[str] | None = None,
    batches: tuple[int, ...] | None = None,
    interleaved: bool | None = None,
) -> list[dict]:
    """Benchmark each model on every available backend. ``backends`` / ``batches`` restrict the sweep
    (also from the environment: ``DAGAN_BENCH_BACKENDS=torch,onnxruntime``, ``DAGAN_BENCH_BATCHES=1,4``).

    ``interleaved`` (or ``DAGAN_BENCH_INTERLEAVED=1``): instead of the sweep, time every variant at
    batch 1 round-robin with the authors' uncached forward (:func:`bench_interleaved`) — the fair
    comparison on a shared machine. ``DAGAN_BENCH_WORKDIR``: keep the ONNX / int8 exports there
    (keyed by the weights) so a rerun does not export and quantize again.
    """
    if interleaved is None:
        interleaved = os.environ.get("DAGAN_BENCH_INTERLEAVED", "") not in ("", "0")
    if _bench_threads():
        torch.set_num_threads(_bench_threads())
    if backends is None and os.environ.get("DAGAN_BENCH_BACKENDS"):
        backends = os.environ["DAGAN_BENCH_BACKENDS"].split(",")
    if batches is None:
        env = os.environ.get("DAGAN_BENCH_BATCHES")
        batches = tuple(int(x) for x in env.split(",")) if env else BATCHES
    models: list[tuple[str, DaGAN]] = []
    if checkpoint:
        models.append((f"checkpoint {checkpoint}", load_model(checkpoint)))
    for name in presets:
        torch.manual_seed(0)
        models.append(
            (f"preset {name} (random init: latency does not depend on weights)", DaGAN(load_config(name)))
        )
    results = []
    for label, model in models:
        flops = count_flops(model)
        if interleaved:
            r = _run_interleaved(model, label, frames, warmup, device, backends)
            r["flops"] = flops
            _print(r)
            results.append(r)
            continue
        r = bench_model(model, label, frames, warmup, device)
        r["flops"] = flops
        dev = torch.device(r["machine"]["device"])
        r["backends"], r["errors"] = [], {}
        with _workdir(model) as tmp:
            for backend, precision, options in _variants(dev):
                if backends and backend not in backends:
                    continue
                name = _variant_name(backend, precision, options)
                try:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
                    engine = _make_engine(model, backend, precision, options, str(dev), Path(tmp))
                    entry = {"name": name, "backend": backend, "precision": precision, "options": options}
                    entry.update(bench_backend(engine, frames, warmup, batches, dev))
                    if backend == "onnxruntime" and os.environ.get("DAGAN_BENCH_PROFILE"):
                        entry["op_profile"] = op_profile(engine)
                    r["backends"].append(entry)
                    del engine
                except Exception as exc:  # one backend failing must not hide the others' numbers
                    r["errors"][name] = f"{type(exc).__name__}: {exc}"
        _print(r)
        results.append(r)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    return results


@contextlib.contextmanager
def _workdir(model: DaGAN):
    """Where the exports of a benchmark live: a temporary folder, or ``$DAGAN_BENCH_WORKDIR/<key>``
    with the key hashing the weights, so a kept export is only reused for the same model."""
    root = os.environ.get("DAGAN_BENCH_WORKDIR")
    if not root:
        with tempfile.TemporaryDirectory(prefix="dagan-bench-") as tmp:
            yield tmp
        return
    import hashlib

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for t in model.state_dict().values():
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    path = Path(root) / h.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    yield str(path)


def _run_interleaved(
    model: DaGAN, label: str, frames: int, warmup: int, device: str, backends: list[str] | None
) -> dict:
    from .torch_backend import resolve_device

    dev = resolve_device(device)
    r: dict = {
        "model": label,
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": machine_description(dev),
        "backends": [],
        "errors": {},
    }
    engines = []
    with _workdir(model) as tmp:
        for backend, precision, options in _variants(dev):
            name = _variant_name(backend, precision, options)
            if (backends and backend not in backends) or name == "torch fp32":
                continue
            try:
                eng = _make_engine(model, backend, precision, options, str(dev), Path(tmp))
                engines.append((name, eng))
                if backend == "onnxruntime" and os.environ.get("DAGAN_BENCH_PROFILE"):
                    r.setdefault("op_profile", {})[name] = op_profile(eng)
            except Exception as exc:  # one backend failing must not hide the others' numbers
                r["errors"][name] = f"{type(exc).__name__}: {exc}"
        r["interleaved"] = bench_interleaved(model, engines, frames, warmup, dev)
    rows = r["interleaved"]["rows"]
    r["cached"], r["uncached"] = rows["torch fp32"], rows[AUTHORS]
    r["speedup"] = r["uncached"]["median_ms"] / r["cached"]["median_ms"]
    return r


def _print(r: dict) -> None:
    m = r["machine"]
    where = (
        f"{m['device']} ({m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, torch {m['torch_threads']} threads)"
    )
    f = r["flops"]
    print(f"{r['model']}: {r['parameters'] / 1e6:.2f} M parameters on {where}")
    print(
        f"  FLOPs per frame: {f['per_frame_gflops']:.2f} G cached path, {f['uncached_forward_gflops']:.2f} G "
        f"uncached forward (source encode {f['source_encode_gflops']:.2f} G)"
    )
    for mode in ("cached", "uncached"):
        s = r[mode]
        print(
            f"  torch {mode:9s} median {s['median_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms   "
            f"{s['fps']:7.2f} fps   ({s['frames']} frames)"
        )
    print(f"  cache speedup (median): {r['speedup']:.2f}x")
    for b in r["backends"]:
        s = b["latency"]
        print(
            f"  {b['name']:40s} p50 {s['median_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
            f"{s['fps']:7.2f} fps  peak {b['peak_memory_mb']:.0f} MB"
        )
        row = "  ".join(
            f"B{t['batch']}: {t['fps']:.1f} fps/{t['streams_30fps']} str" for t in b["throughput"]
        )
        print(f"    throughput  {row}")
    if "interleaved" in r:
        il = r["interleaved"]
        print(
            f"  interleaved at batch 1 (load average {il['load_before'][0]:.1f} before, "
            f"{il['load_after'][0]:.1f} after):"
        )
        for name, s in il["rows"].items():
            print(
                f"  {name:40s} p50 {s['median_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
                f"{s['fps']:7.2f} fps  {s['vs_authors']:5.2f}x the authors' forward"
            )
    profiles = dict(r.get("op_profile", {}))
    profiles.update({b["name"]: b["op_profile"] for b in r.get("backends", []) if "op_profile" in b})
    for name, rows in profiles.items():
        total = sum(x["ms"] for x in rows)
        top = ", ".join(f"{x['op']} {x['ms']:.1f} ({100 * x['share']:.0f} %)" for x in rows[:8])
        print(f"  {name}: kernel time {total:.1f} ms per frame by op: {top}")
    for name, err in r["errors"].items():
        print(f"  {name}: not measured ({err})")
