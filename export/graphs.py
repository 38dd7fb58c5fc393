"""The exported graphs as plain ``nn.Module`` wrappers with flat tensor inputs and outputs.

ONNX and TensorRT only see tensors, so the model's named tuples (:class:`~dagan.model.SourceState`,
:class:`~dagan.nets.keypoints.Keypoints`, ...) are flattened here, once, under fixed tensor names that
the manifest, the onnxruntime / TensorRT backends and the PyTorch CUDA-graph path all share.

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
- ``frame``: the whole per-frame path in one graph: driving B×3×H×W + the cached tensors + each item's
  motion reference (kp_reference_value/jacobian, motion_scale B×1×1, relative B×1×1) → prediction,
  driving_depth, kp_driving_value/jacobian. Relative motion transfer happens inside the graph, selected
  per batch item, so a mixed batch of absolute and relative sessions is one call with no host round trip.

Optional tensors (depth, Jacobians, attention query) exist only when the config has them.
"""

from __future__ import annotations

import torch
from torch import nn

from dagan.model import DaGAN, SourceState
from dagan.nets.blocks import inverse_2x2
from dagan.nets.dense_motion import MotionSourceCache
from dagan.nets.generator import SourceFeatures
from dagan.nets.keypoints import Keypoints

GRAPH_NAMES = ("depth", "keypoints", "source_encoder", "generator", "frame")


def has_depth(model: DaGAN) -> bool:
    return model.depth_net is not None


def has_jacobian(model: DaGAN) -> bool:
    return model.kp_detector.jacobian is not None


def has_query(model: DaGAN) -> bool:
    return model.generator.attention is not None


def skip_names(model: DaGAN) -> list[str]:
    """``source_skip<l>`` for each warped encoder level (generator.warped_skips), level 0 first."""
    if not model.generator.warped_skips:
        return []
    return [f"source_skip{level}" for level in range(model.config.generator.num_down_blocks)]


def cached_names(model: DaGAN) -> list[str]:
    """Names of the per-source tensors the generator needs, in graph-input order."""
    names = ["source_kp_value"]
    if has_jacobian(model):
        names.append("source_kp_jacobian")
    names.append("source_features")
    if has_query(model):
        names.append("source_query")
    return [*names, "motion_image", "motion_heatmap", *skip_names(model)]


def _kp_names(model: DaGAN, prefix: str) -> list[str]:
    return [f"{prefix}_value", f"{prefix}_jacobian"] if has_jacobian(model) else [f"{prefix}_value"]


def graph_io(model: DaGAN, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of one graph for this model's config."""
    if graph == "depth":
        return ["image"], ["depth"]
    if graph == "keypoints":
        ins = ["image", "depth"] if model.config.keypoints.use_depth else ["image"]
        return ins, _kp_names(model, "kp")
    if graph == "source_encoder":
        return ["source"], (["source_depth"] if has_depth(model) else []) + cached_names(model)
    if graph == "generator":
        return cached_names(model) + _kp_names(model, "kp_driving"), ["prediction"]
    if graph == "frame":
        ins = ["driving", *cached_names(model), *_kp_names(model, "kp_reference"), "motion_scale", "relative"]
        outs = (
            ["prediction"] + (["driving_depth"] if has_depth(model) else []) + _kp_names(model, "kp_driving")
        )
        return ins, outs
    raise ValueError(f"unknown graph {graph!r}; graphs: {', '.join(GRAPH_NAMES)}")


def flatten_state(state: SourceState) -> dict[str, torch.Tensor]:
    """SourceState → {name: tensor} with the names of :func:`cached_names` (+ source_depth)."""
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


def transfer_relative(
    kp_source: Keypoints,
    kp_driving: Keypoints,
    kp_reference: Keypoints,
    scale: torch.Tensor,
    relative: torch.Tensor,
) -> Keypoints:
    """Per-item choice between absolute and relative motion, in graph-friendly ops.

    Same formula as :func:`dagan.keypoint_ops.relative_keypoints` (value = kp_s + scale·(kp_d − kp_ref),
    J = J_d J_ref⁻¹ J_s) but with the closed-form 2×2 inverse, which exports (``torch.linalg.inv`` has no
    ONNX op). ``relative`` B×1×1 (1 = relative, 0 = absolute) selects with ``where`` rather than blending,
    so an absolute item's placeholder reference can never leak a NaN into its output.
    """
    use = relative > 0.5  # B×1×1
    value = kp_source.value + (kp_driving.value - kp_reference.value) * scale
    value = torch.where(use, value, kp_driving.value)
    jac = None
    if kp_driving.jacobian is not None:
        rel_jac = kp_driving.jacobian @ inverse_2x2(kp_reference.jacobian) @ kp_source.jacobian
        jac = torch.where(use.unsqueeze(-1), rel_jac, kp_driving.jacobian)
    return Keypoints(value, jac)


class _Graph(nn.Module):
    def __init__(self, model: DaGAN, graph: str) -> None:
        super().__init__()
        self.model = model
        self.input_names, self.output_names = graph_io(model, graph)

    def _inputs(self, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, args, strict=True))

    def _outputs(self, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(named[n] for n in self.output_names)


class DepthGraph(_Graph):
    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "depth")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.estimate_depth(image)


