"""The server's media pipeline pieces (server/pipeline.py) and the tracker's detection interval.

Fast and without mediapipe: a scripted detector stands in for BlazeFace, so each test checks one rule
exactly (how often detection runs, where the box goes in between, which frame wins a slot, what the
stage clock and /metrics report).
"""

from __future__ import annotations

import threading
import time

import av
import numpy as np
import pytest

from dagan.face import Detection, FaceTracker
from dagan.smoothing import OneEuroParams
from server.metrics import Metrics
from server.pipeline import (
    STAGES,
    Lane,
    MediaPool,
    Prepared,
    StageClock,
    TimedDetector,
    frame_to_rgb,
    prepare,
    rgb_to_video_frame,
)
from server.sessions import InputFrame


class ScriptedDetector:
    """A face of side 120 px moving ``speed`` px per frame to the right; counts its calls."""

    def __init__(self, speed: float = 4.0) -> None:
        self.speed, self.frame, self.calls = speed, 0, 0

    def detect(self, image: np.ndarray) -> list[Detection]:
        self.calls += 1
        x = 100 + self.speed * self.frame
        return [Detection((x, 150.0, x + 120.0, 270.0), 0.9)]

    def close(self) -> None:
        pass


def run_tracker(every: int, frames: int = 60, speed: float = 4.0):
    det = ScriptedDetector(speed)
    tracker = FaceTracker(out_size=64, detect_every=every, detector=det)
    image = np.zeros((480, 640, 3), np.uint8)
    boxes = []
    for i in range(frames):
        det.frame = i
        boxes.append(tracker.locate(image))
    return boxes, det.calls


def test_detection_runs_every_k_frames_and_prediction_keeps_up():
    ref, calls1 = run_tracker(1)
    boxes, calls4 = run_tracker(4)
    assert calls1 == 60 and calls4 == 15
    # Constant-velocity prediction: after the first two detections the box tracks the moving face as
    # per-frame detection does (a box frozen between detections would lag by up to 3 × 4 = 12 px).
    lag = [abs(b.cx - r.cx) for b, r in zip(boxes[12:], ref[12:], strict=True)]
    assert max(lag) < 2.0, max(lag)
    frozen = [abs((100 + 4 * (i - i % 4) + 60) - (100 + 4 * i + 60)) for i in range(12, 60)]
    assert np.mean(lag) < 0.25 * np.mean(frozen)


def test_prediction_with_the_servers_box_filter_and_frame_times():
    """The server's tracker: One-Euro box filter, frame capture times, detection every 3rd frame. Every
    frame gets a box that follows the moving face (the prediction between detections once shadowed the
    time argument with a box, so the filter raised on two frames of three and the server showed a third
    of them)."""
    det = ScriptedDetector(4.0)
    tracker = FaceTracker(out_size=64, detect_every=3, detector=det, box_filter=OneEuroParams(1.0, 30.0))
    image = np.zeros((480, 640, 3), np.uint8)
    boxes = []
    for i in range(30):
        det.frame = i
        boxes.append(tracker.locate(image, 100.0 + i / 25))
    assert det.calls == 10 and all(b is not None for b in boxes)
    centre = [100 + 4 * i + 60 for i in range(30)]
    assert max(abs(b.cx - c) for b, c in zip(boxes[10:], centre[10:], strict=True)) < 6.0


def test_a_still_face_gives_the_same_box_whatever_k():
    ref, _ = run_tracker(1, speed=0.0)
    boxes, calls = run_tracker(5, speed=0.0)
    assert calls == 12
    assert [b.to_dict() for b in boxes] == [b.to_dict() for b in ref]


def test_update_is_locate_then_crop():
    det = ScriptedDetector(0.0)
    tracker = FaceTracker(out_size=32, detector=det)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    crop, box = tracker.update(image)
    assert crop.shape == (32, 32, 3) and box is not None
    np.testing.assert_array_equal(crop, box.crop(image, 32))


