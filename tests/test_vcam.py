"""`dagan cam` pipeline with a real in-memory camera and sink, the pyvirtualcam sink through a registered
backend, latest-frame-wins under a slow animator, controls, and the missing-device message."""

from __future__ import annotations

import glob
import platform
import time
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
import pyvirtualcam

from commands.cli import main
from dagan.latest import LatestSlot
from dagan.media import fit_frame
from dagan.samples import astronaut, driving_frames, grace_hopper
from vcam.io import IterableSource, MemorySink, VirtualCameraMissing, VirtualCameraSink
from vcam.pipeline import CamRunner, Controls, LocalAnimator


class PacedSource(IterableSource):
    """Delivers frames no faster than ``fps``, like a webcam."""

    def read(self):
        time.sleep(1.0 / self.fps)
        return super().read()


class FakeBackend:
    """A pyvirtualcam backend that records frames (pyvirtualcam's own extension point)."""

    instances: typing.ClassVar[list] = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.frames = width, height, []
        FakeBackend.instances.append(self)

    def close(self):
        pass

    def send(self, frame):
        self.frames.append(frame.copy())

    def device(self):
        return "fake-cam"

    def native_fourcc(self):
        return None


@pytest.fixture(scope="module")
def photo():
    return astronaut()


def test_local_pipeline_animates_into_sink(engine, photo):
    frames = driving_frames(grace_hopper(), num_frames=8, size=160)
    sink = MemorySink(320, 180)
    animator = LocalAnimator(engine, photo, relative=True)
    animator.process(frames[0])  # warm up mediapipe and torch so the timed run is steady
    animator.recalibrate()
    runner = CamRunner(PacedSource(frames, fps=20), sink, animator)
    stats = runner.run()
    assert stats.frames_out == len(sink.frames) >= 3
    assert stats.frames_in == 8
    out = sink.frames[0]
    assert out.shape == (180, 320, 3)
    # the square avatar is centred in the 16:9 frame with black bars at the sides
    assert out[:, :60].max() == 0 and out[:, -60:].max() == 0 and out[:, 80:240].mean() > 20
    # what was sent is the engine's avatar of the tracked crop, not the camera frame
    camera_fit = fit_frame(frames[0], 320, 180)
    assert np.abs(out.astype(int) - camera_fit.astype(int)).mean() > 10


def test_pause_passes_camera_through_and_recalibrate_resets(engine, photo):
    frame = driving_frames(grace_hopper(), num_frames=1, size=160)[0]
    sink = MemorySink(320, 180)
    animator = LocalAnimator(engine, photo, relative=True)
    controls = Controls()
    runner = CamRunner(IterableSource([]), sink, animator, controls=controls)
    avatar = runner.step(frame)
    reference = engine.session.reference
    assert reference is not None
    controls.handle_key("p")
    assert np.array_equal(runner.step(frame), fit_frame(frame, 320, 180))
    controls.handle_key("p")
    controls.handle_key("r")
    again = runner.step(frame)
    assert engine.session.reference is not reference  # a new reference was taken after recalibration
    assert np.abs(again.astype(int) - avatar.astype(int)).max() <= 1  # same frame, same pose: same avatar
    controls.handle_key("q")
    assert controls.quit.is_set()


class SlowEcho:
    """An animator slower than the camera that returns the frame it processed."""

    def __init__(self, delay: float) -> None:
        self.delay, self.seen = delay, []

    def process(self, frame):
        self.seen.append(int(frame[0, 0, 0]))
        time.sleep(self.delay)
        return frame

    def recalibrate(self):
        pass

    def close(self):
        pass


def test_latest_frame_wins_when_animation_is_slow():
    frames = [np.full((36, 64, 3), i, np.uint8) for i in range(60)]
    animator = SlowEcho(delay=0.04)
    sink = MemorySink(64, 36)
    stats = CamRunner(PacedSource(frames, fps=200), sink, animator).run()
    assert stats.frames_in == 60
    assert stats.dropped > 20 and stats.frames_out < 40
    assert stats.frames_out + stats.dropped <= 60
    # always the newest frame: ids strictly increase and the gaps are the dropped frames
    assert all(b > a for a, b in zip(animator.seen, animator.seen[1:], strict=False))
    assert animator.seen[-1] >= 55


def test_latest_slot():
    slot = LatestSlot()
    assert slot.get(timeout=0.01) is None
    assert slot.put(1) is False
    assert slot.put(2) is True  # overwrote an unread item
    assert slot.pending
    assert slot.get(timeout=0.01) == 2 and slot.dropped == 1 and not slot.pending
    slot.put(3)
    assert slot.take() == 3 and slot.take() is None
    assert slot.get(timeout=0.01) is None
    slot.close()
    assert slot.get(timeout=1.0) is None


