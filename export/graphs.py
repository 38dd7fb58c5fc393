"""The exported graphs as plain ``nn.Module`` wrappers with flat tensor inputs and outputs.

Graph names, tensor names and roles are the contract in :mod:`dagan.graph_contract` (shared with the
runtimes in ``engine/``); this module only wraps the model so that ``torch.onnx.export`` can trace each
graph. The ``frame`` graph is :func:`dagan.graph_contract.frame_step`, the same function the PyTorch
engine runs eagerly and captures in CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from dagan.graph_contract import (
    GRAPH_NAMES,
    cached_names,
    flatten_state,
    frame_step,
    graph_io,
    unflatten_cached,
)
from dagan.model import DaGAN
from dagan.nets.keypoints import Keypoints

__all__ = ["GRAPH_MODULES", "GRAPH_NAMES", "FrameGraph", "example_inputs"]


class _Graph(nn.Module):
    def __init__(self, model: DaGAN, graph: str) -> None:
        super().__init__()
        self.model = model
        self.input_names, self.output_names = graph_io(model.config, graph)

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
    """The per-frame path, :func:`~dagan.graph_contract.frame_step`, with positional tensor I/O."""

    def __init__(self, model: DaGAN) -> None:
        super().__init__(model, "frame")

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._outputs(frame_step(self.model, self._inputs(args)))


GRAPH_MODULES: dict[str, type[_Graph]] = {
    "depth": DepthGraph,
    "keypoints": KeypointGraph,
    "source_encoder": SourceEncoderGraph,
    "generator": GeneratorGraph,
    "frame": FrameGraph,
}


def example_inputs(model: DaGAN, graph: str, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible inputs for tracing and parity checks: real model outputs where a graph consumes them."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    param = next(model.parameters())

    def image() -> torch.Tensor:
        return torch.rand(batch, 3, size, size, generator=g).to(param)

    ins, _ = graph_io(model.config, graph)
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
            out = {n: cached[n] for n in cached_names(model.config)}
            out["kp_driving_value"] = kp_d.value
            if kp_d.jacobian is not None:
                out["kp_driving_jacobian"] = kp_d.jacobian
            return out
        out = {"driving": image(), **{n: cached[n] for n in cached_names(model.config)}}
        out["kp_reference_value"] = kp_d.value
        if kp_d.jacobian is not None:
            out["kp_reference_jacobian"] = kp_d.jacobian
        out["motion_scale"] = torch.full((batch, 1, 1), 0.9).to(param)
        # alternate relative / absolute items so one trace covers both branches of the selection
        out["relative"] = (torch.arange(batch) % 2 == 0).to(param).view(batch, 1, 1)
        if "mouth_gain" in ins:
            # a reference with the lips closer together than the driver's, so the opening is scaled
            upper, lower = model.config.keypoints.mouth_keypoints
            ref = out["kp_reference_value"].clone()
            ref[:, upper, 1] += 0.03
            ref[:, lower, 1] -= 0.03
            out["kp_reference_value"] = ref
            out["mouth_gain"] = torch.full((batch, 1, 1), 2.0).to(param)
        return {n: out[n] for n in ins}
