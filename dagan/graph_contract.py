"""The tensor contract between the model, the exporter and every runtime: graph names, flat tensor names
and roles, the one per-frame function, and the ONNX manifest that records them.

It sits below both ``export/`` (which writes graphs and manifests) and ``engine/`` (which runs them), so
neither imports the other for it. ONNX and TensorRT only see tensors, so the model's named tuples
(:class:`~dagan.model.SourceState`, :class:`~dagan.nets.keypoints.Keypoints`, ...) are flattened here,
once, under fixed names.

Graphs (B = batch, the only dynamic axis; H = W = image size, K keypoints, C×h×w the generator's
feature map, N = h·w attention positions, c query channels, m×m the dense-motion resolution):

- ``depth``: image B×3×H×W → depth B×1×H×W.
- ``keypoints``: image B×3×H×W (+ depth B×1×H×W for the RGB-D detector) → kp_value B×K×2,
  kp_jacobian B×K×2×2.
- ``source_encoder``: source B×3×H×W → everything cached per source photo: source_depth, source_kp_value,
  source_kp_jacobian, source_features B×C×h×w, source_query B×N×c, motion_image B×3×m×m,
  motion_heatmap B×K×m×m, and with ``generator.warped_skips`` source_skip<l> B×C_l×H/2^l×W/2^l.
- ``generator``: the cached tensors + kp_driving_value/jacobian → prediction B×3×H×W (dense motion, warp,
  occlusion, attention, decoder): rendering from keypoints the caller already has.
- ``frame``: the whole per-frame path, :func:`frame_step`: driving B×3×H×W + the cached tensors + each
  item's motion reference (kp_reference_value/jacobian, motion_scale B×1×1, relative B×1×1, and
  mouth_gain B×1×1 when the config names the lip keypoints) → prediction, driving_depth,
  kp_driving_value/jacobian.

Optional tensors (depth, Jacobians, attention query, skips) exist only when the config has them.

Every graph input has a **role** (:data:`ROLES`), written into the manifest by the exporter, so a
runtime knows which inputs are a session's cached source tensors and which are per-stream motion without
guessing from names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError
from .keypoint_ops import relative_keypoints
from .nets.dense_motion import MotionSourceCache
from .nets.generator import SourceFeatures
from .nets.keypoints import Keypoints

GRAPH_NAMES = ("depth", "keypoints", "source_encoder", "generator", "frame")

# Input roles. image: a B×3×H×W picture; depth: a depth map computed by another graph; cached: a tensor
# of a session's cached source (stacked per batch, reused across frames); motion: a session's per-stream
# relative-motion state (reference keypoints, movement scale, relative flag); keypoints: driving
# keypoints the caller already has.
ROLE_IMAGE, ROLE_DEPTH, ROLE_CACHED, ROLE_MOTION, ROLE_KEYPOINTS = (
    "image",
    "depth",
    "cached",
    "motion",
    "keypoints",
)
ROLES = (ROLE_IMAGE, ROLE_DEPTH, ROLE_CACHED, ROLE_MOTION, ROLE_KEYPOINTS)

MANIFEST = "manifest.json"
# 2: every input spec carries its "role".
MANIFEST_VERSION = 2


class ExportError(UserError, RuntimeError):
    """An export that cannot be produced or read (bad directory, stale manifest, failed check)."""


# -- names ---------------------------------------------------------------------------------------------
def has_jacobian(config: ModelConfig) -> bool:
    return config.keypoints.estimate_jacobian


def has_query(config: ModelConfig) -> bool:
    return config.generator.attention.enabled


def skip_names(config: ModelConfig) -> list[str]:
    """``source_skip<l>`` for each warped encoder level (generator.warped_skips), level 0 first."""
    if not config.generator.warped_skips:
        return []
    return [f"source_skip{level}" for level in range(config.generator.num_down_blocks)]


def cached_names(config: ModelConfig) -> list[str]:
    """Names of the per-source tensors the generator needs, in graph-input order."""
    names = ["source_kp_value"]
    if has_jacobian(config):
        names.append("source_kp_jacobian")
    names.append("source_features")
    if has_query(config):
        names.append("source_query")
    return [*names, "motion_image", "motion_heatmap", *skip_names(config)]


def kp_names(config: ModelConfig, prefix: str) -> list[str]:
    return [f"{prefix}_value", f"{prefix}_jacobian"] if has_jacobian(config) else [f"{prefix}_value"]


def has_mouth_gain(config: ModelConfig) -> bool:
    return bool(config.keypoints.mouth_keypoints)


def motion_names(config: ModelConfig) -> list[str]:
    """The frame graph's per-stream motion inputs (``mouth_gain`` only when the config names the lip
    keypoints, so graphs of other configs keep their inputs)."""
    gain = ["mouth_gain"] if has_mouth_gain(config) else []
    return [*kp_names(config, "kp_reference"), "motion_scale", "relative", *gain]


def graph_io(config: ModelConfig, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of one graph for this config."""
    if graph == "depth":
        return ["image"], ["depth"]
    if graph == "keypoints":
        ins = ["image", "depth"] if config.keypoints.use_depth else ["image"]
        return ins, kp_names(config, "kp")
    if graph == "source_encoder":
        return ["source"], (["source_depth"] if config.needs_depth else []) + cached_names(config)
    if graph == "generator":
        return cached_names(config) + kp_names(config, "kp_driving"), ["prediction"]
    if graph == "frame":
        ins = ["driving", *cached_names(config), *motion_names(config)]
        outs = (
            ["prediction"]
            + (["driving_depth"] if config.needs_depth else [])
            + kp_names(config, "kp_driving")
        )
        return ins, outs
    raise ValueError(f"unknown graph {graph!r}; graphs: {', '.join(GRAPH_NAMES)}")


