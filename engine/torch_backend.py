"""PyTorch backend: the reference implementation of the engine API, on CPU or CUDA.

Pre- and post-processing happen on the device (uint8 HWC → float CHW and back), so a frame costs one
host→device copy in and one device→host copy out.

GPU options (the CPU path is unchanged by them): ``precision="fp16"`` halves weights and activations,
``channels_last`` stores activations NHWC so cuDNN picks its tensor-core convolution kernels, and
``cuda_graphs`` captures the whole per-frame path (driving depth → keypoints → relative transfer →
generator, :class:`export.graphs.FrameGraph`) once per batch size and replays it, which removes the
per-kernel launch overhead that dominates small-batch latency.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dagan.checkpoint import load_model
from dagan.keypoint_ops import movement_scale, relative_keypoints
from dagan.model import DaGAN, SourceState
from dagan.nets.keypoints import Keypoints

from .base import Engine, EngineError, FrameResult, Session, check_batch, check_image


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for but PyTorch sees no CUDA GPU here")
    return torch.device(device)


def _cat_keypoints(items: list[Keypoints]) -> Keypoints:
    jac = None if items[0].jacobian is None else torch.cat([k.jacobian for k in items])
    return Keypoints(torch.cat([k.value for k in items]), jac)


def _slice_keypoints(kp: Keypoints, i: int) -> Keypoints:
    return Keypoints(kp.value[i : i + 1], None if kp.jacobian is None else kp.jacobian[i : i + 1])


# -- tensors <-> images, shared by every backend (they all pre/post-process with torch on their device) --
def images_to_tensor(
    images: list[np.ndarray], what: str, device: torch.device, dtype: torch.dtype, size: int
) -> torch.Tensor:
    """H×W×3 uint8 images → B×3×size×size in [0,1] on ``device`` (one upload per image, then on-device)."""
    batch = []
    for img in images:
        t = torch.from_numpy(np.ascontiguousarray(check_image(img, what))).to(device)
        t = t.permute(2, 0, 1).unsqueeze(0).to(dtype) / 255.0
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        batch.append(t)
    return torch.cat(batch)


def tensor_to_images(t: torch.Tensor) -> list[np.ndarray]:
    """B×3×H×W in [0,1] → H×W×3 uint8 arrays (rounded on the device, one download)."""
    u8 = (t.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(u8)


def depth_to_images(depth: torch.Tensor) -> list[np.ndarray]:
    """B×1×H×W → per-image min–max normalised uint8 maps (near = bright), for display only."""
    d = depth.float().flatten(1)
    lo, hi = d.min(1, keepdim=True).values, d.max(1, keepdim=True).values
    d = ((d - lo) / (hi - lo).clamp_min(1e-6)).view_as(depth)
    return [img[..., 0] for img in tensor_to_images(d)]


def ensure_references(
    sessions: list[Session],
    driving: torch.Tensor,
    detect: Callable[[torch.Tensor], Keypoints],
    source_kp: Callable[[Session], Keypoints],
) -> None:
    """Give every relative session without a reference one: this frame's driving keypoints.

    ``detect`` maps a B×3×H×W batch to driving keypoints; it runs only on the frames that need a
    reference (once per stream and per recalibration), so the steady state stays one fused call.
    """
    need = [i for i, s in enumerate(sessions) if s.relative and s.reference is None]
    if not need:
        return
    kp = detect(driving[need])
    for j, i in enumerate(need):
        ref = _slice_keypoints(kp, j)
        sessions[i].reference = ref
        sessions[i].scale = movement_scale(source_kp(sessions[i]), ref)


def motion_inputs(
    sessions: list[Session], num_kp: int, jacobian: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The frame graph's per-item motion reference: kp_reference_value B×K×2 (+ _jacobian B×K×2×2),
    motion_scale B×1×1 and relative B×1×1. Absolute items get a zero/identity placeholder."""
    values, jacs, scales, flags = [], [], [], []
    for s in sessions:
        if s.relative:
            values.append(s.reference.value.to(device, dtype))
            if jacobian:
                jacs.append(s.reference.jacobian.to(device, dtype))
            scales.append(torch.as_tensor(s.scale).to(device, dtype).reshape(1, 1, 1))
        else:
            values.append(torch.zeros(1, num_kp, 2, device=device, dtype=dtype))
            if jacobian:
                jacs.append(torch.eye(2, device=device, dtype=dtype).expand(1, num_kp, 2, 2))
            scales.append(torch.ones(1, 1, 1, device=device, dtype=dtype))
        flags.append(torch.full((1, 1, 1), 1.0 if s.relative else 0.0, device=device, dtype=dtype))
    out = {"kp_reference_value": torch.cat(values)}
    if jacobian:
        out["kp_reference_jacobian"] = torch.cat(jacs)
    out["motion_scale"] = torch.cat(scales)
    out["relative"] = torch.cat(flags)
    return out


