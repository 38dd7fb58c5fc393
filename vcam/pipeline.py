"""The virtual-camera loop: camera → (latest frame wins) → animator → virtual camera.

A capture thread keeps only the newest webcam frame; the processing loop always takes that newest frame,
so when animation is slower than the camera, frames are dropped (and counted) instead of queueing, and
latency never grows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dagan.config import MAX_MOUTH_GAIN
from dagan.latest import LatestSlot
from dagan.media import fit_frame
from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter, OneEuroParams

from .io import FrameSink, FrameSource

log = logging.getLogger(__name__)

# One press of + or - moves the mouth gain by this much (the page's slider moves by 0.1; a key is coarser
# so that a few presses make a visible difference).
MOUTH_STEP = 0.25


def stepped_mouth_gain(current: float, steps: int) -> float:
    """``current`` moved by ``steps`` × :data:`MOUTH_STEP`, kept within [MOUTH_STEP, MAX_MOUTH_GAIN]."""
    return min(MAX_MOUTH_GAIN, max(MOUTH_STEP, round(current + steps * MOUTH_STEP, 4)))


class Animator(Protocol):
    """Turns one webcam frame into one avatar frame (or None while none is available yet)."""

    def process(self, frame: np.ndarray) -> np.ndarray | None: ...

    def recalibrate(self) -> None: ...

    def step_mouth_gain(self, steps: int) -> float | None:
        """Open the avatar's lips ``steps`` × :data:`MOUTH_STEP` further (negative: less) than now; the
        new gain, or None where the model has none to set (said in the log)."""
        ...

    def close(self) -> None: ...


class LocalAnimator:
    """Animate with an engine on this machine: face tracking + cached source + per-frame path.

    ``full_picture``: return the avatar pasted back into the whole photo (:mod:`dagan.paste`), fitted to
    ``output_size`` (width, height; None: the photo's own size), on the engine's device where it is a
    GPU; else the model's square crop. ``smoothing``: One-Euro parameters for the crop box and the
    keypoints (None: unfiltered), with the camera frames' arrival times as the clock. ``auto_neutral``
    > 0: choose the neutral pose automatically over that many seconds (and again after ``recalibrate``
    only when the person asks for it: a recalibration is their choice). ``mouth_gain``: how far the
    avatar's lips open, times the driver's (:attr:`engine.base.Session.mouth_gain`; None: the model's).
    """

    def __init__(
        self,
        engine,
        source_image: np.ndarray,
        relative: bool = True,
        crop: bool = True,
        *,
        full_picture: bool = False,
        output_size: tuple[int, int] | None = None,
        mask: str = "ellipse",
        smoothing: OneEuroParams | None = DEFAULT_PARAMS,
        auto_neutral: float = 0.0,
        mouth_gain: float | None = None,
    ) -> None:
        from dagan.errors import UserError
        from dagan.face import DrivingCropper, locate_source, prepare_source
        from dagan.paste import plan_paste
        from engine.base import check_mouth_gain
        from engine.paste import Paster

        self.engine = engine
        self.paster: Paster | None = None
        if full_picture:
            if not crop:
                raise UserError("the full picture needs the face found in the photo: drop --no-crop")
            face = locate_source(source_image)
            face_crop = face.crop_box.crop(source_image, engine.image_size)
            plan = plan_paste(source_image, face, face_crop, output_size, mask)
            self.paster = Paster(plan, getattr(engine, "device", "cpu"))
        else:
            face_crop = prepare_source(source_image, engine.image_size, crop)
        self.session = self.engine.set_source(face_crop, relative=relative)
        self.session.mouth_gain = check_mouth_gain(mouth_gain, bool(engine.mouth_keypoints))
        if smoothing is not None:
            self.session.kp_filter = OneEuroFilter(smoothing)
        if auto_neutral > 0 and relative:
            self.session.choose_neutral_automatically(auto_neutral)
        self.cropper = DrivingCropper(engine.image_size, crop, box_filter=smoothing)

    def process(self, frame: np.ndarray) -> np.ndarray:
        from engine.paste import animate_pictures

        t = time.monotonic()  # the frame's arrival: the filters' clock
        self.session.frame_time = t
        result = animate_pictures(self.engine, [self.session], [self.cropper(frame, t)], [self.paster])[0]
        if self.paster is None:
            return result.image
        return result.picture if result.picture is not None else self.paster(result.image)

    def recalibrate(self) -> None:
        self.engine.reset_reference()

    def step_mouth_gain(self, steps: int) -> float | None:
        from engine.base import NO_LIPS

        if not self.engine.mouth_keypoints:
            log.warning("%s", NO_LIPS)
            return None
        current = self.session.mouth_gain
        current = self.engine.mouth_open_gain if current is None else current
        self.session.mouth_gain = stepped_mouth_gain(current, steps)
        return self.session.mouth_gain

    def close(self) -> None:
        self.cropper.close()


class Controls:
    """User controls shared by the preview window keys and terminal input: r, p, q, + and -."""

    HELP = (
        "keys: r = recalibrate (take the current pose as neutral), p = pause/resume (real camera), "
        "+ / - = open the mouth more / less, q = quit"
    )

    def __init__(self) -> None:
        self.paused = False
        self.quit = threading.Event()
        self._recalibrate = threading.Event()
        self._lock = threading.Lock()
        self._mouth_steps = 0  # + and - presses not yet applied (the keys come from another thread)

    def handle_key(self, key: str) -> None:
        key = key.strip().lower()[:1]
        if key in ("+", "=", "-"):  # "=" is + without Shift
            with self._lock:
                self._mouth_steps += -1 if key == "-" else 1
        elif key == "r":
            self._recalibrate.set()
        elif key == "p":
            self.paused = not self.paused
            log.info("paused" if self.paused else "resumed")
        elif key == "q":
            self.quit.set()

    def take_recalibrate(self) -> bool:
        if self._recalibrate.is_set():
            self._recalibrate.clear()
            return True
        return False

    def take_mouth_steps(self) -> int:
        with self._lock:
            steps, self._mouth_steps = self._mouth_steps, 0
        return steps


@dataclass
class CamStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    passthrough: int = 0
    seconds: float = 0.0

    @property
    def fps_out(self) -> float:
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0


class CamRunner:
    """Runs the loop until the camera ends, ``controls.quit`` is set, or a frame/time limit is reached."""

    def __init__(
        self,
        source: FrameSource,
        sink: FrameSink,
        animator: Animator,
        controls: Controls | None = None,
        preview: bool = False,
    ) -> None:
        self.source, self.sink, self.animator = source, sink, animator
        self.controls = controls or Controls()
        self.preview = preview
        self.slot: LatestSlot[np.ndarray] = LatestSlot()
        self.stats = CamStats()
        self._last_avatar: np.ndarray | None = None

    def _capture(self) -> None:
        try:
            while not self.controls.quit.is_set():
                frame = self.source.read()
                if frame is None:
                    break
                self.stats.frames_in += 1
                self.slot.put(frame)
        finally:
            self.slot.close()

    def step(self, frame: np.ndarray) -> np.ndarray:
        """One camera frame → the frame sent to the virtual camera."""
        if self.controls.take_recalibrate():
            self.animator.recalibrate()
        steps = self.controls.take_mouth_steps()
        if steps:
            gain = self.animator.step_mouth_gain(steps)
            if gain is not None:
                log.info("mouth gain %.2f", gain)
        if self.controls.paused:
            self.stats.passthrough += 1
            out = frame
        else:
            avatar = self.animator.process(frame)
            if avatar is not None:
                self._last_avatar = avatar
            # before the first avatar arrives (remote mode) show the real camera rather than nothing
            out = self._last_avatar if self._last_avatar is not None else frame
        return fit_frame(out, self.sink.width, self.sink.height)

    def run(self, max_frames: int | None = None, max_seconds: float | None = None) -> CamStats:
        capture = threading.Thread(target=self._capture, name="camera", daemon=True)
        start = time.perf_counter()
        capture.start()
        try:
            while not self.controls.quit.is_set():
                if max_frames is not None and self.stats.frames_out >= max_frames:
                    break
                if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                    break
                frame = self.slot.get(timeout=0.5)
                if frame is None:
                    if not capture.is_alive():
                        break  # camera ended and nothing is left
                    continue
                out = self.step(frame)
                self.sink.send(out)
                self.stats.frames_out += 1
                if self.preview:
                    self._show(out)
        finally:
            self.controls.quit.set()
            capture.join(timeout=2.0)
            self.stats.dropped = self.slot.dropped
            self.stats.seconds = time.perf_counter() - start
        return self.stats

    def _show(self, frame: np.ndarray) -> None:
        import cv2

        cv2.imshow("DaGAN avatar (r recalibrate, p pause, q quit)", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(1) & 0xFF
        if key != 0xFF:
            self.controls.handle_key(chr(key))
