"""Prometheus text exposition (format 0.0.4) for the service, without a client library.

The handful of series the service exports are updated from the event loop and the inference worker, so
every update takes one lock; rendering copies under the same lock.
"""

from __future__ import annotations

import resource
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

#: The window of the "recent" gauges an autoscaler reads (frame time, per-session fps).
RECENT_S = 5.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Per-frame server latency on CPU is tens of milliseconds for the tiny preset and a few hundred
# for the reference size, so the buckets span 5 ms to 2.5 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    """Cumulative-bucket histogram; ``observe`` is O(log buckets)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf overflow
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{_fmt(bound)}"}} {running}')
        out.append(f"{name}_sum {_fmt(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """The service's counters. ``active_sessions`` is read live from a callback at render time."""

    def __init__(self, backend: str, image_size: int, device: str, untrained: bool) -> None:
        self._lock = threading.Lock()
        self.info = {
            "backend": backend,
            "image_size": str(image_size),
            "device": device,
            "untrained": str(untrained).lower(),
        }
        self.active_sessions: Callable[[], int] = lambda: 0
        self.max_sessions = 0
        self.sessions_created = 0
        self.sessions_rejected = 0  # 503: the server was full (the rate limits count in sessions_limited)
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = {"input": 0, "output": 0}
        self.errors = 0
        # Refusals and drops of what hostile or broken clients send (docs/security.md), by reason.
        self.sessions_limited = {"rate": 0, "per_client": 0}
        self.uploads_refused = {"busy": 0, "per_client": 0, "too_slow": 0}
        self.bad_frames = {"too_small": 0, "too_large": 0, "unusable": 0}
        self.messages_dropped = 0
        self.frame_latency = Histogram(LATENCY_BUCKETS)
        self.inference = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        # For an autoscaler and the server benchmark (docs/deployment-scale.md).
        self.replica = "?"
        self.stage_clock: Any = None  # server.pipeline.StageClock, set by the worker
        self.worker_busy: Callable[[], float] = lambda: 0.0  # engine seconds so far
        self._recent: deque[tuple[float, float]] = deque(maxlen=20_000)  # (sent time, server seconds)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def count(self, name: str, label: str) -> None:
        """One more in the labelled counter ``name`` (a dict attribute) under ``label``."""
        with self._lock:
            table = getattr(self, name)
            table[label] = table.get(label, 0) + 1

    def drop(self, stage: str) -> None:
        with self._lock:
            self.dropped[stage] += 1

    def observe_batch(self, size: int, infer_s: float) -> None:
        with self._lock:
            self.batch.observe(size)
            self.inference.observe(infer_s)

    def observe_frame(self, latency_s: float) -> None:
        with self._lock:
            self.frames_out += 1
            self.frame_latency.observe(latency_s)
            self._recent.append((time.monotonic(), latency_s))

    def recent(self) -> tuple[float, float]:
        """(mean server seconds per frame, avatar fps per active session) over the last ``RECENT_S``."""
        cutoff = time.monotonic() - RECENT_S
        with self._lock:
            window = [lat for t, lat in self._recent if t >= cutoff]
        active = max(1, self.active_sessions())
        mean = sum(window) / len(window) if window else 0.0
        return mean, len(window) / RECENT_S / active

    def _scaling_lines(self) -> list[str]:
        """Series an autoscaler needs (capacity, load, frame time) and the per-stage CPU accounting."""
        frame_s, fps = self.recent()
        active = self.active_sessions()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        lines = [
            "# HELP dagan_replica_info This server process's replica id (value is always 1).",
            "# TYPE dagan_replica_info gauge",
            f'dagan_replica_info{{replica="{_escape(self.replica)}"}} 1',
            "# HELP dagan_free_sessions Session slots still free (max_sessions - active_sessions).",
            "# TYPE dagan_free_sessions gauge",
            f"dagan_free_sessions {max(0, self.max_sessions - active)}",
            "# HELP dagan_frame_seconds_recent Mean server time per avatar frame over the last 5 s.",
            "# TYPE dagan_frame_seconds_recent gauge",
            f"dagan_frame_seconds_recent {_fmt(round(frame_s, 6))}",
            "# HELP dagan_session_fps_recent Avatar frames per second per active session, last 5 s.",
            "# TYPE dagan_session_fps_recent gauge",
            f"dagan_session_fps_recent {_fmt(round(fps, 3))}",
            "# HELP dagan_engine_busy_seconds_total Seconds spent in engine calls (rate = utilisation).",
            "# TYPE dagan_engine_busy_seconds_total counter",
            f"dagan_engine_busy_seconds_total {_fmt(round(self.worker_busy(), 6))}",
            "# HELP process_cpu_seconds_total User and system CPU time of this process.",
            "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {_fmt(round(usage.ru_utime + usage.ru_stime, 6))}",
        ]
        if self.stage_clock is not None:
            totals = self.stage_clock.snapshot()
            lines += [
                "# HELP dagan_stage_seconds_total Time spent per pipeline stage (clock=wall|cpu; cpu is "
                "the working thread's CPU time; infer is split evenly over a batch's frames).",
                "# TYPE dagan_stage_seconds_total counter",
            ]
            for stage, t in totals.items():
                lines.append(
                    f'dagan_stage_seconds_total{{stage="{stage}",clock="wall"}} {_fmt(round(t.wall_s, 6))}'
                )
                lines.append(
                    f'dagan_stage_seconds_total{{stage="{stage}",clock="cpu"}} {_fmt(round(t.cpu_s, 6))}'
                )
            lines += [
                "# HELP dagan_stage_frames_total Stream-frames (calls) per pipeline stage.",
                "# TYPE dagan_stage_frames_total counter",
                *(f'dagan_stage_frames_total{{stage="{stage}"}} {t.calls}' for stage, t in totals.items()),
            ]
        return lines

    def render(self) -> str:
        with self._lock:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in self.info.items())
            lines = [
                "# HELP dagan_engine_info The inference engine this server runs (value is always 1).",
                "# TYPE dagan_engine_info gauge",
                f"dagan_engine_info{{{labels}}} 1",
                "# HELP dagan_active_sessions Sessions currently registered (connected or waiting).",
                "# TYPE dagan_active_sessions gauge",
                f"dagan_active_sessions {self.active_sessions()}",
                "# HELP dagan_max_sessions Configured session cap; one more is answered 503.",
                "# TYPE dagan_max_sessions gauge",
                f"dagan_max_sessions {self.max_sessions}",
                "# HELP dagan_sessions_created_total Sessions created since start.",
                "# TYPE dagan_sessions_created_total counter",
                f"dagan_sessions_created_total {self.sessions_created}",
                "# HELP dagan_sessions_rejected_total Session requests refused with 503 because every "
                "slot was taken (429s are in dagan_sessions_limited_total).",
                "# TYPE dagan_sessions_rejected_total counter",
                f"dagan_sessions_rejected_total {self.sessions_rejected}",
                "# HELP dagan_sessions_limited_total Session requests refused with 429: reason=rate (the "
                "per-address rate limit), per_client (the address already holds its share of slots).",
                "# TYPE dagan_sessions_limited_total counter",
                *(
                    f'dagan_sessions_limited_total{{reason="{k}"}} {v}'
                    for k, v in self.sessions_limited.items()
                ),
                "# HELP dagan_uploads_refused_total Photo uploads refused: reason=busy (503, every upload "
                "slot taken), per_client (429, the address holds its share), too_slow (408, the body "
                "arrived below the minimum rate).",
                "# TYPE dagan_uploads_refused_total counter",
                *(
                    f'dagan_uploads_refused_total{{reason="{k}"}} {v}'
                    for k, v in self.uploads_refused.items()
                ),
                "# HELP dagan_bad_frames_total Camera frames that could not be cropped, by reason "
                "(too_small, too_large, unusable); the session keeps its last picture.",
                "# TYPE dagan_bad_frames_total counter",
                *(f'dagan_bad_frames_total{{reason="{k}"}} {v}' for k, v in self.bad_frames.items()),
                "# HELP dagan_messages_dropped_total Data-channel messages dropped by the per-session "
                "rate limit.",
                "# TYPE dagan_messages_dropped_total counter",
                f"dagan_messages_dropped_total {self.messages_dropped}",
                "# HELP dagan_frames_in_total Webcam frames received from peers.",
                "# TYPE dagan_frames_in_total counter",
                f"dagan_frames_in_total {self.frames_in}",
                "# HELP dagan_frames_out_total Avatar frames handed to peers' outgoing tracks.",
                "# TYPE dagan_frames_out_total counter",
                f"dagan_frames_out_total {self.frames_out}",
                "# HELP dagan_frames_dropped_total Frames replaced by a newer one before being used "
                "(latest-frame-wins); stage=input: before inference, stage=output: before encoding.",
                "# TYPE dagan_frames_dropped_total counter",
                *(f'dagan_frames_dropped_total{{stage="{k}"}} {v}' for k, v in self.dropped.items()),
                "# HELP dagan_worker_errors_total Frames or batches that failed in the inference worker.",
                "# TYPE dagan_worker_errors_total counter",
                f"dagan_worker_errors_total {self.errors}",
                "# HELP dagan_frame_latency_seconds Server time per frame: webcam frame decoded to avatar "
                "frame ready for encoding (queueing, face crop, inference, composition).",
                "# TYPE dagan_frame_latency_seconds histogram",
                *self.frame_latency.lines("dagan_frame_latency_seconds"),
                "# HELP dagan_inference_seconds Duration of one batched engine call.",
                "# TYPE dagan_inference_seconds histogram",
                *self.inference.lines("dagan_inference_seconds"),
                "# HELP dagan_batch_size Sessions animated together in one engine call.",
                "# TYPE dagan_batch_size histogram",
                *self.batch.lines("dagan_batch_size"),
            ]
        lines += self._scaling_lines()  # outside the lock: it reads the registry and the stage clock
        return "\n".join(lines) + "\n"
