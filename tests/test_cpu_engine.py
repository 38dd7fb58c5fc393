"""The CPU engine: the frame graph rewritten for ONNX Runtime's CPU kernels (export/optimize.py, same
function), the cached CPU / int8 exports a checkpoint gets on first use, and the default-engine choice
(engine/select.py) that `dagan serve`, `cam`, `animate` and `python -m bench.server` share."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnx
from onnx import TensorProto as T
from onnx import helper as h

from export.optimize import PASSES, TOLERANCE, max_difference, optimize_export, optimize_model, random_feed


def _model(nodes, inputs, outputs, inits=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _info(name, shape):
    return h.make_tensor_value_info(name, T.FLOAT, shape)


def _run(model, feed):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, feed
    )


@pytest.mark.parametrize("align", [0, 1])
def test_gather_grid_sample_equals_grid_sample(align):
    """Bilinear, zero padding, both corner conventions, batch 2, grid points well outside the image."""
    c, hh, ww, ho, wo = 5, 12, 10, 7, 9
    model = _model(
        [h.make_node("GridSample", ["x", "g"], ["y"], align_corners=align, mode="bilinear")],
        [_info("x", ["N", c, hh, ww]), _info("g", ["N", ho, wo, 2])],
        [_info("y", ["N", c, ho, wo])],
    )
    fast, report = optimize_model(model, ["gather_grid_sample"])
    assert report["gather_grid_sample"]["rewrites"] == 1
    assert "GridSample" not in {n.op_type for n in fast.graph.node}
    rng = np.random.default_rng(0)
    for batch in (1, 2):
        feed = {
            "x": rng.random((batch, c, hh, ww), dtype=np.float32),
            "g": rng.uniform(-1.6, 1.6, (batch, ho, wo, 2)).astype(np.float32),
        }
        feed["g"][0, 0, 0] = [-1.0, 1.0]  # exactly on the corners
        (want,), (got,) = _run(model, feed), _run(fast, feed)
        assert np.abs(want - got).max() < 1e-5


def test_space_to_depth_conv_keeps_the_function_and_the_fused_activation():
    rng = np.random.default_rng(1)
    w = onnx.numpy_helper.from_array(rng.standard_normal((3, 4, 7, 7)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    model = _model(
        [
            h.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[7, 7], pads=[3, 3, 3, 3]),
            h.make_node("Sigmoid", ["c"], ["y"]),
        ],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 64, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 3, 64, 64])],
        [w, b],
    )
    fast, report = optimize_model(model, ["space_to_depth_conv"])
    ops = [n.op_type for n in fast.graph.node]
    assert report["space_to_depth_conv"]["rewrites"] == 1
    assert ops == ["Pad", "SpaceToDepth", "Conv", "Sigmoid", "DepthToSpace"]  # sigmoid still next to the conv
    assert max_difference(model, fast) < 1e-5


def test_passes_leave_what_they_cannot_prove_alone():
    """Border padding, a stride-2 conv and a conv with many output channels are not rewritten."""
    rng = np.random.default_rng(2)
    wide = onnx.numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32), "w")
    model = _model(
        [
            h.make_node("GridSample", ["x", "g"], ["s"], padding_mode="border"),
            h.make_node("Conv", ["s", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        ],
        [_info("x", ["N", 4, 64, 64]), _info("g", ["N", 64, 64, 2])],
        [_info("y", ["N", 16, 64, 64])],
        [wide],
    )
    same, report = optimize_model(model, PASSES)
    assert all(r["rewrites"] == 0 for r in report.values())
    assert [n.op_type for n in same.graph.node] == ["GridSample", "Conv"]


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    from helpers import make_model

    from dagan.config import load_config
    from export.onnx_export import export_model

    root = tmp_path_factory.mktemp("cpu")
    model = make_model(load_config("tiny"))
    export_model(model, root / "fp32", progress=False)
    manifest = optimize_export(root / "fp32", root / "cpu")
    return model, root / "fp32", root / "cpu", manifest


def test_optimized_frame_graph_of_a_real_export(tiny_exports):
    """Every pass fires on the DaGAN frame graph, the outputs stay within float rounding, and the
    engine on the CPU graph gives the plain export's frames."""
    from engine.onnx_backend import OnnxRuntimeEngine

    _, fp32, cpu, manifest = tiny_exports
    report = manifest["cpu_graph"]["report"]
    assert manifest["cpu_graph"]["passes"] == [p for p in PASSES if report[p]["rewrites"]]
    assert report["gather_grid_sample"]["rewrites"] >= 2 and report["pixel_matmul"]["rewrites"] >= 1
    assert all(r["max_abs_diff"] <= TOLERANCE for r in report.values() if r["rewrites"])
    assert "GridSample" not in manifest["graphs"]["frame"]["ops"]
    a, b = onnx.load(str(fp32 / "frame.onnx")), onnx.load(str(cpu / "frame.onnx"))
    assert max_difference(a, b, batch=3) < TOLERANCE
    # the once-per-photo graph is copied; the per-frame ones (the steadied split path too) are rewritten
    assert (cpu / "source_encoder.onnx").read_bytes() == (fp32 / "source_encoder.onnx").read_bytes()
    reports = manifest["cpu_graph"]["reports"]
    assert set(reports) == {"frame", "generator", "depth", "keypoints"}
    assert reports["generator"]["gather_grid_sample"]["rewrites"] >= 2
    for g in ("generator", "depth", "keypoints"):
        a, b = onnx.load(str(fp32 / f"{g}.onnx")), onnx.load(str(cpu / f"{g}.onnx"))
        assert max_difference(a, b, batch=2) < TOLERANCE, g
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    outs = []
    for d in (fp32, cpu):
        eng = OnnxRuntimeEngine(d, device="cpu", threads=1)
        eng.set_source(frames[0], relative=True)
        outs.append([eng.animate(f).image.astype(int) for f in frames[1:]])
    assert max(np.abs(x - y).max() for x, y in zip(*outs, strict=True)) <= 1
    from export.optimize import ExportError

    with pytest.raises(ExportError, match="already optimized"):
        optimize_export(cpu, cpu.parent / "again")


