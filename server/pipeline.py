"""The per-session media work around the batched engine call, on a pool, timed by stage.

Per webcam frame the server does, in order: **decode** (VP8/H.264, in aiortc's receiver thread),
**convert** (YUV → RGB), **detect** (face detection, every ``detect_every``-th frame, constant-velocity
prediction between), **crop** (the face box resampled to the model's size), **infer** (one batched
engine call for every session with a frame ready), **compose** (avatar scaled to the output size, depth
beside it, RGB → YUV 4:2:0) and **encode** (in aiortc's sender, on the default executor). Everything but
inference is per session and independent, so it runs on a :class:`MediaPool` of threads sized to the
cores: what runs there is C code that releases the GIL (OpenCV's conversions and resamples, libvpx),
measured with ``python -m bench.gil``. mediapipe's face detector does not scale across Python
threads (its calls serialise), so detection can run in worker processes instead
(``detect_processes``); with ``detect_every`` > 1 it is a small share of the frame anyway.

:class:`StageClock` keeps wall and thread-CPU seconds per stage (thread CPU is what the calling thread
spent; mediapipe works on its own graph threads, so its thread CPU under-counts and the wall time is the
honest figure for ``detect`` in-process; a detector process reports its own process CPU instead). The
codec stages are timed by wrapping aiortc's codec classes once per process (:func:`instrument_codecs`);
in a process that also runs aiortc *clients* (the tests) those stages include the clients' codecs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dagan.face import Detection, FaceDetector

#: The stages of one stream-frame, in pipeline order (the /metrics labels and the bench's columns).
STAGES = ("decode", "convert", "detect", "crop", "infer", "compose", "encode")


@dataclass
class StageTotals:
    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


class StageClock:
    """Thread-safe per-stage totals: calls, wall seconds, CPU seconds (of the thread that did the work).

    ``infer`` is counted per stream-frame (a batch of B adds B calls and B × its share of the time: the
    call's duration divided by B), so every stage reads as "ms per stream-frame".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, StageTotals] = {s: StageTotals() for s in STAGES}

    def add(self, stage: str, wall_s: float, cpu_s: float, calls: int = 1) -> None:
        with self._lock:
            t = self.totals.setdefault(stage, StageTotals())
            t.calls += calls
            t.wall_s += wall_s
            t.cpu_s += cpu_s

    @contextlib.contextmanager
    def timed(self, stage: str, record: dict[str, float] | None = None) -> Iterator[None]:
        """Time the block; also store its wall ms in ``record[stage]`` (the per-frame message)."""
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            self.add(stage, wall, cpu)
            if record is not None:
                record[stage] = round(record.get(stage, 0.0) + wall * 1000, 3)

    def snapshot(self) -> dict[str, StageTotals]:
        with self._lock:
            return {k: StageTotals(v.calls, v.wall_s, v.cpu_s) for k, v in self.totals.items()}


#: One clock per process: the codec wrappers are process-wide, so the stages they feed must be too.
CLOCK = StageClock()

_codec_lock = threading.Lock()
_codec_patched = False


def instrument_codecs(clock: StageClock = CLOCK) -> None:
    """Wrap aiortc's video decoders and encoders (once per process) so each call feeds ``clock``.

    aiortc decodes on one thread per receiver and encodes on the event loop's default executor; both
    run libvpx/libx264 with the GIL released, so thread CPU time is exact for these stages. The wrapper
    costs two clock reads per frame.
    """
    global _codec_patched
    with _codec_lock:
        if _codec_patched:
            return
        from .compat import time_codec_calls
        from .tracks import tune_encoders

        tune_encoders()  # the cheaper encoder settings measured for the avatar video (server.tracks)
        time_codec_calls(clock.add)
        _codec_patched = True


def default_pool_size() -> int:
    """Threads for the per-session media work: one per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------- pixels


def frame_to_rgb(frame: Any) -> np.ndarray:
    """A decoded ``av.VideoFrame`` → H×W×3 uint8 RGB.

    aiortc's decoders give yuv420p: its planes are copied out (cheap) and converted by OpenCV, which
    releases the GIL and is ~3× cheaper than PyAV's swscale path here; any other format goes through
    PyAV. (PyAV's ``to_ndarray`` on one frame from two threads at once hung in our GIL test, so frames
    are never shared between pool threads.)
    """
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        return cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def rgb_to_video_frame(rgb: np.ndarray) -> Any:
    """H×W×3 uint8 RGB (even sides) → a yuv420p ``av.VideoFrame`` ready for the encoder (OpenCV's
    conversion: ~0.1 ms at 256², against ~0.5 ms through PyAV's ``reformat``)."""
    import av

    if rgb.shape[0] % 2 or rgb.shape[1] % 2:
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            format="yuv420p"
        )
    return av.VideoFrame.from_ndarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), format="yuv420p")


# ------------------------------------------------------------------------------------------ detection

_process_detector: FaceDetector | None = None


def _detect_in_process(image: np.ndarray) -> tuple[list[Detection], float]:
    """Runs in a detector process: the faces and the process CPU seconds they cost (mediapipe's graph
    threads included, which is why this is process and not thread time)."""
    global _process_detector
    if _process_detector is None:
        _process_detector = FaceDetector()
    c0 = time.process_time()
    found = _process_detector.detect(image)
    return found, time.process_time() - c0


