"""``dagan bench`` (also ``python -m bench.model``): per-frame latency and multi-stream throughput of
every backend available here.

For each model it reports, in one run on one machine (named in the output):

- the cached PyTorch path vs. the uncached full forward (the source branch recomputed every frame, as
  the reference DaGAN demo does), so the cache's speedup is a measured ratio;
- for each available backend × precision (torch fp32 / fp16 / fp16+channels_last+CUDA graphs on a GPU,
  torch bf16 on a CPU with native bf16, onnxruntime plain and on the CPU graph, fp32 and int8, tensorrt):
  p50/p99 latency and fps at batch 1, then throughput at each ``--batches`` size (frames/s and how many
  concurrent 30-fps streams that is), and peak memory;
- the FLOPs of the per-frame path (and of the uncached forward), so fps can be set against a device's
  peak FLOP/s.

``--interleaved`` times every row at batch 1 round-robin with the authors' forward instead (the fair
comparison on a shared machine). Presets are timed with random weights (the report says so). ``--json``
holds everything printed, ``--markdown`` the printed report.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan.config import PRESETS
from dagan.helpers import resolve_device
from dagan.model import DaGAN
from engine.select import cpu_has_bf16

from .engines import (
    INT8_STEPS,
    BenchModel,
    checkpoint_model,
    preset_model,
    torch_engine,
    variant_engine,
    workdir,
)
from .report import load_average, machine_description, stats, timestamp, write_report

DESCRIPTION = (
    "Per-frame latency and multi-stream throughput of every backend available here, the cache's speedup "
    "over the uncached forward, FLOPs and the machine (docs/benchmarks.md)."
)
BATCHES = (1, 2, 4, 8, 16, 32)
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")


@dataclass
class ModelBenchSettings:
    """Everything ``dagan bench`` can be told (one flag each, :func:`add_arguments`)."""

    presets: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    baseline: str | None = None  # with interleaved: another checkpoint's rows in the same rounds
    frames: int = 20
    warmup: int = 3
    device: str = "auto"
    backends: tuple[str, ...] = ()  # empty: every backend available here
    batches: tuple[int, ...] = BATCHES
    interleaved: bool = False
    threads: int | None = None  # onnxruntime's intra-op threads and torch's; None: each runtime's default
    workdir: str | None = None  # keep the exports here, keyed by the weights; None: a temporary folder
    calib: tuple[str, ...] = ()  # real face clips (files or folders) for the int8 rows
    profile: bool = False  # onnxruntime op profile per graph row
    passes: bool = False  # one CPU-graph rewrite at a time as extra rows
    parallel: int = 1  # > 1: the CPU-graph rows again with a batch split into this many parallel calls
    json: str | None = None
    markdown: str | None = None


def _time(fn: Callable[[], Any], frames: int, warmup: int, device: torch.device) -> list[float]:
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
    engine = torch_engine(model, device)
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
        "cached": stats(_time(cached, frames, warmup, engine.device)),
        "uncached": stats(_time(uncached, frames, warmup, engine.device)),
        "machine": machine_description(engine.device),
    }
    result["speedup"] = result["uncached"]["median_ms"] / result["cached"]["median_ms"]
    return result


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


def almond_eyes(boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """478×2 face-mesh landmarks holding only two almond-shaped eyes (everything else at 0): a stand-in
    for a photo's mesh where :mod:`dagan.blink` needs one (this benchmark, the tests). ``boxes``: for
    the image-left eye, then the image-right, (left corner x, right corner x, y, half-height)."""
    from dagan.blink import EYES

    lm = np.zeros((478, 2), np.float32)
    for ((c_out, c_in), up, lo), (x0, x1, y, h) in zip(EYES, boxes, strict=True):
        left, right = (c_out, c_in) if c_out == 33 else (c_in, c_out)
        lm[left], lm[right] = (x0, y), (x1, y)
        for k, (pu, pl) in enumerate(zip(up, lo, strict=True)):
            u = (k + 1) / (len(up) + 1)
            x = x0 + u * (x1 - x0) if c_out == 33 else x1 - u * (x1 - x0)
            lm[pu], lm[pl] = (x, y - h * np.sin(np.pi * u)), (x, y + h * np.sin(np.pi * u))
    return lm


def _typical_eyes(size: int) -> Any:
    """:class:`dagan.blink.EyeShapes` of two almond eyes where a crop puts them: centres at 35 % and
    65 % across, 45 % down, 12 % of the crop wide."""
    from dagan.blink import eye_shapes

    boxes = [
        (cx - 0.06 * size, cx + 0.06 * size, 0.45 * size, 0.025 * size) for cx in (0.35 * size, 0.65 * size)
    ]
    return eye_shapes(almond_eyes(boxes))


def bench_lids(model: DaGAN, frames: int = 50, warmup: int = 5) -> dict:
    """Step 6 of the hot path (engine/hot_path.py) for a model with a lid reader, torch on the CPU at
    batch 1, as every backend runs it: the reader alone (every frame of a stream whose photo has a face
    mesh) and the reader plus the warp of both eyes, shut (every frame whose driver's eyes differ from
    the reference: with the bundled file's ``blink.dead_zone`` 0, most frames of a live stream)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dagan.blink import close_lids

    reader = model.lid_reader.to("cpu", torch.float32).eval()
    size = model.config.image_size
    rng = np.random.default_rng(0)
    driving = torch.from_numpy(rng.random((1, 3, size, size), dtype=np.float32))
    kp = torch.zeros(1, model.config.keypoints.num_kp, 2)
    lids = reader.lids
    kp[0, lids[0]], kp[0, lids[1]] = torch.tensor([-0.3, -0.12]), torch.tensor([-0.3, -0.08])
    kp[0, lids[2]], kp[0, lids[3]] = torch.tensor([0.3, -0.12]), torch.tensor([0.3, -0.08])
    prediction = torch.rand(1, 3, size, size)
    shapes = [_typical_eyes(size)]

    @torch.inference_mode()
    def read() -> None:
        reader(driving, kp)

    @torch.inference_mode()
    def read_and_shut() -> None:
        reader(driving, kp)
        close_lids(prediction, shapes, torch.ones(1, 2), torch.zeros(1, 2, 2))

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        reader(driving, kp)
    cpu = torch.device("cpu")
    return {
        "reader": stats(_time(read, frames, warmup, cpu)),
        "reader_and_warp": stats(_time(read_and_shut, frames, warmup, cpu)),
        "reader_mflops": fc.get_total_flops() / 1e6,
    }


def bench_mouth(model: DaGAN, frames: int = 50, warmup: int = 5) -> dict:
    """Step 6's mouth (engine/hot_path.py) for a model with an open-mouth warp, torch on the CPU at
    batch 1, as every backend runs it: the gap search, the warp and the shade of a typical mouth opened
    by a fifth of its width (every frame whose lips differ from the photo's by more than
    :data:`dagan.mouth.UNSEEN`: most frames of a talking stream)."""
    from dagan.mouth import open_mouths

    size = model.config.image_size
    prediction = torch.rand(1, 3, size, size)
    shape = _typical_mouth(size)
    extra, shift = np.array([0.2 * shape.width]), np.zeros((1, 2))

    @torch.inference_mode()
    def warp() -> None:
        open_mouths(prediction, [shape], extra, shift, model.config.mouth)

    return {"warp": stats(_time(warp, frames, warmup, torch.device("cpu")))}


def bench_nod(model: DaGAN, frames: int = 50, warmup: int = 5, face: np.ndarray | None = None) -> dict:
    """Step 5's nod (:func:`engine.hot_path.nodded`) for a model that nods, on the CPU at batch 1, as
    every backend runs it for a filtered relative stream: the driver's face mesh on the crop at the
    model's size, its head pose and filter, and the photo's keypoints nodded (every frame of such a
    stream). ``face``: an RGB photo with a face, cropped as the server crops a camera frame (default:
    scikit-image's astronaut portrait; without scikit-image the result says it was skipped: timing the
    mesh on a frame without a face would time the face detector alone).

    Also the upload's calibration of the nod (``upload_calibration``: the photo's depth profile chosen by
    four drawings and four meshes, ``engine.hot_path.FramePathEngine._nod_profile``), once per photo a
    relative stream uploads, on the torch CPU engine at batch 1, ``max(frames // 10, 3)`` times."""
    from dagan.face import crop_source
    from dagan.nets.keypoints import Keypoints
    from dagan.nod import NodState
    from dagan.smoothing import OneEuroFilter
    from engine.base import Session
    from engine.hot_path import nodded

    if face is None:
        try:
            from skimage import data
        except ImportError:
            return {"skipped": "no face photo (scikit-image is not installed)"}
        face = data.astronaut()
    size = model.config.image_size
    crop, _ = crop_source(face, out_size=size)
    k = model.config.keypoints.num_kp
    kp_s = Keypoints(torch.rand(1, k, 2) - 0.5, torch.eye(2).repeat(1, k, 1, 1))
    session = Session(source=None, relative=True, reference=object(), kp_filter=OneEuroFilter())
    session.nod, session.frame_time = NodState(model.config.nod.max_degrees), 0.0  # no photo: all the nod

    @torch.inference_mode()
    def nod() -> None:
        session.frame_time += 1 / 30
        nodded([session], [crop], size, kp_s, kp_s, model.config.nod.gain)

    result = {"mesh_and_nod": stats(_time(nod, frames, warmup, torch.device("cpu")))}

    from engine.hot_path import mesh_at_size
    from engine.torch_backend import TorchEngine

    engine = TorchEngine(model, device="cpu")
    photo = engine.new_session(crop, relative=True)
    landmarks = mesh_at_size(crop, size)
    if landmarks is not None:
        samples = _time(
            lambda: engine._nod_profile(photo, crop, landmarks), max(frames // 10, 3), 1, torch.device("cpu")
        )
        result["upload_calibration"] = stats(samples)
    return result


def mouth_landmarks(
    left: float, right: float, row: float, gap: float, lip_bottom: float, chin: float
) -> np.ndarray:
    """478×2 face-mesh landmarks holding only a level mouth (everything else at 0): corners at x ``left``
    and ``right`` on ``row``, the inner lips ``gap`` apart around it, the lower lip's outer edge at row
    ``lip_bottom`` and the chin at row ``chin``, both in the middle. A stand-in for a photo's mesh where
    :mod:`dagan.mouth` needs one (this benchmark, the tests), as :func:`almond_eyes` is for the eyes."""
    from dagan.mouth import CHIN, CORNERS, INNER_LOWER, INNER_UPPER, OUTER_LOWER

    lm = np.zeros((478, 2), np.float32)
    cx = (left + right) / 2
    lm[CORNERS[0]], lm[CORNERS[1]] = (left, row), (right, row)
    lm[INNER_UPPER], lm[INNER_LOWER] = (cx, row - gap / 2), (cx, row + gap / 2)
    lm[OUTER_LOWER], lm[CHIN] = (cx, lip_bottom), (cx, chin)
    return lm


def _typical_mouth(size: int) -> Any:
    """:class:`dagan.mouth.MouthShape` where a crop puts a closed mouth: 13 % of the crop wide, centred
    across, 70 % down, the chin 13 % below it."""
    from dagan.mouth import mouth_shape

    cx, cy, w = 0.5 * size, 0.7 * size, 0.13 * size
    return mouth_shape(mouth_landmarks(cx - w / 2, cx + w / 2, cy, 0.5, cy + 0.025 * size, cy + 0.13 * size))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _variants(device: torch.device, passes: bool = False, parallel: int = 1) -> list[tuple[str, str, dict]]:
    """(backend, precision, options) worth timing on this device, from the installed runtimes;
    ``parallel`` > 1 adds the CPU-graph rows with a batch split into that many concurrent calls
    (engine/onnx_backend.py), which only batches above 1 can show; at batch 1 these rows are the
    engine a lone stream gets from `dagan serve` (one call on every inference core)."""
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
            if parallel > 1:
                out += [
                    ("onnxruntime", precision, {"cpu_graph": True, "parallel": parallel})
                    for precision in ("fp32", "int8")
                ]
            if passes:  # what each CPU-graph rewrite buys on its own
                from export.optimize import PASSES

                out += [("onnxruntime", "fp32", {"cpu_graph": p}) for p in PASSES]
                # and the int8 recipe without each of its optional steps (export/quantize.py)
                out += [
                    ("onnxruntime", "int8", {"cpu_graph": True, "int8_without": step}) for step in INT8_STEPS
                ]
    if device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        out.append(("tensorrt", "fp16", {}))
    return out


def _variant_name(backend: str, precision: str, options: dict) -> str:
    """``onnxruntime fp32 +cpu_graph``, ``… +cpu_graph=gather_grid_sample`` (one pass alone)."""
    return f"{backend} {precision}" + "".join(
        f" +{k}" if v is True else f" +{k}={v}" for k, v in options.items()
    )


def op_profile(engine: Any, frames: int = 30, warmup: int = 5) -> list[dict]:
    """Where an onnxruntime engine's frame graph spends its time, by operator type: onnxruntime's own
    profiler over ``frames`` batch-1 frames (after ``warmup``), kernel time per frame (median over the
    frames of each node's time, summed per op type), share, nodes. A profiled copy of the frame session
    is made with the engine's options, so the engine itself is not slowed."""
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


def bench_backend(
    engine: Any, frames: int, warmup: int, batches: tuple[int, ...], device: torch.device
) -> dict:
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

    result = {"latency": stats(_time(one, frames, warmup, device)), "throughput": []}
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
    model: DaGAN, engines: list[tuple[str, Any]], frames: int, warmup: int, device: torch.device
) -> dict:
    """Batch-1 latency of the authors' per-frame forward (the full uncached ``DaGAN.forward``, source
    branch recomputed every frame, as their demo does), our torch fp32 engine and each engine in
    ``engines``, measured round-robin: every round times one frame of each, in a rotating order, so a
    change in machine load (a shared machine) hits every row alike and the ratios stay fair.
    """
    ref = torch_engine(model, str(device))
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
    load_before = load_average()
    for k in range(frames):
        for n in names[k % len(names) :] + names[: k % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[n]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[n].append(time.perf_counter() - t0)
    rows = {n: stats(v) for n, v in samples.items()}
    base = rows[AUTHORS]["median_ms"]
    for r in rows.values():
        r["vs_authors"] = base / r["median_ms"]
    return {"rows": rows, "load_before": load_before, "load_after": load_average()}


def load_models(presets: Sequence[str], checkpoint: str | None) -> list[BenchModel]:
    """The checkpoint (if any), then each preset with random weights (cost does not depend on them)."""
    models = [checkpoint_model(checkpoint)] if checkpoint else []
    label = "preset {} (random init: latency does not depend on weights)"
    return models + [preset_model(name, label.format(name)) for name in presets]


def run_bench(settings: ModelBenchSettings) -> list[dict]:
    """Benchmark each model on every available backend (restricted to ``settings.backends``), or with
    ``settings.interleaved`` every variant at batch 1 round-robin with the authors' uncached forward
    (:func:`bench_interleaved`). Prints each model's report as it is done; returns the results."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = []
    for bm in load_models(settings.presets, settings.checkpoint):
        date, load_before = timestamp(), load_average()
        flops = count_flops(bm.model)
        r = _run_interleaved(bm, settings) if settings.interleaved else _run_sweep(bm, settings)
        r["flops"] = flops
        if bm.model.lid_reader is not None:
            r["lids"] = bench_lids(bm.model, settings.frames, settings.warmup)
        if bm.model.config.mouth.warp > 0:
            r["mouth"] = bench_mouth(bm.model, settings.frames, settings.warmup)
        if bm.model.config.nod.gain > 0:
            r["nod"] = bench_nod(bm.model, settings.frames, settings.warmup)
        r.update(date=date, load_before=load_before, load_after=load_average())
        print(report_text(r), flush=True)
        results.append(r)
    return results


def _run_sweep(bm: BenchModel, settings: ModelBenchSettings) -> dict:
    r = bench_model(bm.model, bm.label, settings.frames, settings.warmup, settings.device)
    dev = torch.device(r["machine"]["device"])
    r["backends"], r["errors"] = [], {}
    with workdir(bm, settings.workdir) as work:
        for backend, precision, options in _variants(dev, settings.passes, settings.parallel):
            if settings.backends and backend not in settings.backends:
                continue
            name = _variant_name(backend, precision, options)
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                engine = _engine(bm, backend, precision, options, dev, work, settings)
                entry = {"name": name, "backend": backend, "precision": precision, "options": options}
                entry.update(bench_backend(engine, settings.frames, settings.warmup, settings.batches, dev))
                if backend == "onnxruntime" and settings.profile:
                    entry["op_profile"] = op_profile(engine)
                r["backends"].append(entry)
                del engine
            except Exception as exc:  # one backend failing must not hide the others' numbers
                r["errors"][name] = f"{type(exc).__name__}: {exc}"
    return r


def _engine(
    bm: BenchModel,
    backend: str,
    precision: str,
    options: dict,
    dev: torch.device,
    work: Path,
    settings: ModelBenchSettings,
) -> Any:
    return variant_engine(
        bm.model, backend, precision, options, str(dev), work, settings.threads, settings.calib, max(BATCHES)
    )


def _run_interleaved(bm: BenchModel, settings: ModelBenchSettings) -> dict:
    dev = resolve_device(settings.device)
    r: dict = {
        "model": bm.label,
        "parameters": sum(p.numel() for p in bm.model.parameters()),
        "machine": machine_description(dev),
        "backends": [],
        "errors": {},
    }
    engines: list[tuple[str, Any]] = []
    models = [(bm, "")]
    if settings.baseline:
        # Another checkpoint's variants in the same rounds: two models compared on one machine in one
        # run (machines and hours differ by up to 1.7x in speed, so separate runs would not do).
        base = checkpoint_model(settings.baseline)
        models.append((base, f" [baseline {Path(settings.baseline).name}]"))
        r["baseline"] = {"checkpoint": settings.baseline, "flops": count_flops(base.model)}
    for model, suffix in models:
        with workdir(model, settings.workdir) as work:
            for backend, precision, options in _variants(dev, settings.passes):
                name = _variant_name(backend, precision, options) + suffix
                if (settings.backends and backend not in settings.backends) or name == "torch fp32":
                    continue
                try:
                    eng = _engine(model, backend, precision, options, dev, work, settings)
                    engines.append((name, eng))
                    if backend == "onnxruntime" and settings.profile:
                        r.setdefault("op_profile", {})[name] = op_profile(eng)
                except Exception as exc:  # one backend failing must not hide the others' numbers
                    r["errors"][name] = f"{type(exc).__name__}: {exc}"
    r["interleaved"] = bench_interleaved(bm.model, engines, settings.frames, settings.warmup, dev)
    rows = r["interleaved"]["rows"]
    r["cached"], r["uncached"] = rows["torch fp32"], rows[AUTHORS]
    r["speedup"] = r["uncached"]["median_ms"] / r["cached"]["median_ms"]
    return r


def report_text(r: dict) -> str:
    """One model's results as the lines ``dagan bench`` prints (and ``--markdown`` writes)."""
    lines: list[str] = []
    out = lines.append
    m = r["machine"]
    where = (
        f"{m['device']} ({m.get('gpu', m['cpu'])}, {m['cpu_count']} CPUs, torch {m['torch_threads']} threads)"
    )
    f = r["flops"]
    out(f"{r['model']}: {r['parameters'] / 1e6:.2f} M parameters on {where}")
    out(
        f"  FLOPs per frame: {f['per_frame_gflops']:.2f} G cached path, {f['uncached_forward_gflops']:.2f} G "
        f"uncached forward (source encode {f['source_encode_gflops']:.2f} G)"
    )
    if "baseline" in r:
        bf = r["baseline"]["flops"]
        out(f"  baseline {r['baseline']['checkpoint']}: {bf['per_frame_gflops']:.2f} G per frame cached path")
    for mode in ("cached", "uncached"):
        s = r[mode]
        out(
            f"  torch {mode:9s} median {s['median_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms   "
            f"{s['fps']:7.2f} fps   ({s['frames']} frames)"
        )
    out(f"  cache speedup (median): {r['speedup']:.2f}x")
    if "lids" in r:
        lr, lw = r["lids"]["reader"], r["lids"]["reader_and_warp"]
        out(
            f"  blinks (step 6, torch CPU, every backend): lid reader p50 {lr['median_ms']:.2f} ms p99 "
            f"{lr['p99_ms']:.2f} ms ({r['lids']['reader_mflops']:.1f} MFLOP); with the lids' warp "
            f"p50 {lw['median_ms']:.2f} ms p99 {lw['p99_ms']:.2f} ms"
        )
    if "mouth" in r:
        mw = r["mouth"]["warp"]
        out(
            f"  open mouth (step 6, torch CPU, every backend): gap search, warp and shade p50 "
            f"{mw['median_ms']:.2f} ms p99 {mw['p99_ms']:.2f} ms"
        )
    if "nod" in r:
        if "skipped" in r["nod"]:
            out(f"  nod (step 5): not timed, {r['nod']['skipped']}")
        else:
            mn = r["nod"]["mesh_and_nod"]
            out(
                f"  nod (step 5, CPU, every backend): the driver's face mesh, head pose and the nodded "
                f"keypoints p50 {mn['median_ms']:.2f} ms p99 {mn['p99_ms']:.2f} ms"
            )
            if "upload_calibration" in r["nod"]:
                uc = r["nod"]["upload_calibration"]
                out(
                    f"  nod calibration (once per uploaded photo, torch CPU): four drawings and meshes "
                    f"p50 {uc['median_ms']:.1f} ms p99 {uc['p99_ms']:.1f} ms"
                )
    for b in r["backends"]:
        s = b["latency"]
        out(
            f"  {b['name']:40s} p50 {s['median_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
            f"{s['fps']:7.2f} fps  peak {b['peak_memory_mb']:.0f} MB"
        )
        row = "  ".join(
            f"B{t['batch']}: {t['fps']:.1f} fps/{t['streams_30fps']} str" for t in b["throughput"]
        )
        out(f"    throughput  {row}")
    if "interleaved" in r:
        il = r["interleaved"]
        out(
            f"  interleaved at batch 1 (load average {il['load_before'][0]:.1f} before, "
            f"{il['load_after'][0]:.1f} after):"
        )
        for name, s in il["rows"].items():
            out(
                f"  {name:40s} p50 {s['median_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
                f"{s['fps']:7.2f} fps  {s['vs_authors']:5.2f}x the authors' forward"
            )
    profiles = dict(r.get("op_profile", {}))
    profiles.update({b["name"]: b["op_profile"] for b in r.get("backends", []) if "op_profile" in b})
    for name, rows in profiles.items():
        total = sum(x["ms"] for x in rows)
        top = ", ".join(f"{x['op']} {x['ms']:.1f} ({100 * x['share']:.0f} %)" for x in rows[:8])
        out(f"  {name}: kernel time {total:.1f} ms per frame by op: {top}")
    for name, err in r["errors"].items():
        out(f"  {name}: not measured ({err})")
    if "date" in r:
        out(f"  {r['date']}, load average (1/5/15 min) before {r['load_before']}, after {r['load_after']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- command line


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from err

    return parse


def _backend_list(text: str) -> tuple[str, ...]:
    names = _csv(str)(text)
    unknown = sorted(set(names) - set(BACKEND_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(unknown)} ({', '.join(BACKEND_NAMES)})")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every setting of the model benchmark, as a flag (the defaults are :class:`ModelBenchSettings`')."""
    d = ModelBenchSettings()
    p.add_argument("--checkpoint", help="time this checkpoint's model")
    p.add_argument(
        "--preset",
        action="append",
        choices=PRESETS,
        help="time a preset with random weights (repeatable; default: every preset unless --checkpoint)",
    )
    p.add_argument("--frames", type=int, default=d.frames, help="timed frames per row (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed frames first (default %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default %(default)s)")
    p.add_argument(
        "--backends",
        type=_backend_list,
        default=d.backends,
        help=f"comma list of the backends to time, of {', '.join(BACKEND_NAMES)} (default: every one "
        "available here)",
    )
    p.add_argument(
        "--batches",
        type=_csv(int),
        default=d.batches,
        help=f"batch sizes of the throughput sweep (default {','.join(map(str, d.batches))})",
    )
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="instead of the sweep, time every row at batch 1 round-robin with the authors' uncached "
        "forward: the fair comparison on a shared machine",
    )
    p.add_argument(
        "--baseline",
        metavar="CKPT",
        help="with --interleaved: also time this checkpoint's rows in the same rounds (e.g. the previous "
        "weights, to measure what a change of the network bought)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of onnxruntime and torch (default: each runtime's own, one per core)",
    )
    p.add_argument(
        "--workdir",
        help="keep the ONNX / CPU-graph / int8 exports here, keyed by the weights, so a rerun does not "
        "export and quantize again (default: a temporary folder)",
    )
    p.add_argument(
        "--calib",
        type=_csv(str),
        default=d.calib,
        help="comma list of real face clips or folders to calibrate the int8 rows on (default: four "
        "random frames; latency does not depend on them, quality does: docs/export.md)",
    )
    p.add_argument(
        "--profile", action="store_true", help="onnxruntime's op profile of each onnxruntime row's graph"
    )
    p.add_argument(
        "--passes",
        action="store_true",
        help="also the CPU graph with one rewrite of export/optimize.py at a time, and the int8 CPU graph "
        "without one optional step of its recipe at a time (what each buys alone)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=d.parallel,
        help="N > 1: the CPU-graph rows again with each batch split into N parallel calls of --threads "
        "each (what `dagan serve` does with several streams; see its batches, not the interleaved rows); "
        "their batch of one runs on N × --threads intra-op threads, as a lone stream does",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--markdown", help="also write the printed report to this file")


def settings_from_args(args: argparse.Namespace) -> ModelBenchSettings:
    presets = args.preset if args.preset is not None else ([] if args.checkpoint else list(PRESETS))
    return ModelBenchSettings(
        presets=presets,
        checkpoint=args.checkpoint,
        baseline=args.baseline,
        frames=args.frames,
        warmup=args.warmup,
        device=args.device,
        backends=tuple(args.backends),
        batches=tuple(args.batches) or BATCHES,
        interleaved=args.interleaved,
        threads=args.threads,
        workdir=args.workdir,
        calib=tuple(args.calib),
        profile=args.profile,
        passes=args.passes,
        parallel=args.parallel,
        json=args.json,
        markdown=args.markdown,
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise SystemExit(f"dagan bench: --parallel must be at least 1, got {args.parallel}")
    if args.parallel > 1 and args.interleaved:
        raise SystemExit("dagan bench: --parallel shows in batches above 1; the interleaved rows are batch 1")
    if args.baseline and not (args.interleaved and args.checkpoint):
        raise SystemExit("dagan bench: --baseline needs --checkpoint and --interleaved (same rounds)")
    settings = settings_from_args(args)
    results = run_bench(settings)
    text = "\n\n".join(report_text(r) for r in results)
    write_report(results, text, settings.json, settings.markdown, echo=False)  # printed as measured
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``dagan bench``."""
    p = subparsers.add_parser(
        "bench",
        help="per-frame latency: cached engine path vs uncached forward, every backend here",
        description=DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