def input_roles(config: ModelConfig, graph: str) -> dict[str, str]:
    """{input name: role} of one graph (what the exporter writes into the manifest)."""
    ins, _ = graph_io(config, graph)
    cached, motion = set(cached_names(config)), set(motion_names(config))

    def role(name: str) -> str:
        if name in cached:
            return ROLE_CACHED
        if name in motion:
            return ROLE_MOTION
        if name == "depth":
            return ROLE_DEPTH
        if name.startswith("kp_driving"):
            return ROLE_KEYPOINTS
        return ROLE_IMAGE

    return {n: role(n) for n in ins}


def graphs_for(config: ModelConfig) -> list[str]:
    """The graphs this config has (no depth graph when nothing uses depth)."""
    return [g for g in GRAPH_NAMES if g != "depth" or config.needs_depth]


# -- flat tensors <-> the model's tuples ---------------------------------------------------------------
def flatten_state(state: Any) -> dict[str, torch.Tensor]:
    """:class:`~dagan.model.SourceState` → {name: tensor} with the names of :func:`cached_names`
    (+ source_depth)."""
    out: dict[str, torch.Tensor] = {}
    if state.depth is not None:
        out["source_depth"] = state.depth
    out["source_kp_value"] = state.kp.value
    if state.kp.jacobian is not None:
        out["source_kp_jacobian"] = state.kp.jacobian
    out["source_features"] = state.features.features
    if state.features.query is not None:
        out["source_query"] = state.features.query
    out["motion_image"] = state.features.motion.image
    out["motion_heatmap"] = state.features.motion.heatmap
    for level, skip in enumerate(state.features.skips):
        out[f"source_skip{level}"] = skip
    return out


def unflatten_cached(t: dict[str, torch.Tensor]) -> tuple[Keypoints, SourceFeatures]:
    """{name: tensor} → (source keypoints, generator source features)."""
    kp = Keypoints(t["source_kp_value"], t.get("source_kp_jacobian"))
    motion = MotionSourceCache(t["motion_image"], t["motion_heatmap"])
    skips = []
    while f"source_skip{len(skips)}" in t:
        skips.append(t[f"source_skip{len(skips)}"])
    return kp, SourceFeatures(t["source_features"], t.get("source_query"), motion, tuple(skips))


def source_keypoints(cached: dict[str, torch.Tensor]) -> Keypoints:
    return Keypoints(cached["source_kp_value"], cached.get("source_kp_jacobian"))


