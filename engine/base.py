"""The engine interface every backend (PyTorch, ONNX Runtime, TensorRT) implements.

A backend turns one cached source plus a stream of driving face crops into avatar frames. The source
side is computed once in :meth:`Engine.set_source`; each driving frame then costs only the driving
branch and the generator. Sessions carry their own source and relative-motion reference, so one engine
serves many streams and :meth:`Engine.animate_batch` runs their latest frames in one call. The
per-frame path itself is :mod:`engine.hot_path`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dagan import helpers
from dagan.config import MAX_MOUTH_GAIN, is_mouth_gain
from dagan.errors import UserError


class EngineError(UserError, RuntimeError):
    """A backend that cannot be created or used (missing weights, unsupported device, bad input)."""


@dataclass
class Session:
    """One stream's state: the backend's cached source plus the relative-motion reference.

    ``relative``: move the source by the driver's motion since a reference frame (the first frame after
    creation or :meth:`reset_reference`) instead of copying absolute keypoints.
    ``adapt_scale`` (relative only): scale that motion by the ratio of the two faces' keypoint-hull
    sizes (the authors' ``--relative --adapt_scale``); False moves the source by the driver's raw
    displacement (their ``--relative`` alone). Every backend reads it through ``scale``, which is 1
    without adaptation.

    Steady motion and the neutral pose (set by the caller, per stream): ``kp_filter``, a
    :class:`dagan.smoothing.OneEuroFilter` the driving keypoints go through before they move the source
    (None: unfiltered); ``frame_time``, the capture time in seconds of the frame being animated, which
    that filter and the automatic neutral pose use as their clock (None: a frame counter);
    ``auto_neutral``, set by :meth:`choose_neutral_automatically`.

    ``mouth_gain`` (relative only, models that name their lip keypoints): how many times as far as the
    driver's the avatar's lips open beyond the reference (:func:`dagan.keypoint_ops.open_mouth`); None
    takes the model's ``keypoints.mouth_open_gain``, 1 carries the driver's opening as it is.
    """

    source: Any
    relative: bool = False
    adapt_scale: bool = True
    reference: Any = None
    scale: Any = None
    source_depth: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    kp_filter: Any = None
    frame_time: float | None = None
    auto_neutral: AutoNeutral | None = None
    mouth_gain: float | None = None
    # The stream's blink state (:class:`dagan.blink.LidState`): set at creation for a model with a lid
    # reader when the photo's face mesh is found, else None (the avatar's lids then stay as drawn).
    lids: Any = None
    # The photo's mouth (:class:`dagan.mouth.MouthShape`): set at creation for a model that opens the
    # avatar's mouth further (config ``mouth``) when the photo's face mesh is found and its lips are
    # not already apart, else None (the mouth then stays as drawn).
    mouth: Any = None
    # The stream's nod (:class:`dagan.nod.NodState`): set at creation for a model that nods (config
    # ``nod``) where mediapipe is installed, else None (the avatar then nods as far as its keypoints do).
    nod: Any = None

    def reset_reference(self, auto: bool = False) -> None:
        """Take the next driving frame as the new neutral pose (the "recalibrate" action).

        A person who recalibrates has chosen their neutral pose, so an automatic choice still running
        stops; ``auto=True`` starts it again instead (the next frames are searched anew).
        """
        self.reference = None
        self.scale = None
        if self.lids is not None:  # the driver's eyes at the new reference are learned anew
            self.lids.reset()
        if self.auto_neutral is not None:
            if auto:
                self.auto_neutral = AutoNeutral(self.auto_neutral.seconds)
            else:
                self.auto_neutral.done = True

    def choose_neutral_automatically(self, seconds: float = 2.0) -> None:
        """Relative motion: over the first ``seconds`` of driving frames, make the frame whose pose and
        expression are closest to the photo's the reference (instead of simply the first frame).

        The photo's own pose is the one the avatar shows when the driver is at the reference, so a
        reference that matches it keeps a person who starts the camera looking away or mid-word from
        fixing that offset onto the avatar for the whole call. Closeness is the driving keypoints'
        layout against the photo's (:func:`engine.hot_path.neutral_distance`). The reference can change
        during the window (the avatar then moves once to the new neutral), never after.
        """
        if not (seconds > 0):
            raise ValueError(f"the automatic neutral-pose window must be > 0 seconds, got {seconds}")
        self.auto_neutral = AutoNeutral(float(seconds))


@dataclass
class AutoNeutral:
    """State of a session's automatic neutral-pose choice: the window, its start (the session clock of
    its first frame), the best distance so far, and whether the window is over."""

    seconds: float
    start: float | None = None
    best: float = float("inf")
    done: bool = False


@dataclass
class FrameResult:
    """image: H×W×3 uint8 RGB avatar frame. driving_depth: H×W uint8 visualisation, when asked for.
    picture: the avatar pasted back into its full photo, when the caller asked for it on the device
    (:func:`engine.paste.animate_pictures`)."""

    image: np.ndarray
    driving_depth: np.ndarray | None = None
    picture: np.ndarray | None = None


class Engine(abc.ABC):
    """Common API. Images are H×W×3 uint8 RGB face crops; other sizes are resized to ``image_size``."""

    backend: str = "?"
    image_size: int
    # The model's (upper, lower) inner-lip keypoints and default lip-opening gain
    # (``keypoints.mouth_keypoints`` / ``mouth_open_gain``); () when the model names none, and then it
    # has no lip-opening gain to set (:func:`check_mouth_gain`).
    mouth_keypoints: tuple[int, ...] = ()
    mouth_open_gain: float = 1.0
    # The model's ``keypoints.jacobian_gain``: the frame graph scales the Jacobians' local motion by it
    # (a constant of the graph); the host's transfer of filtered keypoints does the same.
    jacobian_gain: float = 1.0
    # The model's lid reader (dagan.nets.lid_reader.LidReader; config ``blink``), or None: the engine
    # draws no blinks (engine/hot_path.py, step 6).
    lid_reader: Any = None
    # The model's open-mouth warp (dagan.config.MouthConfig, config ``mouth``) when it sets one, or None
    # (engine/hot_path.py, step 6).
    mouth: Any = None

    def __init__(self) -> None:
        self.session: Session | None = None

    @abc.abstractmethod
    def new_session(
        self, source_image: np.ndarray, relative: bool = False, adapt_scale: bool = True
    ) -> Session:
        """Build and return the cached source state for a new stream."""

    @abc.abstractmethod
    def animate_batch(
        self, sessions: list[Session], frames: list[np.ndarray], return_depth: bool = False
    ) -> list[FrameResult]:
        """One driving frame per session, all in one batched call; results in the same order."""

    def set_source(
        self, source_image: np.ndarray, relative: bool = False, adapt_scale: bool = True
    ) -> Session:
        """Cache ``source_image`` as this engine's default session (used by :meth:`animate`).

        ``adapt_scale`` is set on the session (see :class:`Session`), so it works for every backend.
        """
        self.session = self.new_session(source_image, relative=relative)
        self.session.adapt_scale = adapt_scale
        return self.session

    def animate(self, frame: np.ndarray, return_depth: bool = False) -> FrameResult:
        """Animate the default session's source with one driving frame."""
        if self.session is None:
            raise EngineError("set_source() must be called before animate()")
        return self.animate_batch([self.session], [frame], return_depth=return_depth)[0]

    def reset_reference(self) -> None:
        if self.session is not None:
            self.session.reset_reference()