def test_quantizer_still_keeps_the_heads_float_on_the_cpu_graph(tiny_exports):
    """The rewritten heads (a fused mask/occlusion conv behind a Split, the output conv before its
    DepthToSpace) are still found as heads, so they stay float in int8."""
    from export.quantize import head_convs

    _, fp32, cpu, _ = tiny_exports
    plain = head_convs(onnx.load(str(fp32 / "frame.onnx")).graph)
    fast = onnx.load(str(cpu / "frame.onnx")).graph
    heads = head_convs(fast)
    assert len(heads) >= 3 and len(plain) >= 3
    producer = {o: n for n in fast.node for o in n.output}
    final = [n for n in fast.node if n.op_type == "Sigmoid" and producer[n.input[0]].op_type == "Conv"]
    assert final and all(producer[n.input[0]].name in heads for n in final)


def test_random_feed_matches_the_graph_inputs(tiny_exports):
    _, fp32, _, _ = tiny_exports
    model = onnx.load(str(fp32 / "frame.onnx"))
    feed = random_feed(model, batch=2)
    names = [i.name for i in model.graph.input]
    assert list(feed) == names and all(v.shape[0] == 2 for v in feed.values())


# -- the default engine ----------------------------------------------------------------------------


def test_split_threads_follows_the_measured_costs():
    from engine.select import split_threads

    assert split_threads(1, 30.0) == 1
    assert split_threads(2, 22.0, 9.0) == 1  # the project's 2-core machine: one core stays with the media
    assert split_threads(2, None) == 1
    assert split_threads(8, 24.0, 8.0) == 6
    assert split_threads(8, 2.0, 8.0) == 1
    assert split_threads(16, 100.0, 1.0) == 15  # never all of them


def test_default_parallel_gives_every_core_a_call():
    from engine.select import default_parallel

    assert default_parallel(2, 1) == 2  # the project's 2-core machine: two one-thread calls per batch
    assert default_parallel(2, 2) == 1
    assert default_parallel(8, 3) == 2
    assert default_parallel(1, 1) == 1


