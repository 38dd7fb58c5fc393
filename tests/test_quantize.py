"""Low-precision CPU inference: ``dagan export quantize`` (int8, calibrated on face crops) and the
engines' precision switch (onnxruntime int8, torch bf16), each checked against fp32 on real faces.

The calibration and check clips are made here from the astronaut and Grace Hopper portraits (real faces,
bundled with scikit-image / matplotlib), moved and zoomed a little per frame and written as mp4, so the
whole path — video → the project's face tracker → crops → calibration — runs as it does on real clips.
The model is the bundled default (trained) when present: quantization error on random weights says
little about a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from commands.cli import main
from engine import EngineError, create_engine
from engine.onnx_backend import OnnxRuntimeEngine
from engine.torch_backend import TorchEngine
from export.onnx_export import ExportError, export_model
from export.quantize import (
    FaceClip,
    excluded_nodes,
    face_clips,
    find_clips,
    group_of,
    held_out_psnr,
    output_psnr,
    quantize_before_resize,
    quantize_export,
)

BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "dagan-default.safetensors"
# Bounds, with margin under what the bundled models measure on the real clips: the old 64×64 tiny gave
# int8 ≈ 48 dB (keypoint detector in float) and bf16 ≈ 47 dB (docs/export.md); the 128×128 live-128
# default gives int8 >= 35 dB and bf16 32.6–38.0 dB on these check frames (bf16 keeps 8 mantissa bits
# through a deeper net at 4× the pixels). A broken path (wrong scales, a quantized coordinate path, a
# bf16 grid) lands far below, at 15–28 dB.
INT8_MIN_PSNR = 35.0
BF16_MIN_PSNR = 31.0


def _clip(image: np.ndarray, path: Path, frames: int = 9, seed: int = 0) -> Path:
    """A short talking-head-like clip of a still portrait: small shifts and zooms each frame."""
    from dagan.media import write_video

    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    out = []
    for i in range(frames):
        scale = 1.0 + 0.03 * np.sin(i / 2)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-4, 4)), scale)
        m[:, 2] += rng.uniform(-0.02, 0.02, 2) * (w, h)
        out.append(cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    write_video(path, out, fps=25)
    return path


@pytest.fixture(scope="module")
def model():
    from dagan.checkpoint import load_model

    if BUNDLED.is_file():
        return load_model(BUNDLED)
    from helpers import make_model

    from dagan.config import load_config

    return make_model(load_config("tiny"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory, astronaut, grace_hopper):
    d = tmp_path_factory.mktemp("clips")
    return {
        "calib": _clip(astronaut, d / "calib.mp4", seed=1),
        "check": _clip(grace_hopper, d / "check.mp4", seed=2),
    }


@pytest.fixture(scope="module")
def exports(model, clips, tmp_path_factory):
    """fp32 export, and its int8 copy made through the CLI (a handful of calibration frames)."""
    root = tmp_path_factory.mktemp("quant")
    fp32 = root / "fp32"
    export_model(model, fp32, progress=False)
    int8 = root / "int8"
    code = main(
        [
            "export", "quantize", "--onnx", str(fp32), "--calib-clips", str(clips["calib"]),
            "--out", str(int8), "--frames-per-clip", "4", "--stride", "2", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    return fp32, int8


@pytest.fixture(scope="module")
def check_crops(model, clips):
    (clip,) = face_clips([clips["check"]], model.config.image_size, frames_per_clip=4, stride=2)
    return clip


def test_quantize_command_writes_an_int8_export(exports):
    fp32, int8 = exports
    manifest = json.loads((int8 / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["precision"] == "int8" and q["format"] == "qdq" and q["per_channel"]
    assert q["calibration"]["frames"] == 4 and q["calibration"]["clips"] == ["calib"]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= set(manifest["graphs"]["frame"]["ops"])
    import onnx

    graph = onnx.load(str(int8 / "frame.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    quantized = [
        n for n in graph.node
        if n.op_type == "Conv" and producer.get(n.input[1]) is not None
        and producer[n.input[1]].op_type == "DequantizeLinear"
    ]  # fmt: skip
    assert quantized, "no convolution got int8 weights"
    # the decoder's up blocks upsample uint8: quantized before the nearest Resize, not after it
    assert q["quantize_before_resize"]["frame"] >= 1
    for n in graph.node:
        if n.op_type == "Resize" and producer.get(n.input[0]) is not None:
            mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest")
            after = [c for c in graph.node if n.output[0] in c.input]
            if mode == "nearest" and group_of(n.name) == "generator" and after:
                assert all(c.op_type != "QuantizeLinear" for c in after), n.name
    # the keypoint detector (kept float by default) has no int8 convolution, the other groups do
    assert {group_of(n.name) for n in quantized} >= {"depth_net", "generator"}
    assert "kp_detector" not in {group_of(n.name) for n in quantized}
    # the coordinate / probability ops never see quantized inputs
    for n in graph.node:
        if n.op_type in ("GridSample", "Softmax", "Sigmoid", "ReduceSum"):
            assert all(
                producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input
            ), n.name
    # the once-per-source and reference graphs are the fp32 ones, byte for byte
    for g in ("source_encoder", "keypoints"):
        assert (int8 / f"{g}.onnx").read_bytes() == (fp32 / f"{g}.onnx").read_bytes()


def test_int8_engine_stays_close_to_fp32(exports, check_crops):
    fp32, int8 = exports
    ref = OnnxRuntimeEngine(fp32, device="cpu")
    q = OnnxRuntimeEngine(int8, device="cpu", precision="int8")
    assert q.precision == "int8"
    for relative in (False, True):
        scores = output_psnr(ref, q, [check_crops], relative=relative)
        assert len(scores) == 4
        assert min(scores) >= INT8_MIN_PSNR, (relative, scores)
        assert max(scores) < 100.0  # really a different (quantized) graph, not the fp32 one again
    # the CLI's --check-clips figure (the graphs run directly, absolute motion) agrees with the engines'
    graphs = held_out_psnr(fp32, int8, [check_crops])
    assert graphs["frames"] == 4 and graphs["psnr_min_db"] >= INT8_MIN_PSNR
    assert abs(graphs["psnr_db"] - float(np.mean(output_psnr(ref, q, [check_crops])))) < 1.0


def test_bf16_torch_engine_matches_fp32(model, check_crops):
    import copy

    ref = TorchEngine(copy.deepcopy(model), device="cpu")
    bf = TorchEngine(copy.deepcopy(model), device="cpu", precision="bf16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    scores = output_psnr(ref, bf, [check_crops], relative=True)
    assert min(scores) >= BF16_MIN_PSNR and max(scores) < 100.0, scores


def test_unsupported_precisions_are_clear_errors(exports, model, tmp_path):
    fp32, int8 = exports
    with pytest.raises(EngineError, match=r"no bf16 CPU kernels.*torch"):
        OnnxRuntimeEngine(fp32, device="cpu", precision="bf16")
    with pytest.raises(EngineError, match="dagan export quantize"):
        OnnxRuntimeEngine(fp32, device="cpu", precision="int8")
    with pytest.raises(EngineError, match="int8 export; open it with precision 'int8'"):
        OnnxRuntimeEngine(int8, device="cpu")
    with pytest.raises(EngineError, match="no int8 path"):
        TorchEngine(model, device="cpu", precision="int8")
    with pytest.raises(EngineError, match="dagan export quantize"):
        create_engine(fp32, backend="onnxruntime", precision="int8", device="cpu")
    crops = [FaceClip("x", np.zeros((64, 64, 3), np.uint8), [np.zeros((64, 64, 3), np.uint8)])]
    with pytest.raises(ExportError, match="already a int8 export"):
        quantize_export(int8, tmp_path / "again", crops)
    with pytest.raises(ExportError, match="unknown sub-network"):
        excluded_nodes(fp32 / "frame.onnx", ["decoder"])
    with pytest.raises(ExportError, match="not found"):
        find_clips([tmp_path / "missing.mp4"])


def test_quantize_cli_errors_are_one_line(tmp_path, capsys):
    code = main(["export", "quantize", "--onnx", str(tmp_path), "--calib-clips", str(tmp_path), "--out",
                 str(tmp_path / "q")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dagan: error:") and len(err.strip().splitlines()) == 1


def test_bench_times_low_precision_rows_interleaved(model, exports):
    from bench.model import AUTHORS, bench_interleaved

    _, int8 = exports
    engines = [("onnxruntime int8", OnnxRuntimeEngine(int8, device="cpu", precision="int8"))]
    result = bench_interleaved(model, engines, frames=2, warmup=1, device=torch.device("cpu"))
    rows = result["rows"]
    assert list(rows) == [AUTHORS, "torch fp32", "onnxruntime int8"]
    for s in rows.values():
        assert s["frames"] == 2 and 0 < s["median_ms"] <= s["p99_ms"] and s["vs_authors"] > 0
    assert rows[AUTHORS]["vs_authors"] == 1.0 and len(result["load_before"]) == 3


def _resize_graph(mode: str = "nearest", second_reader: bool = False):
    """x (1×2×3×3 float) → 2× Resize → QuantizeLinear → DequantizeLinear → Conv 1×1: the shape of an
    up block's input after static quantization (optionally with a float reader of the upsampled map)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(3, 2, 1, 1) / 10
    inits = [
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(7, np.uint8), "z"),
        numpy_helper.from_array(w, "w"),
    ]
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize", mode=mode),
        helper.make_node("QuantizeLinear", ["up", "s", "z"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant"),
        helper.make_node("Conv", ["dq", "w"], ["y"], name="conv"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["up"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_graph(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )


def test_quantize_before_resize_gives_the_same_bits_on_the_small_tensor():
    x = np.random.default_rng(0).uniform(-1, 12, (1, 2, 3, 3)).astype(np.float32)
    model = _resize_graph()
    before = _run_graph(model, x)
    assert quantize_before_resize(model) == 1
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["resize"].input[0] == nodes["quant"].output[0]  # Resize now reads the uint8 tensor
    assert nodes["quant"].input[0] == "x"
    order = [n.name for n in model.graph.node]
    assert order.index("quant") < order.index("resize") < order.index("dequant")
    after = _run_graph(model, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("mode,second_reader", [("linear", False), ("nearest", True)])
def test_quantize_before_resize_leaves_interpolation_and_shared_maps_alone(mode, second_reader):
    """Linear interpolation does not commute with rounding, and a float reader of the upsampled map
    must keep it: neither moves."""
    model = _resize_graph(mode, second_reader)
    assert quantize_before_resize(model) == 0
    assert next(n for n in model.graph.node if n.name == "quant").input[0] == "up"


def test_bench_passes_time_the_int8_recipe_without_each_step(tmp_path):
    """``dagan bench --passes`` adds one int8 row per optional recipe step, each built without it."""
    from helpers import make_model

    from bench.engines import INT8_STEPS, variant_engine
    from bench.model import _variant_name, _variants
    from dagan.config import load_config

    rows = [r for r in _variants(torch.device("cpu"), passes=True) if "int8_without" in r[2]]
    assert [r[2]["int8_without"] for r in rows] == list(INT8_STEPS)
    assert _variant_name(*rows[0]) == "onnxruntime int8 +cpu_graph +int8_without=quantize_before_resize"
    tiny = make_model(load_config("tiny"))
    for step in INT8_STEPS:
        options = {"cpu_graph": True, "int8_without": step}
        variant_engine(tiny, "onnxruntime", "int8", options, "cpu", tmp_path)
        manifest = tmp_path / f"onnx-cpu-int8-without-{step}" / "manifest.json"
        q = json.loads(manifest.read_text())["quantization"]
        assert set(q["quantize_before_resize"].values()) == {0}
    with pytest.raises(ValueError, match="int8_without must be one of"):
        variant_engine(tiny, "onnxruntime", "int8", {"cpu_graph": True, "int8_without": "x"}, "cpu", tmp_path)