class KeypointGraph(_Graph):
    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "keypoints")

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self._inputs(args)
        kp = self.model.detect_keypoints(x["image"], x.get("depth"))
        return self._outputs({"kp_value": kp.value, "kp_jacobian": kp.jacobian})


class SourceEncoderGraph(_Graph):
    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "source_encoder")

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._outputs(flatten_state(self.model.encode_source(source)))


class GeneratorGraph(_Graph):
    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "generator")

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x = self._inputs(args)
        kp_s, feats = unflatten_cached(x)
        kp_d = Keypoints(x["kp_driving_value"], x.get("kp_driving_jacobian"))
        return self.model.generator.decode(feats, kp_s, kp_d).prediction


class FrameGraph(_Graph):
    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "frame")

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self._inputs(args)
        kp_s, feats = unflatten_cached(x)
        kp_d, depth_d = self.model.driving_keypoints(x["driving"])
        kp_ref = Keypoints(x["kp_reference_value"], x.get("kp_reference_jacobian"))
        kp_used = transfer_relative(kp_s, kp_d, kp_ref, x["motion_scale"], x["relative"])
        prediction = self.model.generator.decode(feats, kp_s, kp_used).prediction
        return self._outputs(
            {
                "prediction": prediction,
                "driving_depth": depth_d,
                "kp_driving_value": kp_d.value,
                "kp_driving_jacobian": kp_d.jacobian,
            }
        )


GRAPH_MODULES: dict[str, type[_Graph]] = {
    "depth": DepthGraph,
    "keypoints": KeypointGraph,
    "source_encoder": SourceEncoderGraph,
    "generator": GeneratorGraph,
    "frame": FrameGraph,
}


def graphs_for(model: DaGAN) -> list[str]:
    """The graphs this config has (no depth graph when nothing uses depth)."""
    return [g for g in GRAPH_NAMES if g != "depth" or has_depth(model)]


def example_inputs(model: DaGAN, graph: str, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible inputs for tracing and parity checks: real model outputs where a graph consumes them."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    param = next(model.parameters())

    def image() -> torch.Tensor:
        return torch.rand(batch, 3, size, size, generator=g).to(param)

    ins, _ = graph_io(model, graph)
    with torch.no_grad():
        if graph in ("depth", "source_encoder"):
            return {ins[0]: image()}
        if graph == "keypoints":
            img = image()
            out = {"image": img}
            if "depth" in ins:
                out["depth"] = model.estimate_depth(img)
            return out
        cached = flatten_state(model.encode_source(image()))
        cached.pop("source_depth", None)
        kp_d, _ = model.driving_keypoints(image())
        if graph == "generator":
            out = {n: cached[n] for n in cached_names(model)}
            out["kp_driving_value"] = kp_d.value
            if kp_d.jacobian is not None:
                out["kp_driving_jacobian"] = kp_d.jacobian
            return out
        out = {"driving": image(), **{n: cached[n] for n in cached_names(model)}}
        out["kp_reference_value"] = kp_d.value
        if kp_d.jacobian is not None:
            out["kp_reference_jacobian"] = kp_d.jacobian
        out["motion_scale"] = torch.full((batch, 1, 1), 0.9).to(param)
        # alternate relative / absolute items so one trace covers both branches of the selection
        out["relative"] = (torch.arange(batch) % 2 == 0).to(param).view(batch, 1, 1)
        return {n: out[n] for n in ins}
