"""The inference worker: one thread that owns the engine and every session's face tracker.

Each round it takes the newest webcam frame of every live session (older ones were already dropped by
the latest-frame-wins slots), crops the face with that session's :class:`dagan.face.FaceTracker`, and runs
all crops through a single ``engine.animate_batch`` call, so N viewers cost one batched forward pass
rather than N. Results go back to each session's :class:`~server.tracks.AvatarTrack`.

Everything that uses the engine runs on this thread (source encoding too, via :meth:`InferenceWorker.call`),
so a backend never sees concurrent calls and the asyncio event loop never waits for a model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from dagan.animate import colorize_depth
from dagan.face import FaceTracker
from engine import Engine

from .metrics import Metrics
from .sessions import LiveSession, OutputFrame, SessionRegistry

log = logging.getLogger("dagan.server")


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


class InferenceWorker:
    """Runs the engine off the event loop. Start once, ``wake`` on every new frame, ``stop`` at shutdown."""

    def __init__(self, engine: Engine, registry: SessionRegistry, metrics: Metrics, output_size: int) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.output_size = output_size
        self._cond = threading.Condition()
        self._kick = False
        self._stop = False
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._trackers: dict[str, FaceTracker] = {}
        self._thread: threading.Thread | None = None
        self.rounds = 0

    # -- control (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dagan-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
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
        return len(self._trackers)

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
                self._round()
            except Exception:  # never let one bad round kill the service
                log.exception("inference round failed")
                self.metrics.add("errors")
        for tracker in self._trackers.values():
            tracker.close()
        self._trackers.clear()
        with self._cond:
            for _, future in self._jobs:
                future.cancel()
            self._jobs.clear()

    def _tracker(self, session_id: str) -> FaceTracker:
        tracker = self._trackers.get(session_id)
        if tracker is None:
            tracker = self._trackers[session_id] = FaceTracker(out_size=self.engine.image_size)
        return tracker

    def _round(self) -> None:
        live = self.registry.snapshot()
        live_ids = {s.id for s in live}
        for sid in [sid for sid in self._trackers if sid not in live_ids]:
            self._trackers.pop(sid).close()

        batch: list[
            tuple[LiveSession, Any, Any, Any, bool]
        ] = []  # session, input, engine session, track, face
        crops: list[np.ndarray] = []
        for session in live:
            # One read of each field the event loop may clear at any moment (a hang-up mid-round).
            engine_session, source_crop, output = session.engine_session, session.source_crop, session.output
            if session.closed or engine_session is None or source_crop is None or output is None:
                continue
            item = session.input.take()
            if item is None:
                continue
            try:
                rgb = item.frame.to_ndarray(format="rgb24")
                tracker = self._tracker(session.id)
                crop, box = tracker.update(rgb)
            except Exception:
                log.exception("session %s: could not read or crop a frame", session.id)
                self.metrics.add("errors")
                continue
            face = tracker.face_found
            session.face_missing = 0 if face else session.face_missing + 1
            if box is None:
                # No face seen yet on this camera: show the photo at rest instead of animating a random
                # crop, and keep the relative-motion reference for the first frame that has a face.
                self._send(session, output, item, source_crop, None, False, 0.0, 0)
                continue
            if session.recalibrate:
                session.recalibrate = False
                engine_session.reset_reference()
            batch.append((session, item, engine_session, output, face))
            crops.append(crop)
        if not batch:
            return

        want_depth = any(s.show_depth for s, *_ in batch)
        t0 = time.perf_counter()
        try:
            results = self.engine.animate_batch([b[2] for b in batch], crops, return_depth=want_depth)
        except Exception:
            log.exception("engine.animate_batch failed for %d session(s)", len(batch))
            self.metrics.add("errors", len(batch))
            return
        infer_s = time.perf_counter() - t0
        self.metrics.observe_batch(len(batch), infer_s)
        self.rounds += 1
        for (session, item, _, output, face), result in zip(batch, results, strict=True):
            self._send(session, output, item, result.image, result.driving_depth, face, infer_s, len(batch))

    def _send(
        self,
        session: LiveSession,
        output: Any,
        item: Any,
        image: np.ndarray,
        depth: np.ndarray | None,
        face: bool,
        infer_s: float,
        batch: int,
    ) -> None:
        import av

        show_depth = session.show_depth
        depth = depth if show_depth else None
        if show_depth and depth is None:
            depth = np.zeros(image.shape[:2], np.uint8)  # keep the frame size stable until depth exists
        try:
            frame = av.VideoFrame.from_ndarray(compose(image, depth, self.output_size), format="rgb24")
            frame = frame.reformat(format="yuv420p")  # the encoder's format, converted here, not on the loop
        except Exception:
            log.exception("session %s: could not compose an output frame", session.id)
            self.metrics.add("errors")
            return
        output.deliver(OutputFrame(frame, item.pts, item.arrived, face, infer_s, batch))
