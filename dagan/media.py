"""Image and video input/output with one-line, human error messages.

Everything here speaks RGB uint8 (H×W×3), the layout the rest of the project uses; the BGR of OpenCV stays
inside this module. Failures raise :class:`MediaError`, whose message is written so that the CLI can print
it as-is ("photo.txt is not an image ..."), because a traceback from deep inside OpenCV is no help to a
user who passed the wrong file.

Videos are read and written with OpenCV's bundled FFmpeg, so nothing beyond the opencv wheel is needed.
OpenCV's and FFmpeg's own console messages about unreadable files are silenced: the MediaError says it
better, once.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Must be set before OpenCV initialises FFmpeg (first video open). -8 is AV_LOG_QUIET; setdefault keeps
# a user's own choice when debugging codecs.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2
import numpy as np

__all__ = [
    "FRAME_EXTENSIONS",
    "MediaError",
    "VideoReader",
    "VideoWriter",
    "colorize_depth",
    "load_image",
    "read_video",
    "write_video",
]

# Image files accepted as the frames of a folder-as-video (the dataset convention: one file per frame).
from .errors import UserError

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_FPS = 25.0


class MediaError(UserError, ValueError):
    """A file that cannot be used as the requested medium; the message is one line meant for users."""


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """Silence OpenCV's logger (e.g. 'backend can't be used to capture by name') for a failed open.

    OpenCV's log level is process-wide, so this is kept to the few calls that probe files or codecs.
    """
    try:
        previous = cv2.getLogLevel()
    except Exception:  # very old/odd builds without the binding: just run the call unsilenced
        yield
        return
    cv2.setLogLevel(0)  # LOG_LEVEL_SILENT
    try:
        yield
    finally:
        cv2.setLogLevel(previous)


def _check_exists(path: Path, what: str = "") -> None:
    if not path.exists():
        raise MediaError(f"{path} does not exist" + (f" ({what})" if what else ""))


# ---------------------------------------------------------------------------------------------- images


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image (gray, gray+alpha, BGR, BGRA; 8/16-bit/float) -> RGB uint8."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        gray = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
        return _composite_on_white(gray, image[:, :, 1])
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return _composite_on_white(image[:, :, :3], image[:, :, 3])
    raise MediaError(f"unsupported number of image channels: {channels}")


def _composite_on_white(bgr: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency onto white: the colour under transparent pixels is arbitrary (often black),
    and a cut-out portrait on white looks like a studio photo to the face detector and the network."""
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    out = bgr.astype(np.float32) * a + 255.0 * (1.0 - a)
    return cv2.cvtColor((out + 0.5).astype(np.uint8), cv2.COLOR_BGR2RGB)


def _decode_with_pil(data: bytes) -> np.ndarray | None:
    """Second chance for formats this OpenCV build cannot decode (GIF, some TIFF/HEIF variants...)."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # first frame of animations
            im = ImageOps.exif_transpose(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            rgba = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    except Exception:  # PIL raises many types for undecodable data; all mean "not an image"
        return None
    if has_alpha:
        return _composite_on_white(cv2.cvtColor(rgba[:, :, :3], cv2.COLOR_RGB2BGR), rgba[:, :, 3])
    return np.ascontiguousarray(rgba)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB uint8 H×W×3 (grayscale expanded, transparency flattened onto white).

    JPEG EXIF orientation is applied, so phone portraits come out upright. The bytes are read by Python
    and decoded with ``cv2.imdecode`` (``cv2.imread`` fails on non-ASCII paths on some platforms), with
    Pillow as a fallback decoder when installed.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not an image")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MediaError(f"{path} could not be read: {err.strerror or err}") from err
    if not data:
        raise MediaError(f"{path} is not an image (the file is empty)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    # JPEG: decode in colour mode, which applies EXIF orientation; JPEG has no alpha to lose. Other
    # formats: decode unchanged to keep alpha and 16-bit depth, converted explicitly below.
    flags = cv2.IMREAD_COLOR if data[:2] == b"\xff\xd8" else cv2.IMREAD_UNCHANGED
    with _opencv_quiet():
        decoded = cv2.imdecode(buffer, flags)
    if decoded is not None and decoded.size > 0:
        return _to_rgb8(decoded)
    fallback = _decode_with_pil(data)
    if fallback is not None and fallback.size > 0:
        return fallback
    raise MediaError(f"{path} is not an image (could not decode it as PNG, JPEG or another image format)")


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale ``frame`` to fit width×height keeping its aspect, centred on black: the virtual camera's
    square avatar in a 16:9 picture, the browser benchmark's square clip in a 640×480 webcam."""
    h, w = frame.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (nw, nh), interpolation=interp) if (nw, nh) != (w, h) else frame
    canvas = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = resized
    return canvas


