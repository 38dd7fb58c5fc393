"""The per-frame hot path every backend runs, top to bottom in :meth:`FramePathEngine.animate_batch`.

1. **Upload**: the batch's driving crops go to the device in one copy (through a reused pinned buffer
   on CUDA) and are converted and resized there (:func:`dagan.helpers.images_to_tensor`).
2. **References**: a relative stream without a reference pose (its first frame, or after
   :meth:`~engine.base.Session.reset_reference`) takes this frame's driving keypoints as the reference
   and its movement scale (a convex hull, host code): :func:`ensure_references`. This is the only
   per-stream work outside the fused call and happens once per stream and recalibration.
3. **Stacked sources**: the sessions' cached source tensors, stacked along the batch once and reused
   while the session list is the same (:class:`SourceStack`), so a frame never re-copies them.
4. **Motion**: each stream's reference keypoints, movement scale (1 without ``adapt_scale``), relative
   flag and lip-opening gain as small B×… tensors (:func:`motion_inputs`).
5. **Frame**: the one per-frame function, :func:`dagan.graph_contract.frame_step` (driving depth →
   keypoints → relative transfer → generator): run eagerly or replayed from a CUDA graph by the PyTorch
   backend, run as the exported ``frame`` graph by ONNX Runtime and TensorRT. Backends differ only here
   (:meth:`FramePathEngine._run_frame`) and in how a session's source is encoded.
6. **Lids and mouth**: for a model with a lid reader (``blink`` in its config), the reader reads how
   open the driver's eyes are and the avatar's lids are closed, or opened wider, as far by a warp of the
   prediction (:meth:`FramePathEngine._close_lids`, :mod:`dagan.blink`); for a model with an open-mouth
   warp (``mouth.warp``), the avatar's mouth is opened further, as far as its rendered lip keypoints
   parted beyond the photo's (:meth:`FramePathEngine._open_mouths`, :mod:`dagan.mouth`). Host
   code around a few small tensor operations, the same for every backend, nothing at all while the eyes
   and lips are as at the reference.
7. **Download**: the prediction is rounded to uint8 on the device and downloaded once
   (:func:`dagan.helpers.tensor_to_images`).

Steady motion (:attr:`~engine.base.Session.kp_filter`): a stream whose driving keypoints are filtered
runs step 5 split in two, because the fused ``frame`` function uses the keypoints it detects at once:
driving depth → keypoints (the ``depth``/``keypoints`` graphs), the stream's One-Euro filter on the host
(the lips' gap passes it as detected: :func:`filter_keypoints`), relative transfer, then the
``generator`` graph — the same networks, so the same cost. A backend without a separate generator
(:meth:`FramePathEngine._render` returns None: TensorRT builds only the fused graph) gets the same result
from the fused graph by moving the reference so that the keypoints it detects transfer as the filtered
ones would (:func:`filtered_motion`), at the price of running the driving branch twice. After step 5
the automatic neutral pose (:func:`choose_neutral`) looks at the frame's keypoints.

The nod (:mod:`dagan.nod`, config ``nod``): a model that nods runs step 5 split the same way for its
relative streams, filtered or not, because between the transfer and the generator the transferred
keypoints are nodded by the driver's head pitch since the reference, read from the face mesh of the
driving frame (:func:`nod_pitches`; host code, a few milliseconds a frame, the same for every backend).
The detector does not see a nod; the mesh does. Which depth profile a photo nods over (the bump over its
keypoints or its own face mesh's) is chosen once, when a relative stream's photo is uploaded
(:meth:`FramePathEngine._nod_profile`: four drawings of the photo nodded, read with the mesh).
"""

from __future__ import annotations

import abc
import math
import time
import warnings
from collections.abc import Callable

import cv2
import numpy as np
import torch