class TimedDetector:
    """A detector wrapped so each real detection (not the frames tracked between) feeds the clock."""

    def __init__(self, inner: Any, clock: StageClock = CLOCK) -> None:
        self.inner, self.clock = inner, clock
        self.calls = 0
        self.last_wall_s = 0.0

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.inner.detect(image_rgb)
        finally:
            self.last_wall_s = time.perf_counter() - w0
            self.calls += 1
            self.clock.add("detect", self.last_wall_s, time.thread_time() - c0)

    def close(self) -> None:
        self.inner.close()


class ProcessDetectorPool:
    """Face detection in worker processes (mediapipe does not run in parallel across Python threads).

    ``spawn``, not ``fork``: the server process has torch and aiortc threads running, and a forked child
    of a threaded process may inherit a held lock. Each process builds its mediapipe graphs once; an image
    crosses as a pickled array (640×480×3 = 0.9 MB, ~0.3 ms), k frames apart.
    """

    def __init__(self, processes: int, clock: StageClock = CLOCK) -> None:
        self.clock = clock
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        )

    def detector(self) -> _RemoteDetector:
        return _RemoteDetector(self)

    def detect(self, image: np.ndarray) -> list[Detection]:
        w0 = time.perf_counter()
        found, cpu = self._pool.submit(_detect_in_process, image).result()
        self.clock.add("detect", time.perf_counter() - w0, cpu)
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _RemoteDetector:
    """The ``FaceDetector`` interface the tracker calls, forwarded to a :class:`ProcessDetectorPool`."""

    def __init__(self, pool: ProcessDetectorPool) -> None:
        self.pool = pool
        self.calls = 0
        self.last_wall_s = 0.0

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        w0 = time.perf_counter()
        found, cpu = self.pool._pool.submit(_detect_in_process, image_rgb).result()
        self.last_wall_s = time.perf_counter() - w0
        self.calls += 1
        self.pool.clock.add("detect", self.last_wall_s, cpu)  # the detector process's own CPU time
        return found

    def close(self) -> None:  # the pool is shared by all sessions and closed by the worker
        pass


# --------------------------------------------------------------------------------------------- lanes


@dataclass
class Prepared:
    """One webcam frame made ready for the engine: the crop (None: no face seen yet on this camera)."""

    item: Any  # sessions.InputFrame
    crop: np.ndarray | None
    face: bool
    seq: int
    stages: dict[str, float] = field(default_factory=dict)


class Lane:
    """One session's place in the pipeline: its tracker, at most one frame being prepared, and the
    newest prepared frame waiting for the engine (latest-frame-wins: an unconsumed one is replaced).

    The tracker is only touched by the one preparation in flight, so it needs no lock; ``busy`` and
    ``ready`` are guarded by ``lock``. Outputs carry a sequence number so a slower compose of an older
    frame can never overwrite a newer one on the outgoing track.
    """

    def __init__(self, tracker: Any, detector: Any = None) -> None:
        self.tracker = tracker
        self.detector = detector  # closed with the lane when the lane created it for its tracker
        self.lock = threading.Lock()
        self.busy = False
        self.ready: Prepared | None = None
        self.seq = 0
        self.delivered = -1
        self.dead = False

    def close(self) -> None:
        """Free the tracker and its detector's native graphs (the session ended)."""
        if self.tracker is not None:
            self.tracker.close()
        if self.detector is not None:
            self.detector.close()

    def put_ready(self, prepared: Prepared) -> bool:
        """Store a prepared frame; True when it replaced one the engine never used."""
        with self.lock:
            dropped = self.ready is not None
            self.ready = prepared
            self.busy = False
            return dropped

    def take_ready(self) -> Prepared | None:
        with self.lock:
            item, self.ready = self.ready, None
            return item

    def claim_delivery(self, seq: int) -> bool:
        """True (once) if the output of frame ``seq`` is newer than anything delivered so far."""
        with self.lock:
            if seq <= self.delivered:
                return False
            self.delivered = seq
            return True


def prepare(lane: Lane, item: Any, seq: int, out_size: int, clock: StageClock = CLOCK) -> Prepared:
    """convert → detect/track → crop, on a pool thread; each stage timed into ``clock`` (detection by
    the tracker's :class:`TimedDetector`, so frames tracked between detections cost it nothing)."""
    stages: dict[str, float] = {}
    with clock.timed("convert", stages):
        rgb = frame_to_rgb(item.frame)
    tracker = lane.tracker
    detector = getattr(tracker, "_detector", None)
    calls = getattr(detector, "calls", 0)
    # the detector (TimedDetector / process pool) times real detections only; the frame's arrival time
    # is the clock of the box's One-Euro filter
    box = tracker.locate(rgb, item.arrived)
    if getattr(detector, "calls", 0) != calls:
        stages["detect"] = round(detector.last_wall_s * 1000, 3)
    face = bool(tracker.face_found)
    if box is None:
        return Prepared(item, None, face, seq, stages)
    with clock.timed("crop", stages):
        crop = box.crop(rgb, out_size)
    return Prepared(item, crop, face, seq, stages)


class MediaPool:
    """A thread pool for the per-session work, with the count of jobs in flight (the worker waits for
    those before a batch, up to a bound, so frames that arrive together are inferred together)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="dagan-media")
        self._cond = threading.Condition()
        self.inflight = 0

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future:
        with self._cond:
            self.inflight += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: concurrent.futures.Future) -> None:
        with self._cond:
            self.inflight -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.inflight == 0, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