# -------------------------------------------------------------------------------------------- reading


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders frame_2.png before frame_10.png (and zero-padded names as usual)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class VideoReader:
    """Iterate over the frames of a video file, or of a folder of png/jpg frames, as RGB uint8 arrays.

    ``fps`` falls back to 25 when the file does not report a usable rate (and is 25 for folders, the
    dataset convention). ``frame_count`` is the container's estimate for files, which can be off by a
    few frames or be ``None`` when unknown; iterate to get the exact count. ``size`` is (width, height)
    of the actual decoded frames. The file is opened and its first frame decoded in the constructor,
    so a bad input fails there with a :class:`MediaError` rather than mid-way through a job.

    Iterating again restarts from the first frame. Use as a context manager (or call ``close``) to
    release the decoder promptly.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        _check_exists(self.path)
        self._cap: Any = None
        self._first: np.ndarray | None = None  # decoded at open time, handed out by the next iteration
        self._frames: list[Path] | None = None
        if self.path.is_dir():
            self._frames = sorted(
                (p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                key=lambda p: _natural_key(p.name),
            )
            if not self._frames:
                raise MediaError(f"{self.path} contains no frames (no {'/'.join(FRAME_EXTENSIONS)} files)")
            first = load_image(self._frames[0])
            self.fps = DEFAULT_FPS
            self.frame_count: int | None = len(self._frames)
        else:
            if self.path.stat().st_size == 0:
                raise MediaError(f"{self.path} could not be read as a video (the file is empty)")
            self._cap = self._open()
            fps = float(self._cap.get(cv2.CAP_PROP_FPS))
            self.fps = fps if math.isfinite(fps) and 0.0 < fps <= 1000.0 else DEFAULT_FPS
            count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
            self.frame_count = int(count) if math.isfinite(count) and count > 0 else None
            first = self._read_capture()
            if first is None:
                self.close()
                raise MediaError(f"{self.path} contains no frames")
            self._first = first
        self.size: tuple[int, int] = (first.shape[1], first.shape[0])

    def _open(self) -> Any:
        with _opencv_quiet():
            cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise MediaError(f"{self.path} could not be read as a video (unsupported format or corrupt file)")
        return cap

    def _read_capture(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if not ok or frame is None or frame.size == 0:
            return None
        return _to_rgb8(frame)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._frames is not None:
            for frame_path in self._frames:
                frame = load_image(frame_path)
                if (frame.shape[1], frame.shape[0]) != self.size:
                    raise MediaError(
                        f"{frame_path} is {frame.shape[1]}×{frame.shape[0]} but the first frame of "
                        f"{self.path} is {self.size[0]}×{self.size[1]}"
                    )
                yield frame
            return
        if self._first is None:  # a previous iteration consumed the stream: start over
            if self._cap is not None:
                self._cap.release()
            self._cap = self._open()
            self._first = self._read_capture()
        frame, self._first = self._first, None
        while frame is not None:
            yield frame
            frame = self._read_capture()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._first = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_video(path: str | os.PathLike[str], max_frames: int | None = None) -> tuple[list[np.ndarray], float]:
    """All frames of a video (or the first ``max_frames``) and its fps; for short clips and tests."""
    frames: list[np.ndarray] = []
    with VideoReader(path) as reader:
        for frame in reader:
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(frame)
        return frames, reader.fps


# -------------------------------------------------------------------------------------------- writing

_avc1_works: bool | None = None  # probed once per process: the answer depends only on the OpenCV build


def _open_writer(path: Path, fps: float, size: tuple[int, int]) -> Any:
    """Open a cv2.VideoWriter, preferring H.264 ('avc1', playable in browsers) when this build has an
    encoder for it, else MPEG-4 part 2 ('mp4v', always available in the opencv wheels)."""
    global _avc1_works
    if _avc1_works is not False:
        with _opencv_quiet():
            writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"avc1"), fps, size)
        if writer.isOpened():
            _avc1_works = True
            return writer
        writer.release()
        _avc1_works = False
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        writer.release()
        raise MediaError(f"could not open a video encoder for {path} ({size[0]}×{size[1]} at {fps:g} fps)")
    return writer


class VideoWriter:
    """Write RGB uint8 frames to an .mp4 file, atomically.

    Frames go to a hidden temporary file next to the destination (same directory, so the final rename
    cannot cross file systems) which is renamed onto ``path`` only by a successful ``close``: an
    interrupted or failed run never leaves a truncated video under the final name, and an existing file
    there is replaced only by a complete one. Leaving the ``with`` block through an exception discards
    the temporary file. The parent directory is created if needed.

    The frame size is fixed by ``size`` (width, height) or by the first frame; a frame of another size
    raises :class:`MediaError` (an encoder would silently drop it).
    """

    def __init__(
        self, path: str | os.PathLike[str], fps: float = DEFAULT_FPS, size: tuple[int, int] | None = None
    ) -> None:
        self.path = Path(path)
        fps = float(fps)
        if not (math.isfinite(fps) and fps > 0):
            raise MediaError(f"invalid frame rate for {self.path}: {fps}")
        if self.path.exists() and self.path.is_dir():
            raise MediaError(f"{self.path} is a directory, not a video file name")
        self.fps = fps
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.frames_written = 0
        self._writer: Any = None
        self._tmp: Path | None = None
        self._closed = False

    def _start(self, size: tuple[int, int]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MediaError(f"cannot write {self.path}: {err.strerror or err}") from err
        # Not mkstemp: its 0600 mode would end up on the final video. The random part keeps concurrent
        # writers of the same path apart; the real suffix lets FFmpeg pick the container.
        suffix = self.path.suffix or ".mp4"
        self._tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:12]}.partial{suffix}")
        try:
            self._writer = _open_writer(self._tmp, self.fps, size)
        except BaseException:
            self._discard()
            raise
        self.size = size

    def write(self, frame: np.ndarray) -> None:
        """Append one H×W×3 uint8 RGB frame."""
        if self._closed:
            raise MediaError(f"{self.path} is already closed")
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
            shape = getattr(frame, "shape", None)
            raise MediaError(f"frames written to {self.path} must be H×W×3 RGB arrays, got shape {shape}")
        if frame.dtype != np.uint8:
            raise MediaError(f"frames written to {self.path} must be uint8, got {frame.dtype}")
        frame_size = (frame.shape[1], frame.shape[0])
        if self.size is not None and frame_size != self.size:
            raise MediaError(
                f"frame {self.frames_written} is {frame_size[0]}×{frame_size[1]} but {self.path} is "
                f"{self.size[0]}×{self.size[1]}"
            )
        if self._writer is None:
            self._start(frame_size)
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def _discard(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None

    def abort(self) -> None:
        """Stop and delete what was written; the final path is left untouched."""
        self._discard()
        self._closed = True

    def close(self) -> None:
        """Finish the file and move it to its final name. Raises MediaError if no frame was written."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            self._discard()
            raise MediaError(f"no frames were written to {self.path}")
        self._writer.release()
        self._writer = None
        tmp, self._tmp = self._tmp, None
        assert tmp is not None
        try:
            if tmp.stat().st_size == 0:
                raise MediaError(f"the video encoder produced an empty file for {self.path}")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # Never let a forgotten writer leave a hidden partial file behind.
        with contextlib.suppress(Exception):
            if not self._closed:
                self._discard()


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS) -> int:
    """Write all frames to ``path`` atomically; returns the number of frames written."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.frames_written


def colorize_depth(depth_u8: np.ndarray) -> np.ndarray:
    """H×W uint8 depth visualisation → H×W×3 RGB with a perceptual colour map (``dagan animate
    --show-depth`` and the server's depth preview draw it the same way)."""
    return cv2.cvtColor(cv2.applyColorMap(depth_u8, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
