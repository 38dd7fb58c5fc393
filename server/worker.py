"""The inference worker: one thread that owns the engine, fed by a pool that prepares every session's frames.

A webcam frame goes through three hand-overs, each one frame deep (latest-frame-wins, so delay never
grows when the machine is slower than the cameras):

1. the session's input slot (filled by the event loop) → a **preparation** job on the
   :class:`~server.pipeline.MediaPool` (YUV → RGB, face detection every ``detect_every`` frames with
   prediction in between, crop), at most one in flight per session, started as soon as a frame is there
   and the previous prepared frame was taken by the engine; during an engine call, just in time for its
   expected end, so preparation overlaps the call without handing it a frame one call old (at once
   during a batch the engine splits into parallel calls: those take every core);
2. the session's ready slot → **one batched** ``engine.animate_batch`` call for every session with a
   prepared frame, on this worker's thread (it waits up to ``batch_wait_s`` for preparations already in
   flight, so frames that arrive together are inferred together);
3. a **compose** job on the pool (avatar scaled, depth beside it, RGB → YUV) → the session's outgoing
   track, guarded by a per-session sequence number so an older frame never overwrites a newer one.

Everything that uses the engine runs on this thread (source encoding too, via :meth:`InferenceWorker.call`),
so a backend never sees concurrent calls and the asyncio event loop never waits for a model. Each stage
is timed into :data:`server.pipeline.CLOCK` (``dagan_stage_seconds_total`` on /metrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dagan.face import FaceDetector, FaceTracker
from dagan.media import colorize_depth
from dagan.smoothing import OneEuroParams
from engine import Engine
from engine.paste import animate_pictures

from .metrics import Metrics
from .pipeline import (
    CLOCK,
    Lane,
    MediaPool,
    Prepared,
    ProcessDetectorPool,
    StageClock,
    TimedDetector,
    prepare,
    rgb_to_video_frame,
)
from .sessions import LiveSession, OutputFrame, SessionRegistry

log = logging.getLogger("dagan.server")

#: A session's unusable camera frames are logged at most this often (one line, with the reason).
BAD_FRAME_LOG_INTERVAL_S = 60.0


class UnusableFrame(ValueError):
    """A camera frame the pipeline cannot crop for the model (``reason`` is the metric label)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason, self.text = reason, text


def compose(avatar: np.ndarray, depth: np.ndarray | None, size: int) -> np.ndarray:
    """The frame sent to the viewer: the avatar at size×size, with the driving depth beside it if given."""
    interp = cv2.INTER_LINEAR if avatar.shape[0] < size else cv2.INTER_AREA
    out = avatar if avatar.shape[0] == size else cv2.resize(avatar, (size, size), interpolation=interp)
    if depth is not None:
        d = colorize_depth(depth)
        if d.shape[0] != size:
            d = cv2.resize(d, (size, size), interpolation=interp)
        out = np.concatenate([out, d], axis=1)
    return np.ascontiguousarray(out)


