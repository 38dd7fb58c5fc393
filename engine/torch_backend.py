"""PyTorch backend: the reference implementation of the engine API, on CPU or CUDA.

Pre- and post-processing happen on the device (uint8 HWC → float CHW and back), so a frame costs one
host→device copy in and one device→host copy out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dagan.checkpoint import load_model
from dagan.keypoint_ops import movement_scale, relative_keypoints
from dagan.model import DaGAN, SourceState
from dagan.nets.keypoints import Keypoints

from .base import Engine, EngineError, FrameResult, Session, check_image


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


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: DaGAN, device: str = "auto", precision: str = "fp32") -> None:
        super().__init__()
        self.device = resolve_device(device)
        if precision not in ("fp32", "fp16", "bf16"):
            raise EngineError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise EngineError("fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = model.to(self.device, self.dtype).eval()
        self.image_size = model.config.image_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "fp32") -> TorchEngine:
        return cls(load_model(path), device=device, precision=precision)

    # -- tensors <-> images -------------------------------------------------------------------------
    def _to_tensor(self, images: list[np.ndarray], what: str) -> torch.Tensor:
        batch = []
        for img in images:
            t = torch.from_numpy(np.ascontiguousarray(check_image(img, what))).to(self.device)
            t = t.permute(2, 0, 1).unsqueeze(0).to(self.dtype) / 255.0
            if t.shape[-2:] != (self.image_size, self.image_size):
                t = F.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            batch.append(t)
        return torch.cat(batch)

    @staticmethod
    def _to_images(t: torch.Tensor) -> list[np.ndarray]:
        u8 = (t.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(u8)

    @staticmethod
    def _depth_images(depth: torch.Tensor) -> list[np.ndarray]:
        """B×1×H×W → per-image min–max normalised uint8 maps (near = bright), for display only."""
        d = depth.float().flatten(1)
        lo, hi = d.min(1, keepdim=True).values, d.max(1, keepdim=True).values
        d = ((d - lo) / (hi - lo).clamp_min(1e-6)).view_as(depth)
        return [img[..., 0] for img in TorchEngine._to_images(d)]

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
        if len(sessions) != len(frames):
            raise EngineError(f"animate_batch got {len(sessions)} sessions but {len(frames)} frames")
        if not sessions:
            return []
        driving = self._to_tensor(frames, "driving frame")
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
        out = self.model.render(state, _cat_keypoints(kp_used))
        images = self._to_images(out.prediction)
        depths = (
            self._depth_images(depth_d) if (return_depth and depth_d is not None) else [None] * len(images)
        )
        return [FrameResult(img, dep) for img, dep in zip(images, depths, strict=True)]
