"""Export a DaGAN checkpoint to ONNX: one graph per stage (see :mod:`export.graphs`) plus a manifest.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used at opset 17 because it needs
no extra packages and covers every op the model uses (GridSample is native since opset 16). The model is
exported in eval mode with constant folding, so BatchNorm is folded into the convolutions and only the
inference path is traced: the depth net's coarse-scale disparity heads, the pose net and the
discriminator never appear in a graph.

The manifest (``manifest.json``, read by :func:`dagan.graph_contract.read_manifest`) is the contract
between the exporter and the runtimes: for each graph its file, inputs (with their role: image, depth,
cached source tensor, per-stream motion, keypoints) and outputs with shapes (``"batch"`` for the dynamic
axis) and dtypes, the model config and the SHA-256 of the checkpoint, so a backend can tell which weights
an export came from.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dagan.checkpoint import atomic_write, load_model
from dagan.graph_contract import (
    MANIFEST,
    MANIFEST_VERSION,
    ExportError,
    graph_io,
    graphs_for,
    input_roles,
    read_manifest,
    write_lid_reader,
)
from dagan.helpers import file_sha256
from dagan.model import DaGAN

from .graphs import GRAPH_MODULES, example_inputs

# Re-exported for callers of the exporter (the manifest itself lives in dagan.graph_contract).
__all__ = [
    "MANIFEST",
    "MANIFEST_VERSION",
    "OPSET",
    "ExportError",
    "check_parity",
    "export_graph",
    "export_model",
    "export_onnx",
    "file_sha256",
    "read_manifest",
]

OPSET = 17


def _spec(name: str, t: torch.Tensor, role: str | None = None) -> dict[str, Any]:
    spec = {"name": name, "shape": ["batch", *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}
    if role is not None:
        spec["role"] = role
    return spec


def export_graph(model: DaGAN, graph: str, path: Path, opset: int = OPSET) -> dict[str, Any]:
    """Trace one graph to ``path`` and return its manifest entry (inputs/outputs with shapes)."""
    import onnx

    module = GRAPH_MODULES[graph](model).eval()
    inputs = example_inputs(model, graph, batch=2)
    in_names, out_names = graph_io(model.config, graph)
    roles = input_roles(model.config, graph)
    with torch.no_grad():
        outs = module(*inputs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    dynamic = {n: {0: "batch"} for n in [*in_names, *out_names]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        # tracer notes about Python-side shape checks: the shapes they test are fixed by the config
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(tmp),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    tmp.replace(path)
    return {
        "file": path.name,
        "inputs": [_spec(n, t, roles[n]) for n, t in inputs.items()],
        "outputs": [_spec(n, t) for n, t in zip(out_names, outs, strict=True)],
        "nodes": len(proto.graph.node),
        "ops": sorted({n.op_type for n in proto.graph.node}),
    }


def export_model(
    model: DaGAN,
    out_dir: str | Path,
    checkpoint_sha256: str | None = None,
    graphs: list[str] | None = None,
    progress: bool = True,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Export ``model`` (eval mode, CPU, fp32) into ``out_dir``; returns the manifest it writes."""
    if opset < 17:
        raise ExportError(f"opset must be at least 17 (GridSample and LayerNorm-era ops), got {opset}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()
    names = graphs or graphs_for(model.config)
    entries: dict[str, Any] = {}
    for graph in tqdm(names, desc="export onnx", unit="graph", disable=not progress):
        t0 = time.perf_counter()
        entries[graph] = export_graph(model, graph, out / f"{graph}.onnx", opset)
        entries[graph]["export_s"] = round(time.perf_counter() - t0, 2)
    import onnx

    manifest = {
        "format": "dagan-onnx",
        "version": MANIFEST_VERSION,
        "opset": opset,
        "image_size": model.config.image_size,
        "checkpoint_sha256": checkpoint_sha256,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "config": model.config.to_dict(),
        "graphs": entries,
    }
    write_lid_reader(model, out, manifest)
    atomic_write(out / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
    return manifest


def export_onnx(
    checkpoint: str | Path, out_dir: str | Path, progress: bool = True, opset: int = OPSET
) -> dict[str, Any]:
    """``dagan export onnx``: load the checkpoint's weights and export every graph with a manifest."""
    model = load_model(checkpoint)
    return export_model(model, out_dir, file_sha256(checkpoint), progress=progress, opset=opset)


def check_parity(model: DaGAN, onnx_dir: str | Path, batch: int = 2, seed: int = 1) -> dict[str, float]:
    """Max abs difference between onnxruntime (CPU) and PyTorch for each graph, and for the composed
    per-frame path (source_encoder → frame, the cached tensors passing through onnxruntime)."""
    import onnxruntime as ort

    manifest = read_manifest(onnx_dir)
    model = model.to("cpu", torch.float32).eval()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {
        g: ort.InferenceSession(str(Path(onnx_dir) / e["file"]), opts, providers=["CPUExecutionProvider"])
        for g, e in manifest["graphs"].items()
    }
    errors: dict[str, float] = {}
    for graph, sess in sessions.items():
        inputs = example_inputs(model, graph, batch=batch, seed=seed)
        with torch.no_grad():
            ref = GRAPH_MODULES[graph](model)(*inputs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        errors[graph] = max(
            float((torch.from_numpy(g) - r).abs().max()) for g, r in zip(got, ref, strict=True)
        )
    if "source_encoder" in sessions and "frame" in sessions:
        g = torch.Generator().manual_seed(seed + 100)
        size = model.config.image_size
        src = torch.rand(batch, 3, size, size, generator=g)
        drv = torch.rand(batch, 3, size, size, generator=g)
        enc_names = [o["name"] for o in manifest["graphs"]["source_encoder"]["outputs"]]
        cached = dict(
            zip(enc_names, sessions["source_encoder"].run(None, {"source": src.numpy()}), strict=True)
        )
        feed = {"driving": drv.numpy()}
        for spec in manifest["graphs"]["frame"]["inputs"][1:]:
            name = spec["name"]
            if name in cached:
                feed[name] = cached[name]
        # absolute motion: the reference is a placeholder (identity Jacobians) the graph does not use
        feed["kp_reference_value"] = cached["source_kp_value"]
        errors["composed"] = _composed_error(model, sessions["frame"], feed, src, drv, manifest)
    return errors


def _composed_error(model, frame_sess, feed, src, drv, manifest) -> float:
    names = [s["name"] for s in manifest["graphs"]["frame"]["inputs"]]
    b = src.shape[0]
    if "kp_reference_jacobian" in names:
        feed["kp_reference_jacobian"] = (
            torch.eye(2).expand(b, feed["kp_reference_value"].shape[1], 2, 2).numpy()
        )
    feed["motion_scale"] = torch.ones(b, 1, 1).numpy()
    feed["relative"] = torch.zeros(b, 1, 1).numpy()
    feed["mouth_gain"] = torch.ones(b, 1, 1).numpy()
    got = frame_sess.run(["prediction"], {n: feed[n] for n in names})[0]
    with torch.no_grad():
        ref = model(src, drv).prediction
    return float((torch.from_numpy(got) - ref).abs().max())