def test_pyvirtualcam_sink_through_registered_backend(monkeypatch):
    # registered the documented way, and removed again so other tests see only the real backends
    monkeypatch.setattr(pyvirtualcam.camera, "BACKENDS", dict(pyvirtualcam.camera.BACKENDS))
    pyvirtualcam.register_backend("dagan-test", FakeBackend)
    sink = VirtualCameraSink(64, 36, 30, backend="dagan-test")
    frame = np.random.default_rng(0).integers(0, 256, (36, 64, 3), dtype=np.uint8)
    sink.send(frame)
    sink.close()
    backend = FakeBackend.instances[-1]
    assert sink.device == "fake-cam"
    assert len(backend.frames) == 1 and np.array_equal(backend.frames[0].reshape(36, 64, 3), frame)


@pytest.mark.skipif(platform.system() != "Linux", reason="checks the Linux v4l2loopback message")
def test_missing_virtual_camera_is_one_line(tmp_path, capsys):
    names = [Path(p) for p in glob.glob("/sys/class/video4linux/*/name")]
    if any("loopback" in p.read_text().lower() for p in names):
        pytest.skip("a v4l2loopback device exists on this machine")
    with pytest.raises(VirtualCameraMissing, match="v4l2loopback"):
        VirtualCameraSink(64, 36, 30)
    src = tmp_path / "src.png"
    cv2.imwrite(str(src), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    code = main(["cam", "--source", str(src), "--checkpoint", str(tmp_path / "unused.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no virtual camera device found" in err and "modprobe v4l2loopback" in err


def test_cam_token_flag_reaches_the_remote_client(tmp_path, monkeypatch):
    """`dagan cam --server URL --token T` hands T to the remote client (which sends it as a Bearer)."""
    import argparse

    import vcam.remote
    from vcam.cli import add_commands, run_cam

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_remote(server, photo, **kwargs):
        seen.update(server=server, **kwargs)
        raise Stop

    monkeypatch.setattr(vcam.remote, "RemoteAnimator", fake_remote)
    src = tmp_path / "src.png"
    cv2.imwrite(str(src), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["cam", "--source", str(src), "--server", "http://127.0.0.1:1", "--token", "s3cret"]
    )
    with pytest.raises(Stop):
        run_cam(args, source=object(), sink=object())
    assert seen["server"] == "http://127.0.0.1:1" and seen["token"] == "s3cret"


def test_cam_engine_options_are_the_servers_rows(tmp_path, monkeypatch):
    """`dagan cam` runs its local engine from the rows `dagan serve` reads (dagan.options.ENGINE_OPTIONS):
    the same flags and the same DAGAN_* variables, flags winning."""
    import argparse

    import dagan.checkpoint
    import engine.select
    from dagan.options import ENGINE_OPTIONS
    from vcam.cli import add_commands, run_cam

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_engine(checkpoint, backend, device, precision, threads=None, parallel=None):
        seen.update(checkpoint=str(checkpoint), backend=backend, device=device, precision=precision)
        seen["threads"], seen["parallel"] = threads, parallel
        raise Stop

    monkeypatch.setattr(engine.select, "default_engine", fake_engine)
    monkeypatch.setattr(dagan.checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "bundled.safetensors")
    for opt in ENGINE_OPTIONS:
        for name in opt.envs:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGAN_BACKEND", "onnxruntime")
    monkeypatch.setenv("DAGAN_INFER_THREADS", "2")
    monkeypatch.setenv("DAGAN_INFER_PARALLEL", "3")
    monkeypatch.setenv("DAGAN_CHECKPOINT", str(tmp_path / "env.safetensors"))
    src = tmp_path / "src.png"
    cv2.imwrite(str(src), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    cam = parser._subparsers._group_actions[0].choices["cam"]
    flags = {s for action in cam._actions for s in action.option_strings}
    assert {
        "--backend",
        "--checkpoint",
        "--device",
        "--precision",
        "--infer-threads",
        "--infer-parallel",
    } <= flags
    with pytest.raises(Stop):
        run_cam(
            parser.parse_args(["cam", "--source", str(src), "--device", "cpu"]),
            source=object(),
            sink=object(),
        )
    assert seen == {
        "checkpoint": str(tmp_path / "env.safetensors"),
        "backend": "onnxruntime",
        "device": "cpu",
        "precision": None,
        "threads": 2,
        "parallel": 3,
    }