def test_yuv_round_trip_through_opencv_matches_pyav():
    rgb = np.random.default_rng(1).integers(0, 255, (96, 128, 3), np.uint8)
    rgb = np.ascontiguousarray(np.repeat(np.repeat(rgb[::8, ::8], 8, 0), 8, 1))  # flat 8×8 blocks
    frame = rgb_to_video_frame(rgb)
    assert frame.format.name == "yuv420p" and (frame.width, frame.height) == (128, 96)
    ours = frame_to_rgb(frame).astype(int)
    theirs = frame.to_ndarray(format="rgb24").astype(int)
    assert np.abs(ours - rgb).mean() < 4 and np.abs(ours - theirs).mean() < 4
    odd = av.VideoFrame.from_ndarray(np.zeros((7, 9, 3), np.uint8), format="rgb24")
    assert frame_to_rgb(odd).shape == (7, 9, 3)  # not 4:2:0-able: PyAV's path


def test_prepare_times_each_stage_and_skips_the_crop_without_a_face():
    clock = StageClock()
    frame = rgb_to_video_frame(np.zeros((480, 640, 3), np.uint8))
    detector = TimedDetector(ScriptedDetector(0.0), clock)
    lane = Lane(FaceTracker(out_size=64, detect_every=2, detector=detector), detector)
    got = prepare(lane, InputFrame(frame, 0, time.monotonic()), 1, 64, clock)
    assert got.crop.shape == (64, 64, 3) and got.face
    snap = clock.snapshot()
    assert [snap[s].calls for s in ("convert", "detect", "crop")] == [1, 1, 1]
    assert set(got.stages) == {"convert", "detect", "crop"}
    again = prepare(lane, InputFrame(frame, 1, time.monotonic()), 2, 64, clock)  # tracked, not detected
    assert "detect" not in again.stages and clock.snapshot()["detect"].calls == 1
    assert clock.snapshot()["convert"].calls == 2

    class NoFace(ScriptedDetector):
        def detect(self, image):
            return []

    lane = Lane(FaceTracker(out_size=64, detector=NoFace()))
    got = prepare(lane, InputFrame(frame, 0, time.monotonic()), 1, 64, clock)
    assert got.crop is None and not got.face and clock.snapshot()["crop"].calls == 2


def test_lane_latest_wins_and_no_older_frame_after_a_newer_one():
    lane = Lane(tracker=None)
    assert not lane.put_ready(Prepared(None, None, True, 1))
    assert lane.put_ready(Prepared(None, None, True, 2))  # the unused first one was replaced
    assert lane.take_ready().seq == 2 and lane.take_ready() is None
    assert lane.claim_delivery(5) and not lane.claim_delivery(4) and not lane.claim_delivery(5)


def test_media_pool_runs_in_parallel_and_waits_for_idle():
    pool = MediaPool(2)
    started = threading.Barrier(2, timeout=5)
    try:
        futures = [pool.submit(started.wait) for _ in range(2)]  # deadlocks unless both run at once
        assert pool.wait_idle(5) and all(f.result() is not None for f in futures)
        assert pool.inflight == 0
    finally:
        pool.close()


def test_stage_series_and_autoscaler_gauges_on_metrics():
    clock = StageClock()
    clock.add("infer", 0.02, 0.01, calls=4)
    metrics = Metrics(backend="zero", image_size=64, device="cpu", untrained=False)
    metrics.stage_clock, metrics.replica, metrics.max_sessions = clock, "r7", 8
    metrics.active_sessions = lambda: 2
    for _ in range(10):
        metrics.observe_frame(0.04)
    text = metrics.render()
    assert 'dagan_replica_info{replica="r7"} 1' in text
    assert "dagan_free_sessions 6" in text
    assert 'dagan_stage_frames_total{stage="infer"} 4' in text
    assert 'dagan_stage_seconds_total{stage="infer",clock="wall"} 0.02' in text
    for stage in STAGES:
        assert f'dagan_stage_frames_total{{stage="{stage}"}}' in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["dagan_frame_seconds_recent"]) == pytest.approx(0.04)
    assert float(values["dagan_session_fps_recent"]) == pytest.approx(10 / 5 / 2)
    assert float(values["process_cpu_seconds_total"]) > 0