from dagan.blink import LidState, close_lids, eye_shapes
from dagan.config import BlinkConfig, ModelConfig, MouthConfig, NodConfig
from dagan.graph_contract import unflatten_cached
from dagan.head_pose import euler_angles, head_rotation
from dagan.helpers import Uploader, depth_to_images, images_to_tensor, tensor_to_images
from dagan.keypoint_ops import movement_scale, relative_keypoints
from dagan.mouth import extra_opening, mouth_shape, open_mouths
from dagan.nets.blocks import inverse_2x2
from dagan.nets.keypoints import Keypoints
from dagan.nets.lid_reader import LidReader
from dagan.nod import NodProfile, NodState, layout_distance, mesh_profile, nod_keypoints, shot_signature

from .base import Engine, EngineError, FrameResult, Session, check_batch, check_mouth_gain


class FramePathEngine(Engine):
    """An engine whose frames go through the hot path above; a backend supplies the device, dtype,
    the names of its cached source tensors and the hooks below."""

    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.contiguous_format
    cached_inputs: list[str]
    num_kp: int
    jacobian: bool
    # The model's lid reader (Engine.lid_reader) and its blink settings (config ``blink``), or None.
    lid_reader: LidReader | None = None
    blink: BlinkConfig | None = None
    # The model's open-mouth warp (config ``mouth``), or None.
    mouth: MouthConfig | None = None
    # The model's nod (config ``nod``), or None.
    nod: NodConfig | None = None
    _warned_no_mesh = False  # once per process

    def __init__(self) -> None:
        super().__init__()
        self._uploader: Uploader | None = None
        self._stack = SourceStack()

    def _take_config(self, config: ModelConfig) -> None:
        """The model's settings the host's steps read, from its config, by one rule for every backend
        (call it once ``mouth_keypoints`` and ``lid_reader`` are set): the Jacobian gain of the host's
        transfer (step 5), the nod of a model that sets one (step 5), the blink settings of a model with
        a lid reader and the open-mouth warp of a model that sets one and names its lips (step 6)."""
        self.jacobian_gain = config.keypoints.jacobian_gain
        self.nod = config.nod if config.nod.gain > 0 else None
        self.blink = config.blink if self.lid_reader is not None else None
        self.mouth = config.mouth if config.mouth.warp > 0 and self.mouth_keypoints else None

    def _attach_face(self, session: Session, source_image: np.ndarray) -> Session:
        """Give a new session what steps 5 and 6 need of the face mesh, when the model uses it and
        mediapipe is installed: its nod state (a model that nods: the driver's mesh is read every frame),
        and where the photo's mesh is found its blink state (a model with a lid reader) and its mouth (a
        model with an open-mouth warp, and a photo whose lips are not already apart). Backends call this
        at the end of ``new_session``."""
        if self.lid_reader is None and self.mouth is None and self.nod is None:
            return session
        image = at_size(source_image, self.image_size)
        try:
            landmarks = mesh_at_size(image, self.image_size)
        except ImportError:  # a machine without mediapipe (e.g. a bare GPU box): animate, without them
            if not FramePathEngine._warned_no_mesh:
                FramePathEngine._warned_no_mesh = True
                warnings.warn(
                    "mediapipe is not installed: the avatar will not blink or open its mouth further, "
                    "and will not nod",
                    stacklevel=2,
                )
            return session
        if self.nod is not None:
            session.nod = NodState(self.nod.max_degrees)
        if landmarks is None:
            return session
        if session.nod is not None and session.relative:  # absolute motion is not nodded
            session.nod.photo = shot_signature(image, landmarks)
            session.nod.profile = self._nod_profile(session, source_image, landmarks)
        if self.lid_reader is not None:
            session.lids = LidState(eye_shapes(landmarks))
        if self.mouth is not None:
            shape = mouth_shape(landmarks)
            session.mouth = None if shape.is_open(self.mouth) else shape
        return session

    def _nod_profile(
        self, session: Session, source_image: np.ndarray, landmarks: np.ndarray
    ) -> NodProfile | None:
        """The depth profile the photo's avatar nods over (:mod:`dagan.nod`): its face mesh's own
        (:func:`dagan.nod.mesh_profile`) where that nods the avatar better than the bump over its
        keypoints does, else None (the bump). Each is tried by drawing the photo nodded ±
        :data:`CALIBRATION_DEGREES` and reading the drawings' rotation with the face mesh, as the driver's
        is read (:func:`nod_response`): four drawings and four meshes, once per upload of a relative
        stream (0.19 s on a CPU core, ``dagan bench``; on the engine's worker)."""
        assert self.nod is not None
        with torch.inference_mode():
            kp_s = self._source_keypoints(session)
            mesh = mesh_profile(landmarks, self.image_size, kp_s.value[0].float().cpu().numpy())
            profiles: list[NodProfile | None] = [None, None, mesh, mesh]
            pitch = torch.tensor([-1.0, 1.0, -1.0, 1.0]) * CALIBRATION_DEGREES
            four = Keypoints(
                torch.cat([kp_s.value] * 4), None if kp_s.jacobian is None else torch.cat([kp_s.jacobian] * 4)
            )
            nodded_kp = nod_keypoints(four, four, pitch.to(four.value), self.nod.gain, profiles)
            drawn = tensor_to_images(self._draw(session, source_image, nodded_kp))
        bump_response = nod_response(drawn[0], drawn[1], self.image_size)
        mesh_response = nod_response(drawn[2], drawn[3], self.image_size)
        return mesh if mesh_response > bump_response else None

    def _draw(self, session: Session, source_image: np.ndarray, kp: Keypoints) -> torch.Tensor:
        """The photo of ``session`` (``source_image``) drawn with the keypoints ``kp`` (B×K×2, B×K×2×2) in
        place of its own: B×3×H×W, by the ``generator`` graph, or where the backend has none by the fused
        ``frame`` graph driven by the photo itself with moved references (:func:`filtered_motion`)."""
        b = kp.value.shape[0]
        own = self._cached(session)
        cached = {n: torch.cat([own[n]] * b) for n in self.cached_inputs}
        feed = dict(cached)
        feed["kp_driving_value"] = kp.value
        if kp.jacobian is not None:
            feed["kp_driving_jacobian"] = kp.jacobian
        prediction = self._render(feed)
        if prediction is not None:
            return prediction
        kp_s = self._source_keypoints(session)
        kp_s = Keypoints(
            torch.cat([kp_s.value] * b), None if kp_s.jacobian is None else torch.cat([kp_s.jacobian] * b)
        )
        driving = self._to_tensor([np.asarray(source_image)] * b, "source image")
        kp_d = self._detect(driving)
        ones = torch.ones(b, 1, 1, device=self.device, dtype=self.dtype)
        motion = {"mouth_gain": ones} if self.mouth_keypoints else {}
        feed = dict(cached)
        feed["driving"] = driving
        feed.update(filtered_motion(kp_s, kp_d, kp_d, kp, motion, self.jacobian_gain))
        return self._run_frame(feed)["prediction"]

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

    def _drive(self, driving: torch.Tensor) -> tuple[Keypoints, torch.Tensor | None]:
        """Driving keypoints and depth of a B×3×H×W batch (the filtered path's first half). Default:
        :meth:`_detect` without depth; backends override it to return the depth too."""
        return self._detect(driving), None

    def _render(self, feed: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The ``generator`` graph on the cached tensors + kp_driving_value/jacobian (the keypoints to
        render): the B×3×H×W prediction, or None when this backend has no separate generator."""
        return None

    def _motion(self, sessions: list[Session]) -> dict[str, torch.Tensor]:
        """Step 4: :func:`motion_inputs` for this engine's model."""
        gain = self.mouth_open_gain if self.mouth_keypoints else None
        return motion_inputs(sessions, self.num_kp, self.jacobian, self.device, self.dtype, gain)

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
            if any(s.kp_filter is not None for s in sessions) or self._nodding(sessions):
                out = self._filtered_frame(sessions, feed, frames)  # 4. + 5. split: filter, nod
            else:  # 4.
                feed.update(self._motion(sessions))
                out = self._run_frame(feed)  # 5. the per-frame function
            prediction = out["prediction"]
            if self.lid_reader is not None and any(s.lids is not None for s in sessions):
                prediction = self._close_lids(sessions, feed, out)  # 6. lids
            if self.mouth is not None and any(s.mouth is not None for s in sessions):
                prediction = self._open_mouths(sessions, feed, out, prediction)  # 6. mouth
            if any(s.auto_neutral is not None and not s.auto_neutral.done for s in sessions):
                kp = Keypoints(out["kp_driving_value"], out.get("kp_driving_jacobian"))
                choose_neutral(sessions, kp, self._source_keypoints)
        return prediction, out.get("driving_depth")

    def _close_lids(
        self, sessions: list[Session], feed: dict[str, torch.Tensor], out: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        """Step 6: the prediction with each stream's avatar lids closed or widened as far as the driver's
        (:mod:`dagan.blink`).

        The reader reads the driving crops around the keypoints as detected (``kp_detected_value``,
        unfiltered: a blink lasts 2–5 frames). The eyes are moved by the displacement of their lid
        keypoints in the keypoints that were rendered (``kp_rendered_value``; the fused path
        recomputes them from its feed's motion inputs, a handful of operations on K×2 numbers)."""
        reader, blink = self.lid_reader, self.blink
        assert reader is not None and blink is not None
        kp_d = out.get("kp_detected_value", out["kp_driving_value"])
        param = next(reader.parameters())
        openness = reader(feed["driving"].to(param.dtype), kp_d.to(param.dtype)).float().cpu().numpy()
        closure = torch.zeros(len(sessions), 2)
        for i, s in enumerate(sessions):
            if s.lids is not None:
                closure[i] = s.lids.closure(openness[i], _session_clock(s), blink)
        prediction = out["prediction"]
        if not bool((closure != 0).any()):
            return prediction
        kp_s, rendered = self._rendered(feed, out)
        lids = torch.tensor(reader.lids).view(2, 2)  # (eye, upper/lower)
        moved = (rendered - kp_s.value).float().cpu()[:, lids].mean(dim=2)  # B×2×2, keypoint units
        shift = moved * (self.image_size / 2)
        shapes = [s.lids.shapes if s.lids is not None else None for s in sessions]
        return close_lids(prediction, shapes, closure, shift)

    def _open_mouths(
        self,
        sessions: list[Session],
        feed: dict[str, torch.Tensor],
        out: dict[str, torch.Tensor | None],
        prediction: torch.Tensor,
    ) -> torch.Tensor:
        """Step 6, the mouth: ``prediction`` with each stream's avatar mouth opened further, as far as
        its rendered lip keypoints opened beyond the photo's (:mod:`dagan.mouth`); the mouth is found
        where the upper lip's keypoint moved it."""
        cfg, lips = self.mouth, self.mouth_keypoints
        assert cfg is not None and len(lips) == 2
        kp_s, rendered = self._rendered(feed, out)
        r, s0 = rendered.float().cpu().numpy(), kp_s.value.float().cpu().numpy()
        half = self.image_size / 2
        shapes = [s.mouth for s in sessions]
        extra = np.array(
            [
                0.0
                if shape is None
                else extra_opening(shape, r[i], s0[i], (lips[0], lips[1]), self.image_size, cfg)
                for i, shape in enumerate(shapes)
            ]
        )
        if not bool((extra > 0).any()):
            return prediction
        shift = (r[:, lips[0]] - s0[:, lips[0]]) * half  # B×2: the upper lip's move, pixels
        return open_mouths(prediction, shapes, extra, shift, cfg)

    def _rendered(
        self, feed: dict[str, torch.Tensor], out: dict[str, torch.Tensor | None]
    ) -> tuple[Keypoints, torch.Tensor]:
        """The source keypoints and the B×K×2 keypoint values the generator drew (``kp_rendered_value``;
        the fused path recomputes them from its feed's motion inputs, a handful of operations on K×2
        numbers)."""
        kp_s, _ = unflatten_cached(feed)
        rendered = out.get("kp_rendered_value")
        if rendered is None:  # the fused path: its motion inputs are in the feed (step 4)
            kp_det = Keypoints(out["kp_driving_value"], out.get("kp_driving_jacobian"))
            rendered = out["kp_rendered_value"] = self._transfer(kp_s, kp_det, feed).value
        return kp_s, rendered

    def _transfer(self, kp_s: Keypoints, kp_d: Keypoints, motion: dict[str, torch.Tensor]) -> Keypoints:
        """The relative transfer the frame graph makes (:func:`dagan.keypoint_ops.relative_keypoints`),
        on the host: driving keypoints ``kp_d`` moved onto the sources ``kp_s`` with a frame's motion
        inputs (:func:`motion_inputs`)."""
        kp_ref = Keypoints(motion["kp_reference_value"], motion.get("kp_reference_jacobian"))
        return relative_keypoints(
            kp_s,
            kp_d,
            kp_ref,
            motion["motion_scale"],
            motion["relative"],
            self.mouth_keypoints,
            motion.get("mouth_gain", 1.0),
            self.jacobian_gain,
        )

    def _nodding(self, sessions: list[Session]) -> bool:
        """Whether any of these streams nods its avatar (step 5, :func:`nod_pitches`)."""
        return self.nod is not None and any(s.nod is not None and s.relative for s in sessions)

    def _filtered_frame(
        self, sessions: list[Session], feed: dict[str, torch.Tensor], frames: list[np.ndarray]
    ) -> dict[str, torch.Tensor | None]:
        """Step 5 with each stream's keypoint filter, and the nod, between detection and rendering
        (module doc). The outputs' ``kp_driving_*`` are the filtered keypoints, ``kp_detected_value``
        the detected ones and ``kp_rendered_value`` those the generator drew (step 6 reads both)."""
        kp_d, depth = self._drive(feed["driving"])
        kp_f = filter_keypoints(sessions, kp_d, self.mouth_keypoints)
        motion = self._motion(sessions)
        kp_s, _ = unflatten_cached(feed)
        kp_used = self._transfer(kp_s, kp_f, motion)
        if self._nodding(sessions):
            assert self.nod is not None
            kp_used = nodded(sessions, frames, self.image_size, kp_s, kp_used, self.nod.gain)
        render = {n: feed[n] for n in self.cached_inputs}
        render["kp_driving_value"] = kp_used.value
        if kp_used.jacobian is not None:
            render["kp_driving_jacobian"] = kp_used.jacobian
        prediction = self._render(render)
        if prediction is None:  # no generator graph: the fused graph with moved references
            feed.update(filtered_motion(kp_s, kp_d, kp_f, kp_used, motion, self.jacobian_gain))
            out = self._run_frame(feed)
            prediction, depth = out["prediction"], out.get("driving_depth")
        return {
            "prediction": prediction,
            "driving_depth": depth,
            "kp_driving_value": kp_f.value,
            "kp_driving_jacobian": kp_f.jacobian,
            "kp_detected_value": kp_d.value,
            "kp_rendered_value": kp_used.value,
        }

    def animate_batch(
        self, sessions: list[Session], frames: list[np.ndarray], return_depth: bool = False
    ) -> list[FrameResult]:
        check_batch(sessions, frames)
        if not sessions:
            return []
        prediction, depth_d = self.predict_batch(sessions, frames)
        images = tensor_to_images(prediction)  # 7. one download
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
    sessions: list[Session],
    num_kp: int,
    jacobian: bool,
    device: torch.device,
    dtype: torch.dtype,
    mouth_gain: float | None = None,
) -> dict[str, torch.Tensor]:
    """The frame graph's per-item motion reference: kp_reference_value B×K×2 (+ _jacobian B×K×2×2),
    motion_scale B×1×1 and relative B×1×1. Absolute items get a zero/identity placeholder. With
    ``mouth_gain`` (the model's default; a model that names its lip keypoints) also mouth_gain B×1×1:
    each session's own :attr:`~engine.base.Session.mouth_gain`, else that default. Without it, a session
    that sets its own gain is refused rather than silently ignored."""
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
    own = [check_mouth_gain(s.mouth_gain, mouth_gain is not None) for s in sessions]
    if mouth_gain is not None:
        gains = [mouth_gain if g is None else g for g in own]
        out["mouth_gain"] = torch.tensor(gains, device=device, dtype=dtype).view(-1, 1, 1)
    return out


def _session_clock(session: Session) -> float:
    """The session's time for the filter and the neutral-pose window: the frame's capture time when
    the caller gives it, else the wall clock."""
    return session.frame_time if session.frame_time is not None else time.monotonic()


def mesh_at_size(image: np.ndarray, size: int) -> np.ndarray | None:
    """The face mesh of ``image`` (:func:`dagan.face.face_landmarks_upscaled`) read at the model's
    ``size`` (area-resized first where it differs), in pixels of that size, or None without a face. The
    photo's eyelids and lips and the driver's nod are read this one way, the way the evaluation reads
    both, so what the avatar is told and how it is scored agree. Raises ImportError without mediapipe."""
    from dagan.face import face_landmarks_upscaled  # mediapipe, only for models that use the mesh

    return face_landmarks_upscaled(at_size(image, size))


def at_size(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (H×W×3) at the model's ``size`` (area-resized where it differs), as the mesh reads it."""
    image = np.asarray(image)
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


# How far the upload's calibration nods the photo each way (degrees): about a held-out driver's slow nod
# (s18's is about 5°), the nod the per-photo probes measured; at the model's nod gain no photo's face
# tore at it (at twice the gain several did).
CALIBRATION_DEGREES = 8.0


def nod_response(down: np.ndarray, up: np.ndarray, size: int) -> float:
    """How well a photo's avatar nods: ``down`` and ``up`` are two drawings of it nodded by
    ∓ :data:`CALIBRATION_DEGREES` (H×W×3 uint8 at the model's ``size``), read with the face mesh as the
    driver's is (:func:`mesh_at_size`; the rotation between them in the head's own frame, as
    :func:`dagan.head_pose.pitch_since`): the pitch per degree of the nod, less the yaw and roll (either
    way) that came with it. 1 is a clean full nod; 0 none, or a nod as large as the turn and tilt drawn
    with it. Why the penalty: a profile that tilts the head sideways as it nods (the three-quarter
    painting s10, over its mesh's profile: 0.33° pitch, 0.38° roll and 0.19° yaw per degree) makes the
    avatar roll with the driver's nods, not with the driver's roll. −inf where either has no face."""
    rotations = [
        None if lm is None else head_rotation(lm, (size, size))
        for lm in (mesh_at_size(down, size), mesh_at_size(up, size))
    ]
    if rotations[0] is None or rotations[1] is None:
        return -math.inf
    pitch, yaw, roll = euler_angles(rotations[0].T @ rotations[1]) / (2 * CALIBRATION_DEGREES)
    value = float(pitch - abs(yaw) - abs(roll))
    return value if math.isfinite(value) else -math.inf


def nod_pitches(sessions: list[Session], frames: list[np.ndarray], size: int) -> torch.Tensor:
    """B pitches (degrees, float32 on the host): how far each relative stream with a nod state
    (:class:`dagan.nod.NodState`) pitched its head since its reference, read from the face mesh of its
    driving frame at the model's size (as the photo's is read, and as the evaluation reads both); 0 for
    the other streams. Filtered like the keypoints for a stream whose keypoints are filtered. The mesh
    costs 5.5–8 ms a frame on a CPU core (docs/benchmarks.md, "The nod"), and only for the streams
    that nod."""
    out = torch.zeros(len(sessions))
    for i, (s, frame) in enumerate(zip(sessions, frames, strict=True)):
        if s.nod is None or not s.relative:
            continue
        image = at_size(frame, size)
        landmarks = mesh_at_size(image, size)  # mediapipe: a stream has a nod state only with it
        smooth = s.kp_filter is not None
        out[i] = s.nod.pitch(landmarks, image, s.reference, _session_clock(s), smooth)
    return out


def nodded(
    sessions: list[Session],
    frames: list[np.ndarray],
    size: int,
    kp_s: Keypoints,
    kp_used: Keypoints,
    gain: float,
) -> Keypoints:
    """Step 5's nod: the transferred keypoints ``kp_used`` nodded by each stream's pitch
    (:func:`nod_pitches`), weighted by whether the photo is another shot than the driver's reference
    frame (:attr:`dagan.nod.NodState.weight`: 0 for a frame of the driver's own video, whose keypoints
    carry the nod already), over the photo's depth profile (the bump, or its mesh's where the upload
    chose it; :func:`dagan.nod.nod_keypoints`). The one implementation the engine and ``dagan bench``
    run."""
    pitch = nod_pitches(sessions, frames, size)
    weight = torch.tensor([0.0 if s.nod is None else s.nod.weight for s in sessions])
    profiles = [None if s.nod is None else s.nod.profile for s in sessions]
    return nod_keypoints(kp_s, kp_used, (pitch * weight).to(kp_used.value.device), gain, profiles)


def filter_keypoints(sessions: list[Session], kp: Keypoints, mouth: tuple[int, ...] = ()) -> Keypoints:
    """Each stream's driving keypoints through its One-Euro filter (streams without one unchanged).

    The filter runs on the host in float64 (K×6 numbers per stream: a copy that costs microseconds);
    values and Jacobians are filtered element by element.

    With ``mouth`` (the model's (upper, lower) inner-lip keypoints) the lips go through the filter as
    their midpoint only, and their gap is carried as detected: the filtered midpoint ∓ half the raw
    upper→lower vector. Why: speech moves the lips 3–6 times a second, and a CPU stream runs at
    15–18 fps, so any low-pass that steadies a still head also swallows much of each syllable. On 24
    held-out photo × clip pairs at 15 fps the avatar's mouth opened at a median 0.41 of the driver's
    with the gap filtered and 0.50 with it raw (a gap filter of its own at 5 Hz, or One-Euro with a
    fast speed estimate, kept 0.41–0.43). The price: the lips' own flicker on a driver whose lips stay
    closed rose by 9 %, the whole mesh's jitter on still stretches from 0.79 to 0.83 of the driver's on
    those pairs and from 0.89 to 1.03 on 48 (weights/README.md, "Lips past the filter"). The midpoint,
    i.e. where the mouth is, stays as steady as the rest of the face.
    """
    values, jacs = kp.value.clone(), None if kp.jacobian is None else kp.jacobian.clone()
    value_in = kp.value
    if mouth:
        upper, lower = mouth
        half_gap = 0.5 * (kp.value[:, lower] - kp.value[:, upper])  # B×2, kept as detected
        value_in = kp.value.clone()
        value_in[:, upper] = value_in[:, lower] = kp.value[:, upper] + half_gap  # the midpoint, twice
    for i, s in enumerate(sessions):
        if s.kp_filter is None:
            continue
        flat = value_in[i].reshape(-1)
        if kp.jacobian is not None:
            flat = torch.cat([flat, kp.jacobian[i].reshape(-1)])
        out = s.kp_filter(flat.float().cpu().numpy(), s.frame_time)
        out = torch.from_numpy(out).to(kp.value.device, kp.value.dtype)
        n = kp.value[i].numel()
        values[i] = out[:n].reshape(kp.value[i].shape)
        if mouth:
            middle = values[i, lower].clone()
            values[i, upper] = middle - half_gap[i]
            values[i, lower] = middle + half_gap[i]
        if jacs is not None:
            jacs[i] = out[n:].reshape(kp.jacobian[i].shape)
    return Keypoints(values, jacs)


def filtered_motion(
    kp_s: Keypoints,
    kp_d: Keypoints,
    kp_f: Keypoints,
    kp_used: Keypoints,
    motion: dict[str, torch.Tensor],
    jacobian_gain: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Motion inputs for the fused ``frame`` graph so that, detecting ``kp_d`` itself, it renders
    ``kp_used`` (the transfer of the filtered ``kp_f``).

    Every item is made relative with scale 1, lip-opening gain 1 (``kp_used`` has it already) and the
    reference kp_ref' = kp_d − (kp_used − kp_s): then kp_s + (kp_d − kp_ref') = kp_used. Jacobians: the
    graph applies the model's ``jacobian_gain`` g again, J_s + g (J_d J_ref'⁻¹ J_s − J_s), so it must
    meet J_u = J_s + (J_used − J_s) / g there; J_ref' = J_s J_u⁻¹ J_d gives J_d J_ref'⁻¹ J_s = J_u.
    (The graph detects kp_d again from the same pixels, so this is exact up to the backend's own
    numerical noise.)
    """
    b = kp_d.value.shape[0]
    out = dict(motion)
    out["kp_reference_value"] = kp_d.value - (kp_used.value - kp_s.value)
    if kp_used.jacobian is not None and kp_d.jacobian is not None and kp_s.jacobian is not None:
        target = kp_s.jacobian + (kp_used.jacobian - kp_s.jacobian) / jacobian_gain
        out["kp_reference_jacobian"] = kp_s.jacobian @ inverse_2x2(target) @ kp_d.jacobian
    ones = torch.ones(b, 1, 1, device=kp_d.value.device, dtype=kp_d.value.dtype)
    out["motion_scale"], out["relative"] = ones, ones
    if "mouth_gain" in out:
        out["mouth_gain"] = ones
    return out


def neutral_distance(kp_a: torch.Tensor, kp_b: torch.Tensor) -> float:
    """How far apart two faces' pose and expression are: their K×2 keypoint layouts compared by
    :func:`dagan.nod.layout_distance` (each moved to its centroid and scaled to unit RMS radius, so where
    the face sits in the crop and its size do not count; the mean distance point by point). The keypoints
    are the model's own description of pose and expression, so this needs no extra network."""
    return float(layout_distance(kp_a.reshape(1, -1, 2), kp_b.reshape(1, -1, 2))[0])


def choose_neutral(sessions: list[Session], kp: Keypoints, source_kp: Callable[[Session], Keypoints]) -> None:
    """The automatic neutral pose (:meth:`~engine.base.Session.choose_neutral_automatically`): for each
    relative stream still in its window, make this frame's keypoints (``kp``, B×K×2) the reference
    when they are the closest to the photo's so far. The new reference (and its movement scale) is used
    from the next frame on; the window is measured on the session clock from its first frame."""
    for i, s in enumerate(sessions):
        auto = s.auto_neutral
        if auto is None or auto.done or not s.relative:
            continue
        now = _session_clock(s)
        if auto.start is None:
            auto.start = now
        if now - auto.start > auto.seconds:
            auto.done = True
            continue
        kp_src = source_kp(s)
        d = neutral_distance(kp.value[i], kp_src.value[0])
        if d < auto.best:
            auto.best = d
            ref = Keypoints(
                kp.value[i : i + 1].clone(), None if kp.jacobian is None else kp.jacobian[i : i + 1].clone()
            )
            s.reference = ref
            s.scale = reference_scale(s, kp_src, ref)
