"""ONNX export: graphs, manifest, dynamic batch, and onnxruntime parity with PyTorch (tiny preset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from commands.cli import main  # noqa: E402
from dagan.graph_contract import (  # noqa: E402
    GRAPH_NAMES,
    ROLE_CACHED,
    ROLE_MOTION,
    cached_names,
    frame_step,
    names_with_role,
    unflatten_cached,
)
from dagan.nets.keypoints import Keypoints  # noqa: E402
from export.graphs import FrameGraph, example_inputs  # noqa: E402
from export.onnx_export import (  # noqa: E402
    ExportError,
    check_parity,
    export_model,
    file_sha256,
    read_manifest,
)


@pytest.fixture(scope="module", params=["tiny", "live-128"])
def exported(request, tmp_path_factory):
    """A tiny (and a live-128: warped skips, 128×128) checkpoint exported through the CLI, as a user
    would."""
    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config

    tmp = tmp_path_factory.mktemp("export")
    model = make_model(load_config(request.param))
    with torch.no_grad():  # spread the random model's output so the pixel comparison means something
        model.generator.final.weight.mul_(10.0)
    ckpt = tmp / "tiny.safetensors"
    save_checkpoint(ckpt, model.config, model)
    out = tmp / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]) == 0
    return model, ckpt, out


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# Per preset: the source encoder's outputs, and the shapes of a few (independent of the code under test).
EXPECTED_SOURCE = {
    "tiny": (
        [],
        {"source_kp_jacobian": [15, 2, 2], "source_features": [32, 16, 16], "source_query": [256, 8]},
    ),
    "live-128": (
        ["source_skip0", "source_skip1"],
        {
            "source_features": [64, 32, 32],
            "source_query": [1024, 16],
            "source_skip0": [16, 128, 128],
            "source_skip1": [32, 64, 64],
        },
    ),
}


def test_manifest_records_graphs_config_and_hash(exported):
    model, ckpt, out = exported
    manifest = read_manifest(out)
    size = model.config.image_size
    assert set(manifest["graphs"]) == set(GRAPH_NAMES)
    assert manifest["checkpoint_sha256"] == file_sha256(ckpt)
    assert manifest["config"] == model.config.to_dict()
    assert manifest["opset"] >= 17 and manifest["image_size"] == size
    enc = manifest["graphs"]["source_encoder"]
    skips, expected_shapes = EXPECTED_SOURCE[model.config.name]
    assert [o["name"] for o in enc["outputs"]] == [
        "source_depth",
        "source_kp_value",
        "source_kp_jacobian",
        "source_features",
        "source_query",
        "motion_image",
        "motion_heatmap",
        *skips,
    ]
    shapes = {o["name"]: o["shape"] for o in enc["outputs"]}
    for name, shape in expected_shapes.items():
        assert shapes[name] == ["batch", *shape], name
    # the per-frame graph consumes exactly the cached tensors (not the depth, which is for display)
    frame = manifest["graphs"]["frame"]
    frame_in = [i["name"] for i in frame["inputs"]]
    assert frame_in[0] == "driving" and "source_depth" not in frame_in
    assert set(shapes) - {"source_depth"} <= set(frame_in)
    # and the manifest says which inputs are cached source tensors and which are per-stream motion
    assert names_with_role(frame, ROLE_CACHED) == [n for n in shapes if n != "source_depth"]
    # (live-128 names its lip keypoints, so its streams also send their lip-opening gain)
    mouth = ["mouth_gain"] if model.config.keypoints.mouth_keypoints else []
    assert names_with_role(frame, ROLE_MOTION) == [
        "kp_reference_value",
        "kp_reference_jacobian",
        "motion_scale",
        "relative",
        *mouth,
    ]
    assert frame["inputs"][0]["role"] == "image"


def test_graphs_pass_checker_with_dynamic_batch_and_no_training_parts(exported):
    _, _, out = exported
    manifest = read_manifest(out)
    for graph, entry in manifest["graphs"].items():
        proto = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for value in [*proto.graph.input, *proto.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", (graph, value.name)
    depth = onnx.load(str(out / "depth.onnx"))
    ops = [n.op_type for n in depth.graph.node]
    # only the full-resolution disparity head survives (the coarse heads are training-only) and BN is
    # folded into the convolutions
    assert ops.count("Sigmoid") == 1 and "BatchNormalization" not in ops
    assert len(depth.graph.output) == 1
    frame_ops = {n.op_type for n in onnx.load(str(out / "frame.onnx")).graph.node}
    assert "GridSample" in frame_ops and not frame_ops & {"Inverse", "ATen"}


def test_parity_with_torch_at_another_batch_size(exported):
    model, _, out = exported
    errors = check_parity(model, out, batch=3)
    assert set(errors) == {*GRAPH_NAMES, "composed"}
    assert max(errors.values()) <= 1e-3, errors
    # the comparison is not trivially passing on saturated outputs
    with torch.no_grad():
        size = model.config.image_size
        pred = model(*[torch.rand(2, 3, size, size) for _ in range(2)]).prediction
    assert pred.std() > 0.02


def test_frame_graph_relative_motion_matches_keypoint_ops(exported):
    """Mixed batch: item 0 relative, item 1 absolute, against the transfer formula written out."""
    model, _, out = exported
    inputs = example_inputs(model, "frame", batch=2, seed=4)
    ref_kp = Keypoints(
        inputs["kp_reference_value"] + 0.05, inputs["kp_reference_jacobian"] * 1.1
    )  # a reference that differs from the driving pose
    inputs["kp_reference_value"], inputs["kp_reference_jacobian"] = ref_kp
    sess = _session(out / "frame.onnx")
    got = sess.run(["prediction"], {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        kp_s = Keypoints(inputs["source_kp_value"], inputs["source_kp_jacobian"])
        kp_d, _ = model.driving_keypoints(inputs["driving"])
        # FOMM's relative transfer written out here (torch.linalg.inv), independent of dagan.keypoint_ops
        rel_value = kp_s.value + (kp_d.value - ref_kp.value) * inputs["motion_scale"]
        rel_jac = kp_d.jacobian @ torch.linalg.inv(ref_kp.jacobian) @ kp_s.jacobian
        used = Keypoints(
            torch.cat([rel_value[:1], kp_d.value[1:]]), torch.cat([rel_jac[:1], kp_d.jacobian[1:]])
        )
        _, feats = unflatten_cached(inputs)
        expected = model.generator.decode(feats, kp_s, used).prediction
        absolute = model.generator.decode(feats, kp_s, kp_d).prediction
    assert np.abs(got - expected.numpy()).max() <= 1e-3
    assert np.abs(got[0] - absolute[0].numpy()).max() > 1e-3  # relative really differs from absolute


def test_frame_graph_is_the_per_frame_function(exported):
    """What is exported is dagan.graph_contract.frame_step, the function the torch engine runs."""
    model, _, _ = exported
    inputs = example_inputs(model, "frame", batch=2, seed=8)
    with torch.no_grad():
        traced = FrameGraph(model)(*inputs.values())
        direct = frame_step(model, inputs)
    names = FrameGraph(model).output_names
    for name, t in zip(names, traced, strict=True):
        assert torch.equal(t, direct[name]), name
    assert set(cached_names(model.config)) <= set(inputs)


def test_manifest_errors(tmp_path, exported):
    _, _, out = exported
    with pytest.raises(ExportError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "dagan-onnx", "version": 99, "graphs": {}}))
    with pytest.raises(ExportError, match="version-2"):
        read_manifest(bad)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["graphs"]["frame"]["inputs"][1]["role"]  # a runtime must not guess a role from a name
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for entry in manifest["graphs"].values():
        (bad / entry["file"]).write_bytes(b"")
    with pytest.raises(ExportError, match="no valid role"):
        read_manifest(bad)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["depth"]["file"] = "missing.onnx"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"missing\.onnx"):
        read_manifest(bad)
    with pytest.raises(ExportError, match="opset"):
        export_model(make_model(exported[0].config), tmp_path / "x", opset=13, progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    code = main(
        ["export", "onnx", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dagan: error:") and "\n" not in err
    code = main(["export", "trt", "--onnx", str(tmp_path), "--out", str(tmp_path / "e"), "--max-batch", "0"])
    assert code == 2