class _GraphedFrame:
    """One CUDA graph of the per-frame path for a fixed batch size, with static input/output buffers."""

    def __init__(self, module: torch.nn.Module, feed: dict[str, torch.Tensor]) -> None:
        self.inputs = {k: v.clone() for k, v in feed.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN autotuning and lazy allocations happen outside capture
                module(*self.inputs.values())
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = module(*self.inputs.values())

    def __call__(self, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for k, v in feed.items():
            self.inputs[k].copy_(v)
        self.graph.replay()
        return self.outputs


class TorchEngine(Engine):
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
        if precision not in ("fp32", "fp16", "bf16"):
            raise EngineError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineError("fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("cuda_graphs needs a CUDA device; leave it off on the CPU")
        self.precision = precision
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = model.to(self.device, self.dtype).eval()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.image_size = model.config.image_size
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, _GraphedFrame] = {}
        self._frame_module: torch.nn.Module | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", precision: str = "fp32", **options: bool
    ) -> TorchEngine:
        return cls(load_model(path), device=device, precision=precision, **options)

    # -- tensors <-> images -------------------------------------------------------------------------
    def _to_tensor(self, images: list[np.ndarray], what: str) -> torch.Tensor:
        t = images_to_tensor(images, what, self.device, self.dtype, self.image_size)
        return t.contiguous(memory_format=self.memory_format)

    _to_images = staticmethod(tensor_to_images)
    _depth_images = staticmethod(depth_to_images)

    # -- API ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def new_session(self, source_image: np.ndarray, relative: bool = False) -> Session:
        state = self.model.encode_source(self._to_tensor([source_image], "source image"))
        depth_vis = self._depth_images(state.depth)[0] if state.depth is not None else None
        return Session(source=state, relative=relative, source_depth=depth_vis)

    @torch.inference_mode()
    def animate_batch(
        self, sessions: list[Session], frames: list[np.ndarray], return_depth: bool = False
    ) -> list[FrameResult]:
        check_batch(sessions, frames)
        if not sessions:
            return []
        driving = self._to_tensor(frames, "driving frame")
        if self.cuda_graphs:
            prediction, depth_d = self._animate_graphed(sessions, driving)
        else:
            prediction, depth_d = self._animate_eager(sessions, driving)
        images = self._to_images(prediction)
        depths = (
            self._depth_images(depth_d) if (return_depth and depth_d is not None) else [None] * len(images)
        )
        return [FrameResult(img, dep) for img, dep in zip(images, depths, strict=True)]

    def _animate_eager(
        self, sessions: list[Session], driving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kp_d, depth_d = self.model.driving_keypoints(driving)
        kp_used = []
        for i, s in enumerate(sessions):
            kp_i = _slice_keypoints(kp_d, i)
            if s.relative:
                if s.reference is None:
                    s.reference = kp_i
                    s.scale = movement_scale(s.source.kp, kp_i)
                kp_i = relative_keypoints(s.source.kp, kp_i, s.reference, s.scale)
            kp_used.append(kp_i)
        state = sessions[0].source if len(sessions) == 1 else SourceState.cat([s.source for s in sessions])
        return self.model.render(state, _cat_keypoints(kp_used)).prediction, depth_d

    def _animate_graphed(
        self, sessions: list[Session], driving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the captured per-frame graph for this batch size (captured on first use)."""
        from export.graphs import FrameGraph, flatten_state

        if self._frame_module is None:
            self._frame_module = FrameGraph(self.model).eval()
        module = self._frame_module
        ensure_references(
            sessions, driving, lambda d: self.model.driving_keypoints(d)[0], lambda s: s.source.kp
        )
        state = sessions[0].source if len(sessions) == 1 else SourceState.cat([s.source for s in sessions])
        cached = flatten_state(state)
        kp = sessions[0].source.kp
        feed = {"driving": driving}
        feed.update({n: cached[n] for n in module.input_names if n in cached})
        feed.update(
            motion_inputs(sessions, kp.value.shape[1], kp.jacobian is not None, self.device, self.dtype)
        )
        feed = {n: feed[n] for n in module.input_names}
        b = len(sessions)
        if b not in self._graphs:
            self._graphs[b] = _GraphedFrame(module, feed)
        outs = dict(zip(module.output_names, self._graphs[b](feed), strict=True))
        return outs["prediction"].clone(), outs.get("driving_depth")