def compose_picture(picture: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    """A full-picture frame (the avatar pasted into its photo), with the driving depth beside it, at the
    picture's height, if given."""
    if depth is None:
        return picture
    side = picture.shape[0]
    d = cv2.resize(colorize_depth(depth), (side, side), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(np.concatenate([picture, d], axis=1))


@dataclass
class TimedOutputFrame(OutputFrame):
    """An output frame with the wall ms of each server stage it went through (the per-frame message)."""

    stages: dict[str, float] = field(default_factory=dict)


class InferenceWorker:
    """Runs the engine off the event loop. Start once, ``wake`` on every new frame, ``stop`` at shutdown.

    ``pool_size``: threads for the per-session media work (0: one per core). ``detect_every``: run the
    face detector on every k-th frame of a session. ``detect_processes``: > 0 runs detection in that many
    worker processes instead of the pool threads. ``batch_wait_s``: how long a batch may wait for
    preparations already in flight.
    """

    def __init__(
        self,
        engine: Engine,
        registry: SessionRegistry,
        metrics: Metrics,
        output_size: int,
        *,
        pool_size: int = 0,
        detect_every: int = 1,
        detect_processes: int = 0,
        batch_wait_s: float = 0.004,
        clock: StageClock = CLOCK,
    ) -> None:
        from .pipeline import default_pool_size

        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.output_size = output_size
        self.pool_size = pool_size if pool_size > 0 else default_pool_size()
        self.detect_every = max(1, int(detect_every))
        self.detect_processes = max(0, int(detect_processes))
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self._cond = threading.Condition()
        self._kick = False
        self._stop = False
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._lanes: dict[str, Lane] = {}
        self._lanes_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._pool: MediaPool | None = None
        self._detectors: ProcessDetectorPool | None = None
        self.rounds = 0
        self.busy_s = 0.0  # seconds the worker spent in engine calls (saturation, on /metrics)
        # Just-in-time preparation: while an engine call runs, a session's next frame is prepared only
        # once the call is about to end (expected end minus a preparation's duration), so the frame the
        # next call gets is at most one camera interval old, never a whole engine call old. Not while a
        # call is split into parallel calls (onnxruntime on a CPU, engine.select.default_parallel): those
        # take every core, so preparations held back to its end finished late and the next call waited
        # for them (two streams on 2 cores: 17.4 fps each just in time, 21.4 prepared as frames come;
        # docs/benchmarks.md).
        self._busy_until = 0.0  # monotonic time the running engine call is expected to end (0: idle)
        self._parallel = max(1, int(getattr(engine, "parallel", 1)))  # concurrent calls per batch
        self._infer_ewma = 0.0  # seconds per engine call
        self._prep_ewma = 0.0  # seconds per preparation
        # Camera frames that cannot be used (server.settings: min/max_video_side, bad_video_notice_s);
        # on_notice(session, message) sends the peer a data-channel message from this side of the loop.
        self.min_video_side = 32
        self.max_video_side = 4096
        self.bad_video_notice_s = 3.0
        self.on_notice: Callable[[LiveSession, dict], None] | None = None
        # One-Euro parameters of each session's crop-box filter (dagan.smoothing; None: the tracker's
        # fixed average); the keypoint filter is on the engine session (server.app).
        self.smoothing: OneEuroParams | None = None
        metrics.stage_clock = clock
        metrics.worker_busy = lambda: self.busy_s

    # -- control (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._pool = MediaPool(self.pool_size)
        if self.detect_processes:
            self._detectors = ProcessDetectorPool(self.detect_processes, self.clock)
        self._thread = threading.Thread(target=self._run, name="dagan-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        with self._lanes_lock:
            for lane in self._lanes.values():
                lane.close()
            self._lanes.clear()
        if self._detectors is not None:
            self._detectors.close()
            self._detectors = None

    def wake(self) -> None:
        """A frame arrived or a session changed: start preparations now, and let the thread look."""
        if not self._stop and self._pool is not None:
            try:
                self._schedule()
            except Exception:  # scheduling must never break the event loop's frame callback
                log.exception("could not schedule frame preparation")
        self._kick_thread()

    def _kick_thread(self) -> None:
        with self._cond:
            self._kick = True
            self._cond.notify()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread (before the next batch); its result or error in a Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stop or self._thread is None:
                raise RuntimeError("the inference worker is not running")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``await`` version of :meth:`submit` for the event loop."""
        return await asyncio.wrap_future(self.submit(fn))

    @property
    def tracked_sessions(self) -> int:
        """Sessions whose face tracker is alive (freed within one round after a session ends)."""
        with self._lanes_lock:
            return len(self._lanes)

    # -- preparation (event loop, pool callbacks, worker thread) -------------------------------------
    def _new_lane(self) -> Lane:
        if self._detectors is not None:
            detector: Any = self._detectors.detector()
        else:
            detector = TimedDetector(FaceDetector(), self.clock)
        size, every = self.engine.image_size, self.detect_every
        tracker = FaceTracker(out_size=size, detect_every=every, detector=detector, box_filter=self.smoothing)
        return Lane(tracker, detector)

    def _schedule(self) -> None:
        """Free the lanes of ended sessions; start a preparation for every idle lane with a new frame."""
        pool = self._pool
        if pool is None:
            return
        live = self.registry.snapshot()
        # Too early to prepare while the engine call has longer to run than a preparation takes: the
        # input slot keeps the newest frame meanwhile (and counts the ones it replaces as dropped).
        too_early = time.monotonic() < self._busy_until - 1.5 * self._prep_ewma - 0.002
        with self._lanes_lock:
            live_ids = {s.id for s in live}
            for sid in [sid for sid in self._lanes if sid not in live_ids]:
                lane = self._lanes.pop(sid)
                with lane.lock:
                    lane.dead = True
                    idle = not lane.busy
                if idle:
                    lane.close()
            for session in live:
                if session.closed or session.engine_session is None or session.output is None:
                    continue
                if session.source_crop is None:
                    continue
                lane = self._lanes.get(session.id)
                if lane is None:
                    lane = self._lanes[session.id] = self._new_lane()
                if too_early:
                    continue
                with lane.lock:
                    if lane.busy or lane.ready is not None:
                        continue  # one in flight, or the engine has not taken the last one yet
                    item = session.input.take()
                    if item is None:
                        continue
                    lane.busy = True
                    lane.seq += 1
                    seq = lane.seq
                pool.submit(self._prepare, lane, session, item, seq)

    def _prepare(self, lane: Lane, session: LiveSession, item: Any, seq: int) -> None:
        t0 = time.perf_counter()
        bad = False
        try:
            problem = self.frame_problem(item.frame)
            if problem is not None:
                raise UnusableFrame(*problem)
            prepared: Prepared | None = prepare(lane, item, seq, self.engine.image_size, self.clock)
            self._prep_ewma += 0.2 * (time.perf_counter() - t0 - self._prep_ewma)
        except Exception as err:
            bad = True
            prepared = self._bad_frame(session, lane, item, seq, err)
        finally:
            with lane.lock:
                dead = lane.dead
            if dead:
                lane.close()
        if dead:
            return
        if not bad and session.bad_since is not None:
            session.bad_since = None  # usable video again
            if session.bad_told:
                session.bad_told = False
                self._notify(session, {"type": "video_ok"})
        if prepared is None:
            with lane.lock:
                lane.busy = False
        else:
            lane.put_ready(prepared)
        self.wake()  # the engine may take it now; this lane may take the frame that came meanwhile

    def frame_problem(self, frame: Any) -> tuple[str, str] | None:
        """(reason, sentence) when a decoded camera frame cannot be cropped for the model: too small
        to hold a face (a 1×1 stream), or larger than any camera (a costly conversion for nothing)."""
        width, height = getattr(frame, "width", None), getattr(frame, "height", None)
        if not isinstance(width, int) or not isinstance(height, int):
            return None
        low, high = self.min_video_side, self.max_video_side
        if width < low or height < low:
            return "too_small", f"the camera sends {width}×{height} frames; a face needs at least {low}×{low}"
        if width > high or height > high:
            return "too_large", f"the camera sends {width}×{height} frames; at most {high}×{high} are used"
        return None

    def _bad_frame(
        self, session: LiveSession, lane: Lane, item: Any, seq: int, err: Exception
    ) -> Prepared | None:
        """A frame that could not be converted or cropped: counted, logged at most once a minute per
        session (with its reason, no traceback: a bad stream sends 30 a second), and after
        ``bad_video_notice_s`` of nothing else the peer is told why. The session keeps showing its
        last picture; until it has shown one, the photo (the returned frame without a crop)."""
        if isinstance(err, UnusableFrame):
            reason, text = err.reason, err.text
        else:
            reason = "unusable"
            text = f"the camera frame could not be read ({type(err).__name__}: {err})"[:200]
        self.metrics.count("bad_frames", reason)
        now = time.monotonic()
        session.bad_frames += 1
        if session.bad_since is None:
            session.bad_since = now
        if session.bad_logged_at is None or now - session.bad_logged_at >= BAD_FRAME_LOG_INTERVAL_S:
            session.bad_logged_at = now
            log.warning(
                "session %s: camera frame not usable (%s): %s; %d so far (logged once a minute)",
                session.id,
                reason,
                text,
                session.bad_frames,
            )
            if not isinstance(err, UnusableFrame):
                log.debug("session %s: the unusable frame's error", session.id, exc_info=err)
        if not session.bad_told and now - session.bad_since >= self.bad_video_notice_s:
            session.bad_told = True
            self._notify(
                session,
                {
                    "type": "error",
                    "error": "bad_video",
                    "reason": reason,
                    "message": f"{text}: the avatar cannot follow this video (it keeps its last picture)",
                },
            )
        with lane.lock:
            shown = lane.delivered >= 0
        return None if shown else Prepared(item, None, False, seq)

    def _notify(self, session: LiveSession, message: dict) -> None:
        if self.on_notice is not None:
            try:
                self.on_notice(session, message)
            except Exception:  # telling the peer must never break the frame path
                log.debug("session %s: could not queue a notice", session.id, exc_info=True)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._kick or bool(self._jobs), timeout=0.5)
                if self._stop:
                    break
                self._kick = False
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            try:
                self._schedule()
                self._round()
            except Exception:  # never let one bad round kill the service
                log.exception("inference round failed")
                self.metrics.add("errors")
        with self._cond:
            for _, future in self._jobs:
                future.cancel()
            self._jobs.clear()

    def _round(self) -> None:
        pool = self._pool
        if pool is None:
            return
        with self._lanes_lock:
            pending = any(lane.busy for lane in self._lanes.values())
        if pending and self.batch_wait_s > 0:
            pool.wait_idle(self.batch_wait_s)  # let preparations in flight join this batch
        batch: list[tuple[LiveSession, Lane, Prepared, Any]] = []
        for session in self.registry.snapshot():
            with self._lanes_lock:
                lane = self._lanes.get(session.id)
            if lane is None:
                continue
            # One read of each field the event loop may clear at any moment (a hang-up mid-round).
            engine_session, source_crop, output = session.engine_session, session.source_crop, session.output
            if session.closed or engine_session is None or source_crop is None or output is None:
                continue
            prepared = lane.take_ready()
            if prepared is None:
                continue
            session.face_missing = 0 if prepared.face else session.face_missing + 1
            if prepared.crop is None:
                # No face seen yet on this camera: show the photo at rest instead of animating a random
                # crop, and keep the relative-motion reference for the first frame that has a face.
                pool.submit(self._post, session, lane, output, prepared, source_crop, None, 0.0, 0)
                continue
            if session.recalibrate:
                session.recalibrate = False
                engine_session.reset_reference()
            engine_session.frame_time = prepared.item.arrived  # the keypoint filter's clock
            engine_session.mouth_gain = session.mouth_gain  # checked when it was set (server.service)
            batch.append((session, lane, prepared, engine_session))
        if not batch:
            return
        if len(batch) < 2 or self._parallel < 2:  # a split call leaves no core to wait for (above)
            self._busy_until = time.monotonic() + self._infer_ewma
        self._schedule()  # the slots just emptied: fast engines get the next frames prepared meanwhile

        want_depth = any(s.show_depth for s, *_ in batch)
        t0, c0 = time.perf_counter(), time.thread_time()
        helpers0 = getattr(self.engine, "parallel_cpu_s", 0.0)  # parallel calls' CPU on other threads
        # Full pictures are pasted here, on the device, when the engine is on a GPU; on the CPU the
        # compose jobs paste them with OpenCV on the pool (engine.paste).
        pasters = [s.paster if s.picture == "full" else None for s, *_ in batch]
        try:
            results = animate_pictures(
                self.engine, [b[3] for b in batch], [b[2].crop for b in batch], pasters, want_depth
            )
        except Exception:
            log.exception("engine.animate_batch failed for %d session(s)", len(batch))
            self.metrics.add("errors", len(batch))
            self._busy_until = 0.0
            return
        infer_s, infer_cpu = time.perf_counter() - t0, time.thread_time() - c0
        infer_cpu += getattr(self.engine, "parallel_cpu_s", 0.0) - helpers0
        self._busy_until = 0.0
        self._infer_ewma += 0.3 * (infer_s - self._infer_ewma)
        self._schedule()  # frames that waited for the call's end
        n = len(batch)
        self.clock.add("infer", infer_s, infer_cpu, calls=n)
        self.busy_s += infer_s
        self.metrics.observe_batch(n, infer_s)
        self.rounds += 1
        for (session, lane, prepared, _), result in zip(batch, results, strict=True):
            prepared.stages["infer"] = round(infer_s * 1000 / n, 3)
            output = session.output
            if output is None:
                continue
            pool.submit(
                self._post,
                session,
                lane,
                output,
                prepared,
                result.image,
                result.driving_depth,
                infer_s,
                n,
                result.picture,
            )

    def _post(
        self,
        session: LiveSession,
        lane: Lane,
        output: Any,
        prepared: Prepared,
        image: np.ndarray,
        depth: np.ndarray | None,
        infer_s: float,
        batch: int,
        picture: np.ndarray | None = None,
    ) -> None:
        """compose + RGB → YUV on a pool thread, then hand the frame to the session's track. A
        full-picture session's frame is the avatar pasted back into its photo (``picture`` when the
        worker already pasted it on the device)."""
        show_depth = session.show_depth
        depth = depth if show_depth else None
        if show_depth and depth is None:
            depth = np.zeros(image.shape[:2], np.uint8)  # keep the frame size stable until depth exists
        paster = session.paster if session.picture == "full" else None
        try:
            with self.clock.timed("compose", prepared.stages):
                if paster is not None:
                    rgb = compose_picture(picture if picture is not None else paster(image), depth)
                else:
                    rgb = compose(image, depth, self.output_size)
                frame = rgb_to_video_frame(rgb)
        except Exception:
            log.exception("session %s: could not compose an output frame", session.id)
            self.metrics.add("errors")
            return
        if not lane.claim_delivery(prepared.seq):
            return  # a newer frame of this session was delivered first
        item = prepared.item
        output.deliver(
            TimedOutputFrame(frame, item.pts, item.arrived, prepared.face, infer_s, batch, prepared.stages)
        )