def test_parallel_calls_give_the_frames_of_one_call(tiny_exports, astronaut, grace_hopper, monkeypatch):
    """A batch split into parallel calls (engine/onnx_backend.py) gives the frames of one call for every
    stream, in order, for the fused frame graph and the steadied split path; a batch of one is one call;
    0 parallel calls is refused."""
    import cv2

    from dagan.smoothing import OneEuroFilter, OneEuroParams
    from engine.base import EngineError
    from engine.onnx_backend import OnnxRuntimeEngine, OrtRunner

    _, _, cpu, _ = tiny_exports
    one = OnnxRuntimeEngine(cpu, device="cpu", threads=1)
    split = OnnxRuntimeEngine(cpu, device="cpu", threads=1, parallel=2)
    assert (one.parallel, split.parallel) == (1, 2)
    size = one.image_size
    faces = [cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in (astronaut, grace_hopper)]
    sources = [faces[0], faces[1], faces[0][:, ::-1].copy()]
    drivers = [faces[1], faces[0][::-1].copy(), faces[1][:, ::-1].copy()]
    calls = []
    real = OrtRunner._run_parallel
    monkeypatch.setattr(OrtRunner, "_run_parallel", lambda self, *a: calls.append(a[2]) or real(self, *a))
    for steadied in (False, True):
        sessions = {e: [e.new_session(s, relative=True) for s in sources] for e in (one, split)}
        if steadied:
            for group in sessions.values():
                for s in group:
                    s.kp_filter = OneEuroFilter(OneEuroParams(1.0, 30.0))
        for _ in range(2):  # the first frame also sets each stream's reference
            a = one.predict_batch(sessions[one], drivers)[0]
            b = split.predict_batch(sessions[split], drivers)[0]
            assert a.shape == b.shape == (3, 3, size, size)
            assert float((a - b).abs().max()) < 1e-5
            # the streams differ by far more than that, so a batch put back out of order would fail
            assert min(float((a[i] - a[j]).abs().max()) for i, j in ((0, 1), (1, 2), (0, 2))) > 1e-4
    assert calls and set(calls) == {3}  # every graph of the frame path was split
    # the other threads' CPU is counted for the server's infer stage
    assert split.parallel_cpu_s > 0 and one.parallel_cpu_s == 0
    calls.clear()
    lone = [split.new_session(sources[0])]
    got = split.animate_batch(lone, [drivers[0]])[0].image
    assert not calls  # a batch of one: one call ...
    # ... on the session whose intra-op threads are every core the parallel calls use, same frame
    assert split.runner.solo_threads == 2 and one.runner.solo_threads is None
    solo = split.runner.solo_sessions["frame"]
    assert solo.get_session_options().intra_op_num_threads == 2
    assert split.runner.sessions["frame"].get_session_options().intra_op_num_threads == 1
    want = one.animate_batch([one.new_session(sources[0])], [drivers[0]])[0].image
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    ran = []
    monkeypatch.setattr(solo, "run", lambda *a, real=solo.run: ran.append(1) or real(*a))
    split.animate_batch(lone, [drivers[1]])
    assert ran  # a batch of one ran the lone-stream session
    # a steadied lone stream runs the split path on the lone-stream sessions too
    assert {"depth", "keypoints", "source_encoder"} <= set(split.runner.solo_sessions)
    lone[0].kp_filter = OneEuroFilter(OneEuroParams(1.0, 30.0))
    split.animate_batch(lone, [drivers[2]])
    assert "generator" in split.runner.solo_sessions
    with pytest.raises(EngineError, match="parallel must be at least 1"):
        OnnxRuntimeEngine(cpu, device="cpu", parallel=0)


def test_untrained_and_explicit_choices_do_not_prepare_anything(tmp_path, monkeypatch):
    from helpers import make_model

    import engine.select as select
    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config

    monkeypatch.setenv("DAGAN_CACHE", str(tmp_path / "cache"))
    model = make_model(load_config("tiny"))
    ckpt = tmp_path / "random.safetensors"
    save_checkpoint(ckpt, model.config, model, extra_metadata={"trained": "false"})
    monkeypatch.setattr(select, "choose_cpu", lambda *a, **k: pytest.fail("must not prepare"))
    eng, choice = select.default_engine(ckpt, device="cpu", threads=1, progress=False, measure=False)
    assert (choice.backend, choice.precision) == ("torch", "fp32") and "untrained" in choice.reason
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(trained, model.config, model)
    eng, choice = select.default_engine(trained, backend="torch", device="cpu", progress=False, measure=False)
    assert eng.backend == "torch" and "as asked" in choice.reason and choice.threads >= 1
    assert not (tmp_path / "cache").exists()


