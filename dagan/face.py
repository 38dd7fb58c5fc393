"""Face detection, VoxCeleb-style cropping and temporal tracking: the one face module of the project.

Every entry point (offline ``animate``, the WebRTC server, the virtual camera and training-data preparation)
goes through this module, because DaGAN only works when the source and the driving crops are framed the
way its training data was: a square around the head, face roughly centred and taking about half of the
crop width, hair and neck visible (the VoxCeleb convention). Two entry points framing faces differently
would give two different-looking avatars from the same photo.

Detection uses mediapipe's BlazeFace models, which ship inside the mediapipe wheel and so run offline.
mediapipe is imported lazily (``import dagan.face`` stays cheap, e.g. for ``dagan --help``) and its
native start-up chatter on stderr is suppressed where that can be done safely; set
``DAGAN_MEDIAPIPE_LOGS=1`` to see it when debugging mediapipe itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_DEAD_ZONE",
    "DEFAULT_MARGIN",
    "DEFAULT_RELOCK",
    "DEFAULT_SMOOTHING",
    "HEAD_LIFT",
    "Detection",
    "FaceBox",
    "FaceDetector",
    "FaceTracker",
    "NoFaceError",
    "SourceFace",
    "crop_source",
    "face_landmarks",
    "locate_source",
    "prepare_source",
    "square_box",
]

# Margin added on every side of the detector's face box, as a fraction of the box side. mediapipe's
# full-range box spans roughly ear to ear and eyebrows-to-chin (plus a little forehead), so with 0.55 the
# face box is 1 / (1 + 2 * 0.55) ≈ 48% of the crop width: the middle of the 45–55% that VoxCeleb crops
# show, with the whole head, some hair and the neck inside the square.
from .errors import UserError
from .smoothing import OneEuroFilter, OneEuroParams

DEFAULT_MARGIN = 0.55
# The detector box sits low on the head (it stops at the brows/forehead, not at the top of the hair), so
# a crop centred on it cuts the hair and shows too much chest. Shifting the centre up by 10% of the face
# height moves the head to where VoxCeleb frames put it.
HEAD_LIFT = 0.10
# Weight of the previous smoothed box in the tracker's exponential moving average (per frame). 0.6 cuts
# white detection noise to sqrt((1 - 0.6) / (1 + 0.6)) = 50% of its amplitude while lagging only
# 1.5 frames behind a steady motion, which is below what a viewer notices at 25–30 fps.
DEFAULT_SMOOTHING = 0.6
# Dead zone of the tracker's output box, as a fraction of the box side (≈ 2.5 px of a 256 crop): the
# crop does not move at all while the smoothed box stays within it, so a still head gives a still crop.
DEFAULT_DEAD_ZONE = 0.012
# A detection farther than this (fraction of the box side) from the smoothed box, or a size change by
# more than a factor 1 + this, is a new situation (the face jumped, reappeared, or another person took over):
# the tracker snaps to it instead of gliding across the frame.
DEFAULT_RELOCK = 0.3
# The server detects faces on every 3rd camera frame and tracks in between (ServerSettings.detect_every;
# docs/benchmarks.md has the measurement: mediapipe's detector is the largest media cost per frame, and at
# k = 3 the box stays within 0.41 % of its side of per-frame detection on a moving face). Here so that the
# evaluation crops driving frames exactly as the server does without importing the server.
DEFAULT_DETECT_EVERY = 3

_MEDIAPIPE_LOG_ENV = "DAGAN_MEDIAPIPE_LOGS"
# mediapipe's short-range model frames faces slightly lower and tighter than the full-range one
# (measured on the astronaut and Grace Hopper test photos: centre ≈ 10% of the box height lower, box
# ≈ 6% smaller; after this mapping the two agree within ~1.5% in position and ~5% in size at all
# scales tried). Fallback detections are mapped onto the full-range convention so that a tracker
# switching models between frames does not make the crop jump.
_SHORT_RANGE_LIFT = 0.10
_SHORT_RANGE_SCALE = 1.06


class NoFaceError(UserError, ValueError):
    """No face could be found where one is required (e.g. in the source photo)."""

    def __init__(self, message: str = "no face found in the image") -> None:
        super().__init__(message)


# --------------------------------------------------------------------------------------------- helpers


def _as_rgb_uint8(image: Any, what: str = "image") -> np.ndarray:
    """Validate an H×W×3 uint8 image and return it C-contiguous (what mediapipe and cv2 need)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be H×W×3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{what} is too small: {image.shape[1]}×{image.shape[0]}")
    return np.ascontiguousarray(image)


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (mediapipe's C++ logs bypass Python).

    Used only around the first inference of a new mediapipe graph, which is when its TFLite/absl
    start-up messages are printed. The lock serialises concurrent users: two threads redirecting and
    restoring fd 2 in interleaved order could otherwise leave stderr pointing at /dev/null for good.
    """
    if os.environ.get(_MEDIAPIPE_LOG_ENV, "") not in ("", "0"):
        yield
        return
    with _stderr_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreter, closed stderr)
            yield
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _mediapipe() -> Any:
    """Import mediapipe on first use, with its glog/TF logging turned down first."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mediapipe as mp

    return mp


class _Graph:
    """A mediapipe solution built on first use, with stderr silenced while it starts up.

    mediapipe starts a graph's calculators on worker threads as soon as the solution object is
    constructed, and they print their TFLite/absl start-up messages until the first result comes back,
    so both the construction and the first ``process`` call run inside :func:`_native_stderr_silenced`.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._solution: Any = None

    def process(self, image: np.ndarray) -> Any:
        if self._solution is not None:
            return self._solution.process(image)
        with _native_stderr_silenced():
            solution = self._factory()
            try:
                result = solution.process(image)
            except BaseException:
                solution.close()
                raise
        self._solution = solution
        return result

    def close(self) -> None:
        solution, self._solution = self._solution, None
        if solution is not None:
            with contextlib.suppress(Exception):  # closing must not mask the error that led here
                solution.close()


# ---------------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class FaceBox:
    """A square crop box in pixel coordinates of the original image: centre (cx, cy) and side ``size``.

    Coordinates are continuous: pixel (i, j) covers [i, i+1) × [j, j+1), so the whole W×H image is the
    box cx=W/2, cy=H/2, size=max(W, H) (for a square image). Sub-pixel values are kept on purpose: the
    tracker's smoothed boxes move by fractions of a pixel, and rounding would turn that into jitter.
    """

    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cx) and math.isfinite(self.cy) and math.isfinite(self.size)):
            raise ValueError(f"FaceBox needs finite values, got {self}")
        if self.size <= 0:
            raise ValueError(f"FaceBox size must be positive, got {self.size}")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Corners (x0, y0, x1, y1) in pixels."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def fit(self, image_shape: Sequence[int]) -> FaceBox:
        """This box moved (never resized: the face keeps its scale) to where it crops the most image.

        Along each axis (``image_shape`` is H, W, ...) a box that fits inside the image is shifted inside
        it, so a face near the border gives a crop of real pixels instead of padding; a box longer than
        the image side is shifted only until it covers that whole side, so the unavoidable padding is as
        small as it can be and the face stays as central as the image allows.
        """
        h, w = int(image_shape[0]), int(image_shape[1])
        cx, cy = _fit_axis(self.cx, self.size, w), _fit_axis(self.cy, self.size, h)
        return self if (cx, cy) == (self.cx, self.cy) else FaceBox(cx, cy, self.size)

    def crop(self, image: np.ndarray, out_size: int, fit: bool = True, preshrink: bool = True) -> np.ndarray:
        """Cut the box out of an H×W×3 uint8 image and resample it to out_size×out_size.

        With ``fit`` (the default, what every entry point uses) the box is first moved inside the image
        by :meth:`fit`. Whatever part of the box is still outside the image (a box larger than the image
        side, or any box with ``fit=False``) is filled by :func:`_fill_outside`: a smooth, blurred
        continuation of the colours near the edge, with no streaks (edge replication smeared the last
        row of pixels across the padding, and hair or a collar became stripes) and no hard bars (black
        bars would be read by the network as part of the scene).

        Resampling is one ``cv2.warpAffine``; ``warpAffine`` has no area filter, so when shrinking it
        first samples bilinearly to an integer multiple k of out_size that is at least the box's
        resolution (no aliasing, sub-pixel exact) and then averages k×k blocks with ``INTER_AREA`` —
        the same result as an area resize of a sub-pixel crop. Enlarging is plain bilinear.

        ``preshrink`` (when the box is at least 4× the output): the box's part of the image is first
        averaged in exact m×m blocks, m = ⌊ratio / 2⌋, and the above runs on that at ratio / m ≥ 2. A
        face that fills a 640×480 webcam picture (a 640-px box at 128 px: k = 6) otherwise costs a
        768×768 warp, 3 ms of the server's 35 ms per frame; pre-shrunk, about a third of that. Sub-pixel
        exact in position, a little softer: the bilinear taps fall between block means. On real face
        frames 0.2 levels (mean; p99 1–2) from the direct path (``preshrink=False``), 0.35 from an exact
        area average where the direct path is 0.24; crops 50–52 dB and the bundled model's avatar frames
        60–63 dB from the direct path's (clips d3, s18 enlarged to ratios 7–11).
        """
        image = _as_rgb_uint8(image)
        out_size = int(out_size)
        if out_size < 1:
            raise ValueError(f"out_size must be positive, got {out_size}")
        box = self.fit(image.shape) if fit else self
        ratio = box.size / out_size  # source pixels per output pixel
        x0, y0 = box.cx - box.size / 2, box.cy - box.size / 2
        m = max(1, int(ratio // 2)) if preshrink else 1  # pre-shrink factor; 1: the direct path
        source, sx0, sy0 = (image, x0, y0) if m == 1 else _block_mean(image, x0, y0, box.size, m)
        k = max(1, math.ceil(ratio / m - 1e-6))
        inter = out_size * k
        step = box.size / m / inter  # source pixels per intermediate pixel (≤ 1 when shrinking)
        # Inverse map (output pixel index -> source pixel index), sampling at pixel centres. Replicating
        # the border only matters within half a pixel of the edge; farther out _fill_outside replaces it.
        matrix = np.array(
            [[step, 0.0, sx0 + 0.5 * step - 0.5], [0.0, step, sy0 + 0.5 * step - 0.5]], dtype=np.float64
        )
        out = cv2.warpAffine(
            source,
            matrix,
            (inter, inter),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        if k > 1:
            out = cv2.resize(out, (out_size, out_size), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
        inside_x = _coverage(x0, ratio, out_size, w)
        inside_y = _coverage(y0, ratio, out_size, h)
        if inside_x.min() < 1.0 or inside_y.min() < 1.0:
            out = _fill_outside(out, inside_y[:, None] * inside_x[None, :], image)
        return out

    def to_dict(self) -> dict[str, float]:
        """Plain floats, e.g. for JSON logs or a dataset's crop metadata."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceBox:
        return cls(cx=float(data["cx"]), cy=float(data["cy"]), size=float(data["size"]))


def _block_mean(
    image: np.ndarray, x0: float, y0: float, size: float, m: int
) -> tuple[np.ndarray, float, float]:
    """The part of ``image`` that the box [x0, x0 + size)² reads (+ m pixels for the bilinear taps),
    averaged in m×m blocks on the image's own m-pixel grid, and the box's corner in the result's pixels.

    Block j of the result covers image pixels [ox + j·m, ox + (j+1)·m), so an image point x is at
    (x − ox) / m there: the geometry is a plain scale, which keeps the crop sub-pixel exact. A region that
    ends at the image's edge off the grid is padded by edge replication (what the warp's
    BORDER_REPLICATE would read there anyway) before averaging.
    """
    h, w = image.shape[:2]

    def span(lo: float, side: int) -> tuple[int, int]:
        start = max(0, math.floor((lo - m) / m) * m)
        stop = min(side, math.ceil((lo + size + m) / m) * m)
        return (start, max(stop, start + 1)) if start < side else (side - 1, side)

    (ax, bx), (ay, by) = span(x0, w), span(y0, h)
    region = image[ay:by, ax:bx]
    pad_y, pad_x = -(by - ay) % m, -(bx - ax) % m
    if pad_y or pad_x:
        region = cv2.copyMakeBorder(region, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    rh, rw = region.shape[:2]
    small = cv2.resize(region, (rw // m, rh // m), interpolation=cv2.INTER_AREA)  # exact block means
    return small, (x0 - ax) / m, (y0 - ay) / m


def _fit_axis(centre: float, size: float, side: int) -> float:
    """:meth:`FaceBox.fit` along one axis: the centre clamped so that the box lies inside [0, side]
    (box no longer than the side) or covers all of it (box longer than the side)."""
    half = size / 2
    lo, hi = (half, side - half) if size <= side else (side - half, half)
    return min(max(centre, lo), hi)


def _coverage(start: float, step: float, n: int, side: int) -> np.ndarray:
    """Per output pixel along one axis, the fraction of its footprint [start + i·step, start + (i+1)·step)
    that lies inside the image [0, side]: 1 inside, 0 in the padding, in between on the edge pixel."""
    lo = start + step * np.arange(n, dtype=np.float64)
    return np.clip((np.minimum(lo + step, side) - np.maximum(lo, 0.0)) / step, 0.0, 1.0)


_FILL_SIDE = 64  # finest level of _fill_outside's pyramid, in pixels


def _fill_outside(crop: np.ndarray, inside: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Replace the parts of ``crop`` outside the image (``inside`` = per-pixel coverage in [0, 1]) by a
    smooth continuation of the colours inside: a push-pull fill, as out-of-focus background looks.

    Push: halve the coverage-weighted image and the coverage again and again (area averages), so every
    coarse pixel holds the mean colour of the image pixels under it. Pull: from the coarsest level up,
    each level keeps its own mean where it has image pixels and takes the upsampled coarser level where
    it has none. Near the edge the padding is thus the local colour of a few pixels inside, farther out
    an ever wider average: no edge detail is smeared outwards (no streaks), no mirror image of the face
    appears (as reflection padding gives), and there is no seam. ``image`` gives the colour of a box
    entirely outside it (nothing inside the crop to continue): its mean.
    """
    weight = inside.astype(np.float32)
    if float(weight.max()) <= 0.0:
        return np.broadcast_to(image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), crop.shape).copy()
    h, w = weight.shape
    # cv2 arithmetic throughout: numpy broadcasting made this 3-5x slower (it runs per padded frame).
    colour, cover = cv2.multiply(crop.astype(np.float32), cv2.merge([weight] * 3)), weight
    levels = []
    while True:
        # The fill is smooth, so its finest level need not be the crop's: it starts at <= _FILL_SIDE px.
        if max(cover.shape) <= _FILL_SIDE:
            levels.append((colour, cover))
        if max(cover.shape) <= 1:
            break
        size = (max(1, (cover.shape[1] + 1) // 2), max(1, (cover.shape[0] + 1) // 2))
        colour = cv2.resize(colour, size, interpolation=cv2.INTER_AREA)
        cover = cv2.resize(cover, size, interpolation=cv2.INTER_AREA)
    colour, cover = levels[-1]
    filled = cv2.divide(colour, cv2.merge([np.maximum(cover, 1e-6)] * 3))
    for colour, cover in reversed(levels[:-1]):
        up = cv2.resize(filled, (cover.shape[1], cover.shape[0]), interpolation=cv2.INTER_LINEAR)
        # Own mean colour where a pixel covers image, the coarser estimate where it covers none; the
        # coverage is boosted (×4, capped) so partly covered pixels keep their own image colour.
        own = np.minimum(cover * 4.0, 1.0)
        mean = cv2.divide(colour, cv2.merge([np.maximum(cover, 1e-6)] * 3))
        filled = cv2.blendLinear(mean, up, own, 1.0 - own)
    if filled.shape[:2] != (h, w):
        filled = cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)
    filled = np.clip(filled + 0.5, 0, 255).astype(np.uint8)
    return cv2.blendLinear(crop, filled, weight, 1.0 - weight)


@dataclass(frozen=True)
class Detection:
    """One detected face: ``bbox`` (x0, y0, x1, y1) in pixels, detector ``score`` in [0, 1].

    ``keypoints`` are mediapipe's six points in pixels: right eye, left eye, nose tip, mouth centre,
    right ear tragion, left ear tragion (right/left of the person). Boxes may extend past the image.
    """

    bbox: tuple[float, float, float, float]
    score: float
    keypoints: tuple[tuple[float, float], ...] = ()

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)


def square_box(
    bbox: Detection | Sequence[float],
    image_shape: Sequence[int],
    margin: float = DEFAULT_MARGIN,
    lift: float = HEAD_LIFT,
) -> FaceBox:
    """The VoxCeleb-style square crop box for a face box (x0, y0, x1, y1) or a :class:`Detection`.

    side = max(w, h) · (1 + 2·margin), centred on the face box and moved up by ``lift``·h so the hair
    is in and the chest mostly out (see :data:`DEFAULT_MARGIN` and :data:`HEAD_LIFT` for the values).
    The box returned is face-centred even where it runs past the image (a tracker smooths these boxes,
    and moving them would move the face); :meth:`FaceBox.crop` moves it inside the image when it cuts
    (:meth:`FaceBox.fit`) and fills what is still outside without streaks. Only the centre is clamped
    to the image (``image_shape`` is H, W, ...) to reject nonsense boxes.
    """
    x0, y0, x1, y1 = (float(v) for v in (bbox.bbox if isinstance(bbox, Detection) else bbox))
    w, h = x1 - x0, y1 - y0
    if not (w > 0 and h > 0):
        raise ValueError(f"face box must have positive width and height, got {(x0, y0, x1, y1)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    img_h, img_w = int(image_shape[0]), int(image_shape[1])
    cx = min(max((x0 + x1) / 2, 0.0), float(img_w))
    cy = min(max((y0 + y1) / 2 - lift * h, 0.0), float(img_h))
    return FaceBox(cx=cx, cy=cy, size=max(w, h) * (1 + 2 * margin))


# ------------------------------------------------------------------------------------------- detector


class FaceDetector:
    """mediapipe BlazeFace detection, full-range model with a short-range fallback.

    The full-range model (``model_selection=1``) finds faces from close-ups to a few metres, which covers
    both portrait photos and webcams; when it finds nothing the short-range model (``model_selection=0``,
    tuned for faces within ~2 m) gets a second look, which rescues some large, tilted close-ups. The
    mediapipe graphs are created on first use, so constructing a detector is free.

    Not thread-safe: a mediapipe graph processes one image at a time and carries internal state. Use one
    instance per thread (they are cheap: a few milliseconds to create, a few MB of memory). Close it (or
    use it as a context manager) to free the native graphs promptly.
    """

    def __init__(self, min_confidence: float = 0.5, fallback_short_range: bool = True) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.min_confidence = float(min_confidence)
        self.fallback_short_range = bool(fallback_short_range)
        self._graphs: dict[int, _Graph] = {}
        self._closed = False

    def _graph(self, model_selection: int) -> _Graph:
        if self._closed:
            raise RuntimeError("FaceDetector is closed")
        graph = self._graphs.get(model_selection)
        if graph is None:
            mp = _mediapipe()
            graph = _Graph(
                lambda: mp.solutions.face_detection.FaceDetection(
                    model_selection=model_selection, min_detection_confidence=self.min_confidence
                )
            )
            self._graphs[model_selection] = graph
        return graph

    def _run(self, model_selection: int, image: np.ndarray) -> list[Detection]:
        result = self._graph(model_selection).process(image)
        h, w = image.shape[:2]
        out = []
        for det in result.detections or ():
            loc = det.location_data
            rel = loc.relative_bounding_box
            x0, y0 = rel.xmin * w, rel.ymin * h
            x1, y1 = x0 + rel.width * w, y0 + rel.height * h
            if not (x1 > x0 and y1 > y0):
                continue
            if model_selection == 0:  # map onto the full-range model's framing (see _SHORT_RANGE_*)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - _SHORT_RANGE_LIFT * (y1 - y0)
                hw, hh = (x1 - x0) * _SHORT_RANGE_SCALE / 2, (y1 - y0) * _SHORT_RANGE_SCALE / 2
                x0, y0, x1, y1 = cx - hw, cy - hh, cx + hw, cy + hh
            keypoints = tuple((float(k.x * w), float(k.y * h)) for k in loc.relative_keypoints)
            box = (float(x0), float(y0), float(x1), float(y1))
            out.append(Detection(box, float(det.score[0]), keypoints))
        return out

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """All faces in an H×W×3 uint8 RGB image, largest first (empty list when there is none)."""
        image = _as_rgb_uint8(image_rgb)
        found = self._run(1, image)
        if not found and self.fallback_short_range:
            found = self._run(0, image)
        return sorted(found, key=lambda d: d.area, reverse=True)

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self._closed = True

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SourceFace:
    """The face of a source photo: its ``detection``, the face-centred square ``face_box`` (may run past
    the photo) and the ``crop_box`` actually cut (``face_box`` moved inside the photo where it fits).
    Paste-back (:mod:`dagan.paste`) needs all three: the crop's place, and where the face is in it."""

    detection: Detection
    face_box: FaceBox
    crop_box: FaceBox


def locate_source(
    image_rgb: np.ndarray, margin: float = DEFAULT_MARGIN, detector: FaceDetector | None = None
) -> SourceFace:
    """Find the largest face of a source photo and its crop boxes (:func:`crop_source` without the
    crop). Raises :class:`NoFaceError` when there is none."""
    image = _as_rgb_uint8(image_rgb, "source image")
    if detector is None:
        with FaceDetector() as own:
            detections = own.detect(image)
    else:
        detections = detector.detect(image)
    if not detections:
        raise NoFaceError(
            "no face found in the source image; use a photo with one clearly visible, roughly frontal, "
            "well-lit face"
        )
    face_box = square_box(detections[0], image.shape, margin)
    return SourceFace(detections[0], face_box, face_box.fit(image.shape))


def crop_source(
    image_rgb: np.ndarray,
    out_size: int = 256,
    margin: float = DEFAULT_MARGIN,
    detector: FaceDetector | None = None,
) -> tuple[np.ndarray, FaceBox]:
    """Crop the largest face of a source photo the VoxCeleb way; returns (crop, box).

    ``box`` is the region cut: the face box moved inside the photo where it fits (:meth:`FaceBox.fit`;
    a face near the edge is then off-centre, but every pixel is the photo's own), with the face's scale
    unchanged. Raises :class:`NoFaceError` when there is no face: animating a photo without one produces
    garbage, so it must fail loudly before any model runs.
    """
    image = _as_rgb_uint8(image_rgb, "source image")
    box = locate_source(image, margin, detector).crop_box
    return box.crop(image, out_size), box


# -------------------------------------------------------------------------------------------- tracker


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceTracker:
    """Stable face crops for a stream of driving frames (video file or webcam).

    Raw per-frame detections jitter by a pixel or two even on a perfectly still head; cropped naively,
    that jitter shakes the whole crop, and the animation model faithfully copies the shake onto the
    avatar. The tracker therefore filters the crop box in two stages:

    1. exponential smoothing of centre and size (``smoothing`` = weight of the previous state per
       frame), which removes most of the noise while following real motion with ~1.5 frames of lag;
    2. a dead zone on the output box (``dead_zone`` × box side): the output only moves once the smoothed
       box has left the dead zone, and then just enough to bring it back to its edge. A still head gives
       a bit-identical crop every frame, and a moving head a continuous, non-stepping motion.

    A detection far from the current box (``relock`` × box side, or a size change by more than a factor
    1 + relock) snaps the box immediately, so a face that jumps or reappears elsewhere is not reached by
    a slow glide. When several faces are visible, the one overlapping the tracked box most is kept.

    ``update`` returns (crop, box). On a frame without a face the previous box is kept and returned
    unchanged; :attr:`face_found` and :attr:`frames_without_face` tell callers it was lost. Before any
    face has been seen the crop is the centred square of the frame's short side and the box is ``None``.
    Like :class:`FaceDetector`, not thread-safe: one tracker per stream.

    ``box_filter`` (:class:`~dagan.smoothing.OneEuroParams`) replaces stage 1 by a One-Euro filter: a
    still head is smoothed harder and a moving one follows with less lag than the fixed average (the
    commands use it; see :mod:`dagan.smoothing`). The box is filtered in units of half its side, the
    scale of the model's keypoint coordinates, so one pair of parameters means the same for both
    filters. ``update``/``locate`` take the frame's capture time ``t`` in seconds for it (None: a frame
    clock at 30 fps).
    """

    def __init__(
        self,
        out_size: int = 256,
        margin: float = DEFAULT_MARGIN,
        smoothing: float = DEFAULT_SMOOTHING,
        detect_every: int = 1,
        detector: FaceDetector | None = None,
        *,
        dead_zone: float = DEFAULT_DEAD_ZONE,
        relock: float = DEFAULT_RELOCK,
        box_filter: OneEuroParams | None = None,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        if dead_zone < 0 or relock <= 0:
            raise ValueError("dead_zone must be >= 0 and relock > 0")
        self.out_size = int(out_size)
        self.margin = float(margin)
        self.smoothing = float(smoothing)
        self.detect_every = int(detect_every)
        self.dead_zone = float(dead_zone)
        self.relock = float(relock)
        self._own_detector = detector is None
        self._detector = detector if detector is not None else FaceDetector()
        self._euro = OneEuroFilter(box_filter) if box_filter is not None else None
        self._euro_unit = 1.0  # half the box side at lock-on: the filter's unit of length
        self.reset()

    def reset(self) -> None:
        """Forget the tracked face (e.g. when the input stream changes)."""
        self._target: FaceBox | None = None  # square box of the latest detection
        self._state: FaceBox | None = None  # exponentially smoothed box
        self._box: FaceBox | None = None  # output box (smoothed + dead zone)
        self._frame_shape: tuple[int, int] | None = None
        self._since_detection = 0
        self._last_detected: FaceBox | None = None  # the last detector box (before prediction)
        self._velocity = (0.0, 0.0)  # target motion per frame between the last two detections
        self.face_found = False
        self.frames_without_face = 0
        if self._euro is not None:
            self._euro.reset()

    @property
    def box(self) -> FaceBox | None:
        """The current output box (None until a face has been seen)."""
        return self._box

    def _pick(self, detections: list[Detection]) -> Detection | None:
        if not detections:
            return None
        if self._state is None:
            return detections[0]
        # Compare in face-box space: the tracked state's face box is its square shrunk by the margin.
        side = self._state.size / (1 + 2 * self.margin)
        ref = (self._state.cx - side / 2, self._state.cy - side / 2, self._state.cx + side / 2)
        ref = (*ref, self._state.cy + side / 2)
        best = max(detections, key=lambda d: _iou(d.bbox, ref))
        return best if _iou(best.bbox, ref) > 0.05 else detections[0]

    def _lock(self, target: FaceBox, t: float | None) -> None:
        """Start over at ``target`` (first face, or a relock): no smoothing across the jump."""
        self._state = self._box = target
        if self._euro is not None:
            self._euro.reset()
            self._euro_unit = target.size / 2
            self._euro(np.array([target.cx, target.cy, target.size]) / self._euro_unit, t)

    def _advance(self, target: FaceBox, t: float | None = None) -> None:
        state, box = self._state, self._box
        if state is None or box is None:
            self._lock(target, t)
            return
        jump = math.hypot(target.cx - state.cx, target.cy - state.cy)
        rescale = abs(math.log(target.size / state.size))
        if jump > self.relock * state.size or rescale > math.log1p(self.relock):
            self._lock(target, t)
            return
        if self._euro is not None:
            unit = self._euro_unit
            cx, cy, size = self._euro(np.array([target.cx, target.cy, target.size]) / unit, t) * unit
            state = FaceBox(float(cx), float(cy), max(float(size), 1e-3))
        else:
            a = 1.0 - self.smoothing
            state = FaceBox(
                state.cx + a * (target.cx - state.cx),
                state.cy + a * (target.cy - state.cy),
                state.size + a * (target.size - state.size),
            )
        # Dead zone: drag the output box only as far as needed to keep the smoothed box within reach.
        zone = self.dead_zone * box.size
        dx, dy = state.cx - box.cx, state.cy - box.cy
        dist = math.hypot(dx, dy)
        # The One-Euro state of a head that just stopped creeps towards it for a second (its still-head
        # cutoff is low): dragging the box along that tail would move a still crop by hundredths of a
        # pixel for dozens of frames. So with it the box moves by at least 5 % of the zone (0.06 % of its
        # side, far below a visible step) or not at all.
        step = 0.05 * zone if self._euro is not None else 0.0
        cx, cy = box.cx, box.cy
        if dist > zone + step:
            pull = (dist - zone) / dist
            cx, cy = cx + pull * dx, cy + pull * dy
        size = box.size
        ds = state.size - box.size
        if abs(ds) > zone + step:
            size += math.copysign(abs(ds) - zone, ds)
        self._state = state
        if (cx, cy, size) != (box.cx, box.cy, box.size):
            self._box = FaceBox(cx, cy, size)

    def update(self, frame_rgb: np.ndarray, t: float | None = None) -> tuple[np.ndarray, FaceBox | None]:
        """Process one frame (captured at ``t`` seconds, if known); returns (out_size×out_size crop, box
        or None if no face was ever seen)."""
        frame = _as_rgb_uint8(frame_rgb, "frame")
        box = self.locate(frame, t)
        if box is None:
            h, w = frame.shape[:2]
            return FaceBox(w / 2, h / 2, float(min(w, h))).crop(frame, self.out_size), None
        return box.crop(frame, self.out_size), box

    def locate(self, frame_rgb: np.ndarray, t: float | None = None) -> FaceBox | None:
        """The detect/track half of :meth:`update`: the output box for this frame, without cropping
        (None until a face has been seen), so a caller can time or do the crop itself.

        With ``detect_every`` = k > 1 the detector runs on every k-th frame only; in between, the
        target box is moved by the velocity seen between the last two detections (a constant-velocity
        prediction: free, and it keeps a turning head inside the crop between detections instead of
        letting the crop lag by up to k frames). A relock (jump) resets the velocity.
        """
        shape = (frame_rgb.shape[0], frame_rgb.shape[1])
        if shape != self._frame_shape:  # a new camera/resolution: old coordinates are meaningless
            self.reset()
            self._frame_shape = shape

        run_detector = self._target is None or self._since_detection + 1 >= self.detect_every
        if run_detector:
            frames = self._since_detection + 1
            self._since_detection = 0
            detection = self._pick(self._detector.detect(_as_rgb_uint8(frame_rgb, "frame")))
            if detection is None:
                self.face_found = False
                self.frames_without_face += 1
                self._velocity, self._last_detected = (0.0, 0.0), None
                return self._box
            self.face_found = True
            target = square_box(detection, frame_rgb.shape, self.margin)
            last = self._last_detected
            if self.detect_every > 1 and last is not None:
                vx, vy = (target.cx - last.cx) / frames, (target.cy - last.cy) / frames
                fast = math.hypot(vx, vy) * self.detect_every > self.relock * target.size
                self._velocity = (0.0, 0.0) if fast else (vx, vy)
            self._last_detected = self._target = target
        else:
            self._since_detection += 1
            vx, vy = self._velocity
            if vx or vy:
                assert self._target is not None
                last = self._target
                self._target = FaceBox(last.cx + vx, last.cy + vy, last.size)
        assert self._target is not None
        self._advance(self._target, t)
        return self._box

    def close(self) -> None:
        if self._own_detector:
            self._detector.close()

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ entry points


def prepare_source(image_rgb: np.ndarray, out_size: int, crop: bool = True) -> np.ndarray:
    """The source photo as the model gets it, out_size²: the face crop of :func:`crop_source` (without
    its box), or (``crop=False``, inputs that already are face crops) a plain resize. What the offline
    and camera commands hand the engine as the source."""
    if crop:
        return crop_source(image_rgb, out_size=out_size)[0]
    return cv2.resize(
        _as_rgb_uint8(image_rgb, "source image"), (out_size, out_size), interpolation=cv2.INTER_AREA
    )


class DrivingCropper:
    """Driving frames → out_size² crops with the smoothed tracker, or a plain resize with ``crop=False``.

    ``face_found`` says whether the last frame had a face (always True without cropping), so callers can
    count lost faces the same way whichever mode they run in. Like every crop, the tracker's box is moved
    inside the frame where it fits and padded without streaks where it does not (:meth:`FaceBox.crop`);
    the tracker itself keeps smoothing the face-centred box.
    """

    def __init__(self, out_size: int, crop: bool = True, box_filter: OneEuroParams | None = None) -> None:
        self.out_size = out_size
        self.tracker = FaceTracker(out_size=out_size, box_filter=box_filter) if crop else None

    @property
    def face_found(self) -> bool:
        return self.tracker is None or self.tracker.face_found

    def __call__(self, frame_rgb: np.ndarray, t: float | None = None) -> np.ndarray:
        if self.tracker is not None:
            return self.tracker.update(frame_rgb, t)[0]
        size = (self.out_size, self.out_size)
        return cv2.resize(frame_rgb, size, interpolation=cv2.INTER_AREA)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


@dataclass(frozen=True)
class TrackedFrame:
    """A frame of a clip on which the tracker has a face: its ``index`` in the clip, its ``crop``
    (out_size², RGB) and whether the detector found the face on it (``detected``; else the box was
    carried over from an earlier detection)."""

    index: int
    crop: np.ndarray
    detected: bool


def tracked_crops(
    frames: Iterator[np.ndarray] | Sequence[np.ndarray],
    fps: float,
    out_size: int,
    detect_every: int = DEFAULT_DETECT_EVERY,
    box_filter: OneEuroParams | None = None,
) -> Generator[TrackedFrame, None, None]:
    """A clip's frames (RGB, ``fps`` frames a second) tracked and cropped as the server does, one
    :class:`FaceTracker` with its detection cadence and box filter on the clip's own clock, the frames
    before the first face left out as the server leaves them out. The one loop the offline measures
    (``dagan eval-cross``'s clips, ``python -m bench.hot_path``) crop a driving clip with; the tracker is
    closed when the iteration ends or is abandoned."""
    with FaceTracker(out_size=out_size, detect_every=detect_every, box_filter=box_filter) as tracker:
        for i, frame in enumerate(frames):
            box = tracker.locate(frame, i / fps)
            if box is not None:
                yield TrackedFrame(i, box.crop(frame, out_size), bool(tracker.face_found))


# ------------------------------------------------------------------------------------------ landmarks

_local = threading.local()


def _thread_face_mesh() -> _Graph:
    """One static-image FaceMesh per thread: graphs are not thread-safe but are worth reusing (~20 ms)."""
    mesh = getattr(_local, "face_mesh", None)
    if mesh is None:
        mp = _mediapipe()
        mesh = _Graph(
            lambda: mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=4, refine_landmarks=True, min_detection_confidence=0.5
            )
        )
        _local.face_mesh = mesh
    return mesh


def face_landmarks(image_rgb: np.ndarray) -> np.ndarray | None:
    """478 face-mesh landmarks of the largest face as float32 (478, 3), or None when there is no face.

    Columns: x and y in pixels of ``image_rgb``, and mediapipe's relative depth z (same scale as x in
    units of the image width, smaller = closer to the camera, origin near the head centre). With
    ``refine_landmarks`` the last 10 points are the irises. Meant for head-pose estimation and
    synthetic-data generation, where the 6 detector keypoints are too coarse.
    """
    image = _as_rgb_uint8(image_rgb)
    h, w = image.shape[:2]
    result = _thread_face_mesh().process(image)
    faces = result.multi_face_landmarks or []
    if not faces:
        return None
    best: np.ndarray | None = None
    best_area = -1.0
    for face in faces:
        points = np.array([(p.x * w, p.y * h, p.z) for p in face.landmark], dtype=np.float32)
        extent = points[:, :2].max(axis=0) - points[:, :2].min(axis=0)
        area = float(extent[0] * extent[1])
        if area > best_area:
            best, best_area = points, area
    return best


# Side of the upscale face_landmarks_upscaled gives a small crop: the mesh finds the lids of a 128-px
# avatar crop far more reliably at 256 px. On real 128-px driving crops this brings the eye opening's
# agreement with the same signal measured on a 512-px crop of the same frames from r = 0.82 to 0.92
# (mouth 0.979 to 0.987); bilinear upscaling made it worse. The cross-identity evaluation measures
# with it too (evaluation.cross.measure_landmarks).
MESH_MIN_SIZE = 256


def face_landmarks_upscaled(image_rgb: np.ndarray, min_size: int = MESH_MIN_SIZE) -> np.ndarray | None:
    """:func:`face_landmarks` of ``image_rgb``, run on a bicubic upscale to ``min_size`` when the image is
    smaller, with x and y returned in ``image_rgb``'s own pixels."""
    h, w = image_rgb.shape[:2]
    if min(h, w) >= min_size:
        return face_landmarks(image_rgb)
    big_w, big_h = round(w * min_size / min(h, w)), round(h * min_size / min(h, w))
    lm = face_landmarks(cv2.resize(image_rgb, (big_w, big_h), interpolation=cv2.INTER_CUBIC))
    if lm is None:
        return None
    lm = lm.copy()
    lm[:, 0] *= w / big_w
    lm[:, 1] *= h / big_h
    return lm