# -- the one per-frame function ------------------------------------------------------------------------
def frame_step(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The per-frame path of every backend: driving depth → driving keypoints → relative transfer →
    generator, on the flat tensors of the ``frame`` graph (inputs and outputs by contract name).

    The PyTorch engine calls it eagerly, its CUDA-graph mode captures it, and the exporter traces it
    (:class:`export.graphs.FrameGraph`) for ONNX Runtime and TensorRT, so all backends run the same
    code. Relative motion is selected per batch item inside (``relative`` B×1×1), so absolute and
    relative streams share one call; ``motion_scale`` B×1×1 is 1 for relative motion without
    movement-scale adaptation; ``mouth_gain`` B×1×1 (configs with ``keypoints.mouth_keypoints``) scales
    the driver's lip opening (:func:`dagan.keypoint_ops.open_mouth`); the model's
    ``keypoints.jacobian_gain`` scales the local motion of the Jacobians (a constant of the graph).
    """
    kp_s, feats = unflatten_cached(x)
    kp_d, depth_d = model.driving_keypoints(x["driving"])
    kp_ref = Keypoints(x["kp_reference_value"], x.get("kp_reference_jacobian"))
    gain = x["mouth_gain"] if has_mouth_gain(model.config) else 1.0  # the input motion_names lists
    mouth = model.config.keypoints.mouth_keypoints
    jac_gain = model.config.keypoints.jacobian_gain  # a constant of the graph
    kp_used = relative_keypoints(kp_s, kp_d, kp_ref, x["motion_scale"], x["relative"], mouth, gain, jac_gain)
    prediction = model.generator.decode(feats, kp_s, kp_used).prediction
    return {
        "prediction": prediction,
        "driving_depth": depth_d,
        "kp_driving_value": kp_d.value,
        "kp_driving_jacobian": kp_d.jacobian,
    }


# -- the manifest --------------------------------------------------------------------------------------
def read_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``DIR/manifest.json``, with one-line errors for the usual mistakes."""
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{onnx_dir} has no {MANIFEST}: run `dagan export onnx` to create it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from exc
    if manifest.get("format") != "dagan-onnx" or manifest.get("version") != MANIFEST_VERSION:
        raise ExportError(
            f"{path} is not a version-{MANIFEST_VERSION} dagan ONNX manifest; re-run `dagan export onnx`"
        )
    for graph, entry in manifest["graphs"].items():
        if not (Path(onnx_dir) / entry["file"]).is_file():
            raise ExportError(f"graph {graph!r} listed in {path} is missing: {entry['file']}")
        for spec in entry["inputs"]:
            if spec.get("role") not in ROLES:
                raise ExportError(
                    f"{path}: input {spec.get('name')!r} of graph {graph!r} has no valid role; "
                    "re-run `dagan export onnx`"
                )
    return manifest


def names_with_role(entry: dict[str, Any], role: str) -> list[str]:
    """Input names of one manifest graph entry that have ``role``, in graph-input order."""
    return [s["name"] for s in entry["inputs"] if s["role"] == role]


# The lid reader (dagan.nets.lid_reader) of a model that blinks travels beside the graphs as this file,
# named by the manifest's "lid_reader" entry: every backend runs it in torch after the frame
# (engine/hot_path.py, step 6), so it needs no graph of its own and no TensorRT build.
LID_READER_FILE = "lid_reader.safetensors"


def write_lid_reader(model: torch.nn.Module, out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``model``'s lid reader beside an export and name it in ``manifest`` (no-op without one)."""
    from safetensors.torch import save_file

    reader = getattr(model, "lid_reader", None)
    if reader is None:
        return
    state = {k: v.detach().float().cpu().contiguous() for k, v in reader.state_dict().items()}
    save_file(state, str(Path(out_dir) / LID_READER_FILE))
    manifest["lid_reader"] = LID_READER_FILE


def copy_lid_reader(src_dir: str | Path, out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Copy an export's lid reader to a derived export (optimized, quantized, TensorRT)."""
    import shutil

    name = manifest.get("lid_reader")
    if name:
        shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)


def load_lid_reader(
    directory: str | Path | None, manifest: dict[str, Any], lids: tuple[int, ...], device: torch.device
):
    """The export's lid reader on the model's lid keypoints ``lids`` (``blink.keypoints``), in eval mode,
    float32, on ``device``; None when the export has none."""
    from safetensors.torch import load_file

    from .nets.lid_reader import LidReader

    name = manifest.get("lid_reader")
    if not name or directory is None:
        return None
    path = Path(directory) / name
    if not path.is_file():
        raise ExportError(f"{path} is missing: the export names a lid reader; re-run `dagan export onnx`")
    reader = LidReader(lids)
    reader.load_state_dict(load_file(str(path)), strict=True)
    return reader.to(device).eval()
