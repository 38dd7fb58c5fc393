"""The per-frame hot path every backend runs, top to bottom in :meth:`FramePathEngine.animate_batch`.

1. **Upload**: the batch's driving crops go to the device in one copy (through a reused pinned buffer
   on CUDA) and are converted and resized there (:func:`dagan.helpers.images_to_tensor`).
2. **References**: a relative stream without a reference pose (its first frame, or after
   :meth:`~engine.base.Session.reset_reference`) takes this frame's driving keypoints as the reference
   and its movement scale (a convex hull, host code): :func:`ensure_references`. This is the only
   per-stream work outside the fused call and happens once per stream and recalibration.
3. **Stacked sources**: the sessions' cached source tensors, stacked along the batch once and reused
   while the session list is the same (:class:`SourceStack`), so a frame never re-copies them.
4. **Motion**: each stream's reference keypoints, movement scale (1 without ``adapt_scale``) and
   relative flag as small B×… tensors (:func:`motion_inputs`).
5. **Frame**: the one per-frame function, :func:`dagan.graph_contract.frame_step` (driving depth →
   keypoints → relative transfer → generator): run eagerly or replayed from a CUDA graph by the PyTorch
   backend, run as the exported ``frame`` graph by ONNX Runtime and TensorRT. Backends differ only here
   (:meth:`FramePathEngine._run_frame`) and in how a session's source is encoded.
6. **Download**: the prediction is rounded to uint8 on the device and downloaded once
   (:func:`dagan.helpers.tensor_to_images`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np
import torch

from dagan.helpers import Uploader, depth_to_images, images_to_tensor, tensor_to_images
from dagan.keypoint_ops import movement_scale
from dagan.nets.keypoints import Keypoints

from .base import Engine, EngineError, FrameResult, Session, check_batch


class FramePathEngine(Engine):
    """An engine whose frames go through the hot path above; a backend supplies the device, dtype,
    the names of its cached source tensors and the hooks below."""

    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.contiguous_format
    cached_inputs: list[str]
    num_kp: int
    jacobian: bool

    def __init__(self) -> None:
        super().__init__()
        self._uploader: Uploader | None = None
        self._stack = SourceStack()

    # -- backend hooks ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _cached(self, session: Session) -> dict[str, torch.Tensor]:
        """The session's cached source tensors by contract name (a superset of ``cached_inputs``)."""

    @abc.abstractmethod
    def _source_keypoints(self, session: Session) -> Keypoints:
        """The session's source keypoints (for the movement scale)."""

    @abc.abstractmethod
    def _detect(self, driving: torch.Tensor) -> Keypoints:
        """Driving keypoints of a B×3×H×W batch (for new references only)."""

    @abc.abstractmethod
    def _run_frame(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Run the per-frame function on the ``frame`` graph's inputs; its outputs by name."""

    def _check_session(self, session: Session) -> None:
        """Raise if ``session`` was created by another backend."""

    # -- the hot path -------------------------------------------------------------------------------
    def _to_tensor(self, images: list[np.ndarray], what: str) -> torch.Tensor:
        if self._uploader is None:
            self._uploader = Uploader(self.device)
        t = images_to_tensor(
            images, what, self.device, self.dtype, self.image_size, self._uploader, error=EngineError
        )
        return t.contiguous(memory_format=self.memory_format)

    def predict_batch(
        self, sessions: list[Session], frames: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`animate_batch` before the uint8 conversion: the B×3×H×W prediction in (0, 1) and the
        B×1×H×W driving depth (or None), on the device in the engine's dtype; for tests that compare
        with float references and for callers that post-process on the device."""
        check_batch(sessions, frames)
        if not sessions:
            size = self.image_size
            return torch.empty(0, 3, size, size, device=self.device, dtype=self.dtype), None
        for s in sessions:
            self._check_session(s)
        with torch.inference_mode():
            driving = self._to_tensor(frames, "driving frame")  # 1. one upload
            ensure_references(sessions, driving, self._detect, self._source_keypoints)  # 2.
            feed = {"driving": driving}
            feed.update(self._stack.get(sessions, self._cached, self.cached_inputs))  # 3.
            feed.update(motion_inputs(sessions, self.num_kp, self.jacobian, self.device, self.dtype))  # 4.
            out = self._run_frame(feed)  # 5. the per-frame function
        return out["prediction"], out.get("driving_depth")

    def animate_batch(
        self, sessions: list[Session], frames: list[np.ndarray], return_depth: bool = False
    ) -> list[FrameResult]:
        check_batch(sessions, frames)
        if not sessions:
            return []
        prediction, depth_d = self.predict_batch(sessions, frames)
        images = tensor_to_images(prediction)  # 6. one download
        depths = depth_to_images(depth_d) if (return_depth and depth_d is not None) else [None] * len(images)
        return [FrameResult(img, dep) for img, dep in zip(images, depths, strict=True)]


class SourceStack:
    """The cached source tensors of a list of sessions stacked along the batch, rebuilt only when the
    list changes (the multi-stream steady state keeps it). ``version`` increases on every rebuild, so a
    consumer holding copies (the CUDA-graph static inputs) refreshes them only then."""

    def __init__(self) -> None:
        self._key: tuple[Session, ...] = ()
        self._names: tuple[str, ...] = ()
        self.tensors: dict[str, torch.Tensor] = {}
        self.version = 0

    def get(
        self,
        sessions: list[Session],
        cached: Callable[[Session], dict[str, torch.Tensor]],
        names: list[str],
    ) -> dict[str, torch.Tensor]:
        same = (
            len(sessions) == len(self._key)
            and all(a is b for a, b in zip(sessions, self._key, strict=True))
            and tuple(names) == self._names
        )
        if not same:
            flat = [cached(s) for s in sessions]
            if len(flat) == 1:
                self.tensors = {n: flat[0][n] for n in names}
            else:
                self.tensors = {n: torch.cat([f[n] for f in flat]) for n in names}
            self._key, self._names = tuple(sessions), tuple(names)
            self.version += 1
        return self.tensors


def _slice_keypoints(kp: Keypoints, i: int) -> Keypoints:
    return Keypoints(kp.value[i : i + 1], None if kp.jacobian is None else kp.jacobian[i : i + 1])


def reference_scale(session: Session, kp_source: Keypoints, reference: Keypoints) -> torch.Tensor:
    """The session's movement scale for a new reference: the hull-size ratio with ``adapt_scale``,
    else 1 (relative motion as the authors' ``--relative`` without ``--adapt_scale``). 1×1×1."""
    if session.adapt_scale:
        return movement_scale(kp_source, reference)
    return torch.ones(1, 1, 1, dtype=reference.value.dtype, device=reference.value.device)


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
        sessions[i].scale = reference_scale(sessions[i], source_kp(sessions[i]), ref)


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