def check_batch(sessions: list[Session], frames: list[np.ndarray]) -> None:
    """One frame per session, or a clear error (every backend's ``animate_batch`` starts with this)."""
    if len(sessions) != len(frames):
        raise EngineError(f"animate_batch got {len(sessions)} sessions but {len(frames)} frames")


NO_LIPS = "this model names no lip keypoints (keypoints.mouth_keypoints), so it has no mouth gain to set"


def check_mouth_gain(gain: float | None, has_lips: bool) -> float | None:
    """``gain`` as a session's :attr:`Session.mouth_gain` for a model that names its lip keypoints
    (``has_lips``: ``Engine.mouth_keypoints``) or not, else a clear :class:`EngineError`: a number in
    (0, ``MAX_MOUTH_GAIN``] (:func:`dagan.config.is_mouth_gain`), and only for a model with lips (a model
    without them has no opening to scale, and silently ignoring the setting would look like a broken
    control). None (the model's own gain) always passes. Callers that take the setting
    from a person (the server's messages, ``--mouth-gain``) check it here before any frame; the hot path
    checks every session's with it again (:func:`engine.hot_path.motion_inputs`)."""
    if gain is None:
        return None
    if not has_lips:
        raise EngineError(NO_LIPS)
    if not is_mouth_gain(gain):
        # the value is not repeated: the server answers peers with this text (docs/security.md)
        raise EngineError(
            f"the mouth gain must be a number in (0, {MAX_MOUTH_GAIN:g}] (1 = the driver's opening; a "
            "session's mouth_gain)"
        )
    return float(gain)


def check_image(image: np.ndarray, what: str) -> np.ndarray:
    """Validate an H×W×3 uint8 image with a message a caller can show as is."""
    return helpers.check_image(image, what, EngineError)


def resolve_device(device: str) -> torch.device:
    """:func:`dagan.helpers.resolve_device`, failing with an :class:`EngineError`."""
    try:
        return helpers.resolve_device(device)
    except helpers.DeviceError as exc:
        raise EngineError(str(exc)) from exc