def test_default_engine_prepares_int8_once_and_says_why(tmp_path, monkeypatch, astronaut, grace_hopper):
    """Trained weights on a CPU: the CPU graph and its int8 copy are made on the first call (calibrated
    and checked on the clips of $DAGAN_CALIB_CLIPS here), chosen when the held-out check holds, and
    found in the cache afterwards; a failed check falls back to fp32 (or bf16 where native)."""
    from helpers import make_model
    from test_quantize import _clip

    import engine.select as select
    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config

    monkeypatch.setenv("DAGAN_CACHE", str(tmp_path / "cache"))
    calib, check = (
        _clip(astronaut, tmp_path / "a.mp4", seed=1),
        _clip(grace_hopper, tmp_path / "g.mp4", seed=2),
    )
    monkeypatch.setenv("DAGAN_CALIB_CLIPS", f"{calib};{check}")
    model = make_model(load_config("tiny"))
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.config, model)
    lines = []
    eng, choice = select.default_engine(ckpt, device="cpu", progress=lines.append)
    assert any("first start" in line for line in lines)
    int8 = next((tmp_path / "cache" / "onnx-int8").glob("*/manifest.json"))
    manifest = json.loads(int8.read_text())
    quality = manifest["quality"]
    assert manifest["precision"] == "int8" and manifest["cpu_graph"]["passes"]
    assert quality["clips"] == ["g"] and quality["frames"] > 0
    # the steadied split path (depth → keypoints → generator) is quantized and checked too
    assert manifest["quantization"]["graphs"] == ["frame", "generator", "depth"]
    assert quality["split_path"]["frames"] == quality["frame_graph"]["frames"] > 0
    assert quality["psnr_db"] == min(quality["split_path"]["psnr_db"], quality["frame_graph"]["psnr_db"])
    expected = "int8" if quality["psnr_db"] >= select.INT8_MIN_PSNR_DB else None
    if expected:
        assert (eng.backend, choice.precision) == ("onnxruntime", "int8") and "dB" in choice.reason
    assert choice.threads >= 1 and choice.frame_ms > 0 and choice.label in choice.describe()
    assert choice.parallel == eng.parallel == select.default_parallel(select.cpu_cores(), choice.threads)
    assert (f"{choice.parallel} parallel calls" in choice.describe()) == (choice.parallel > 1)
    # timed alone on one thread for the split; a lone stream then runs on every inference core
    assert choice.frame_threads == 1 and "on 1 thread measured" in choice.describe()
    assert (f"a lone stream on {choice.threads * choice.parallel} threads" in choice.describe()) == (
        choice.parallel > 1
    )
    # second start: nothing prepared again
    stamp = int8.stat().st_mtime_ns
    lines.clear()
    select.default_engine(ckpt, device="cpu", progress=lines.append, measure=False, threads=1)
    assert not any("first start" in line for line in lines) and int8.stat().st_mtime_ns == stamp
    # a check that misses the bound: fp32 on the CPU graph (bf16 only where the CPU has it)
    monkeypatch.setattr(select, "INT8_MIN_PSNR_DB", 1000.0)
    monkeypatch.setattr(select, "cpu_has_bf16", lambda: False)
    eng, choice = select.default_engine(ckpt, device="cpu", progress=False, measure=False, threads=1)
    assert (eng.backend, choice.precision) == ("onnxruntime", "fp32") and "misses" in choice.reason
    assert "onnx-cpu" in str(eng.runner.sessions["frame"]._model_path)


def test_calibration_source_is_named_without_reading_frames(monkeypatch, tmp_path):
    from export.quantize import REAL_CLIPS, ExportError, default_calibration

    source = default_calibration(env="")
    if REAL_CLIPS.is_dir() and (REAL_CLIPS / "d9.mp4").is_file():
        assert source.label.startswith("real-faces:") and len(source.check) == 3
    else:
        assert source.label.startswith("samples:")
    with pytest.raises(ExportError, match="CALIB_CLIPS;CHECK_CLIPS"):
        default_calibration(env=str(tmp_path))


