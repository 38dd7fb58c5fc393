"""PyTorch backend: the reference implementation of the engine API, on CPU or CUDA.

Every frame goes through the shared hot path (:mod:`engine.hot_path`); this backend's step 5 is
:func:`dagan.graph_contract.frame_step` itself — the same function the exporter traces for ONNX Runtime
and TensorRT — run eagerly, or replayed from a CUDA graph.

GPU options (the CPU path is unchanged by them): ``precision="fp16"`` halves weights and activations,
``channels_last`` stores activations NHWC so cuDNN picks its tensor-core convolution kernels, and
``cuda_graphs`` captures the per-frame function once per batch size and replays it, which removes the
per-kernel launch overhead that dominates small-batch latency. The captured graph reads the stacked
cached sources from static buffers that are refilled only when the session list changes, so a replay
copies just the driving batch and the small motion tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dagan.checkpoint import load_model
from dagan.graph_contract import cached_names, flatten_state, frame_step, unflatten_cached
from dagan.helpers import depth_to_images, tensor_to_images
from dagan.model import DaGAN, SourceState
from dagan.nets.keypoints import Keypoints

from .base import EngineError, Session, resolve_device
from .hot_path import FramePathEngine

__all__ = ["TorchEngine"]


class _GraphedFrame:
    """One CUDA graph of :func:`frame_step` for a fixed batch size, with static input/output buffers.

    The cached-source inputs are copied into their static buffers only when the stacked sources change
    (``SourceStack.version``); each replay copies the driving batch and the motion tensors alone.
    """

    def __init__(self, model: torch.nn.Module, feed: dict[str, torch.Tensor], cached: list[str]) -> None:
        self.inputs = {k: v.clone() for k, v in feed.items()}
        self.cached = set(cached)
        self.cached_version = -1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN autotuning and lazy allocations happen outside capture
                frame_step(model, self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = frame_step(model, self.inputs)

    def __call__(self, feed: dict[str, torch.Tensor], cached_version: int) -> dict[str, torch.Tensor | None]:
        refresh = cached_version != self.cached_version
        for k, v in feed.items():
            if refresh or k not in self.cached:
                self.inputs[k].copy_(v)
        self.cached_version = cached_version
        self.graph.replay()
        return {k: (None if v is None else v.clone()) for k, v in self.outputs.items()}


class TorchEngine(FramePathEngine):
    backend = "torch"

    def __init__(
        self,
        model: DaGAN,
        device: str = "auto",
        precision: str = "fp32",
        channels_last: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        self.device = resolve_device(device)
        if precision == "int8":
            raise EngineError(
                "the torch backend has no int8 path; int8 runs on backend 'onnxruntime' with an export "
                "quantized by `dagan export quantize`"
            )
        if precision not in ("fp32", "fp16", "bf16", "fp64"):
            raise EngineError(f"precision must be fp32, fp16, bf16 or fp64, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineError("fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("cuda_graphs needs a CUDA device; leave it off on the CPU")
        self.precision = precision
        # fp64 is for verification only (the golden tests compare with the authors' float64 outputs).
        self.dtype = {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
            "fp64": torch.float64,
        }[precision]
        self.model = model.to(self.device, self.dtype).eval()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        cfg = model.config
        self.image_size = cfg.image_size
        self.cached_inputs = cached_names(cfg)
        self.num_kp = cfg.keypoints.num_kp
        self.jacobian = cfg.keypoints.estimate_jacobian
        self.mouth_keypoints = tuple(cfg.keypoints.mouth_keypoints)
        self.mouth_open_gain = cfg.keypoints.mouth_open_gain
        self.lid_reader = self.model.lid_reader
        self._take_config(cfg)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, _GraphedFrame] = {}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", precision: str = "fp32", **options: bool
    ) -> TorchEngine:
        return cls(load_model(path), device=device, precision=precision, **options)

    _to_images = staticmethod(tensor_to_images)
    _depth_images = staticmethod(depth_to_images)

    # -- API ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def new_session(
        self, source_image: np.ndarray, relative: bool = False, adapt_scale: bool = True
    ) -> Session:
        state = self.model.encode_source(self._to_tensor([source_image], "source image"))
        depth_vis = self._depth_images(state.depth)[0] if state.depth is not None else None
        session = Session(source=state, relative=relative, adapt_scale=adapt_scale, source_depth=depth_vis)
        return self._attach_face(session, source_image)

    # -- hot-path hooks -----------------------------------------------------------------------------
    def _check_session(self, session: Session) -> None:
        if not isinstance(session.source, SourceState):
            raise EngineError("session was created by another backend; this is the torch engine")

    def _cached(self, session: Session) -> dict[str, torch.Tensor]:
        return flatten_state(session.source)

    def _source_keypoints(self, session: Session) -> Keypoints:
        return session.source.kp

    def _detect(self, driving: torch.Tensor) -> Keypoints:
        return self.model.driving_keypoints(driving)[0]

    def _drive(self, driving: torch.Tensor) -> tuple[Keypoints, torch.Tensor | None]:
        return self.model.driving_keypoints(driving)

    def _render(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        kp_s, feats = unflatten_cached(feed)
        kp = Keypoints(feed["kp_driving_value"], feed.get("kp_driving_jacobian"))
        return self.model.generator.decode(feats, kp_s, kp).prediction

    def _run_frame(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        if not self.cuda_graphs:
            return frame_step(self.model, feed)
        b = feed["driving"].shape[0]
        if b not in self._graphs:  # captured on first use of each batch size
            self._graphs[b] = _GraphedFrame(self.model, feed, self.cached_inputs)
        return self._graphs[b](feed, self._stack.version)
