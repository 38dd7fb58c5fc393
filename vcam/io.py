"""Camera sources and virtual-camera sinks behind two small interfaces, so the pipeline can be tested
with real in-memory implementations and run with OpenCV and pyvirtualcam in production."""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from typing import Protocol

import cv2
import numpy as np

from dagan.errors import UserError


class CameraError(UserError):
    """The webcam cannot be opened or stopped delivering frames."""


class VirtualCameraMissing(UserError):
    """No virtual camera device exists; the message says what to install for this OS."""


class FrameSource(Protocol):
    """Delivers RGB uint8 H×W×3 frames; ``read`` returns None when the source has ended."""

    fps: float

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class FrameSink(Protocol):
    """Accepts RGB uint8 frames of exactly ``width``×``height``."""

    width: int
    height: int

    def send(self, frame: np.ndarray) -> None: ...

    def close(self) -> None: ...


class OpenCVCamera:
    """A local webcam through OpenCV (device index or a video file/URL, useful for demos)."""

    def __init__(
        self, device: int | str = 0, width: int = 1280, height: int = 720, fps: float = 30.0
    ) -> None:
        self.capture = cv2.VideoCapture(device)
        if not self.capture.isOpened():
            raise CameraError(
                f"camera {device!r} could not be opened: check that it is connected and not used by another "
                "program (choose another with --camera N)"
            )
        if isinstance(device, int):
            self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self.capture.set(cv2.CAP_PROP_FPS, fps)
        reported = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(reported) if reported and 1 <= reported <= 240 else fps

    def read(self) -> np.ndarray | None:
        ok, frame = self.capture.read()
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if ok else None

    def close(self) -> None:
        self.capture.release()


class IterableSource:
    """Frames from any iterable (a list, a generator, a VideoReader); for tests and file playback."""

    def __init__(self, frames: Iterable[np.ndarray], fps: float = 30.0) -> None:
        self._it: Iterator[np.ndarray] = iter(frames)
        self.fps = fps

    def read(self) -> np.ndarray | None:
        return next(self._it, None)

    def close(self) -> None:
        pass


def missing_device_message(detail: str = "") -> str:
    """What to install so a virtual camera exists, for the OS this runs on."""
    system = platform.system()
    if system == "Linux":
        hint = (
            "install v4l2loopback and create a device: sudo apt install v4l2loopback-dkms && "
            'sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="DaGAN avatar"'
        )
    elif system == "Darwin":
        hint = "install OBS Studio (28 or newer), start its Virtual Camera once, then run this again"
    elif system == "Windows":
        hint = "install OBS Studio (26 or newer) and start its Virtual Camera once (or install Unity Capture)"
    else:
        hint = "install a virtual camera driver supported by pyvirtualcam"
    return f"no virtual camera device found: {hint}" + (f" ({detail})" if detail else "")


class VirtualCameraSink:
    """pyvirtualcam output. Any failure to open a device becomes one clear :class:`VirtualCameraMissing`."""

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: float = 30.0,
        backend: str | None = None,
        device: str | None = None,
    ) -> None:
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise VirtualCameraMissing("pyvirtualcam is not installed: pip install pyvirtualcam") from exc
        try:
            self.camera = pyvirtualcam.Camera(
                width=width,
                height=height,
                fps=fps,
                fmt=pyvirtualcam.PixelFormat.RGB,
                backend=backend,
                device=device,
            )
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise VirtualCameraMissing(missing_device_message(first_line)) from exc
        self.width, self.height = width, height
        self.device = self.camera.device

    def send(self, frame: np.ndarray) -> None:
        self.camera.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        self.camera.close()


class MemorySink:
    """Keeps every frame sent (a real sink for tests and for recording previews)."""

    def __init__(self, width: int = 320, height: int = 180) -> None:
        self.width, self.height = width, height
        self.frames: list[np.ndarray] = []
        self.closed = False

    def send(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3):
            raise ValueError(f"frame {frame.shape} does not fit a {self.width}×{self.height} sink")
        self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed = True