def test_bench_has_the_cpu_graph_rows_and_an_op_profile(tmp_path, capsys):
    """`dagan bench` times the plain and CPU-graph onnxruntime engines side by side, and with
    --profile says where each frame graph's time goes, by operator."""
    from commands.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--frames", "2", "--warmup", "1", "--device", "cpu"]
    args += ["--backends", "onnxruntime", "--interleaved", "--profile", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    (r,) = json.loads(out.read_text())
    rows = r["interleaved"]["rows"]
    for name in ("onnxruntime fp32", "onnxruntime fp32 +cpu_graph", "onnxruntime int8 +cpu_graph"):
        assert rows[name]["frames"] == 2, r["errors"]
    prof = r["op_profile"]
    assert "GridSample" in {x["op"] for x in prof["onnxruntime fp32"]}
    assert "GridSample" not in {x["op"] for x in prof["onnxruntime fp32 +cpu_graph"]}
    assert abs(sum(x["share"] for x in prof["onnxruntime int8 +cpu_graph"]) - 1) < 1e-6
    assert "kernel time" in capsys.readouterr().out


def test_bench_parallel_rows_time_batches_split_into_parallel_calls(tmp_path, capsys):
    """`dagan bench --parallel 2`: the CPU-graph rows again with each batch split into two calls, their
    batches timed like the others; refused with the interleaved (batch-1) rows or below 1."""
    from commands.cli import main

    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--preset",
        "tiny",
        "--frames",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    args += ["--backends", "onnxruntime", "--batches", "1,2", "--parallel", "2", "--json", str(out)]
    assert main(args) == 0
    (r,) = json.loads(out.read_text())
    rows = {b["name"]: b for b in r["backends"]}
    for name in ("onnxruntime fp32 +cpu_graph", "onnxruntime int8 +cpu_graph"):
        split = rows[f"{name} +parallel=2"]
        assert split["options"]["parallel"] == 2, r["errors"]
        assert [t["batch"] for t in split["throughput"]] == [1, 2]
        assert all(t["batch_ms"] > 0 for t in split["throughput"])
    assert "+parallel=2" in capsys.readouterr().out
    for bad in (["--parallel", "0"], ["--parallel", "2", "--interleaved"]):
        with pytest.raises(SystemExit, match="--parallel"):
            main(["bench", "--preset", "tiny", "--device", "cpu", *bad])


def test_bench_baseline_times_two_checkpoints_in_the_same_rounds(tmp_path, capsys):
    """`dagan bench --interleaved --baseline`: the baseline checkpoint's rows run in the same rounds
    as the checkpoint's, named apart, with both FLOP counts (here the half-resolution depth switch
    against the full one: fewer FLOPs per frame); without --interleaved the flag is refused."""
    import torch

    from commands.cli import main
    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config
    from dagan.model import DaGAN

    cfg = load_config("tiny").replace(image_size=128)
    for name, c in (("half", cfg.replace(**{"depth.input_scale": 0.5})), ("full", cfg)):
        torch.manual_seed(0)
        save_checkpoint(tmp_path / f"{name}.safetensors", c, DaGAN(c))
    out = tmp_path / "bench.json"
    half, full = str(tmp_path / "half.safetensors"), str(tmp_path / "full.safetensors")
    args = ["bench", "--checkpoint", half, "--baseline", full, "--frames", "2", "--warmup", "1"]
    args += ["--device", "cpu", "--backends", "onnxruntime", "--interleaved", "--threads", "1"]
    assert main([*args, "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    rows = r["interleaved"]["rows"]
    assert rows["onnxruntime int8 +cpu_graph"]["frames"] == 2, r["errors"]
    assert rows["onnxruntime int8 +cpu_graph [baseline full.safetensors]"]["frames"] == 2, r["errors"]
    assert r["baseline"]["flops"]["per_frame_gflops"] > r["flops"]["per_frame_gflops"]
    assert "baseline" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--interleaved"):
        main(args[:9])
