"""The full picture, steady motion and neutral pose in the three applications (issue 19): `dagan
animate --output-size`, `dagan cam`'s local animator and flags, and `dagan serve`'s per-session picture."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import write_app_inputs

from commands.cli import main
from dagan.config import load_config
from dagan.media import VideoReader
from dagan.samples import astronaut, driving_frames, grace_hopper


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("paste-apps")
    return write_app_inputs(d, 4, {"ckpt": load_config("tiny")})


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv("DAGAN_CHECKPOINT", raising=False)


def _animate(inputs, out, *extra):
    argv = ["animate", "--source", str(inputs["source"]), "--driving", str(inputs["driving"])]
    return main([*argv, "--out", str(out), "--checkpoint", str(inputs["ckpt"]), "--quiet", *extra])


# ------------------------------------------------------------------------------------------- animate


def test_animate_writes_the_full_picture_at_the_output_size(inputs, tmp_path, capsys):
    out = tmp_path / "full.mp4"
    assert _animate(inputs, out, "--output-size", "320x180") == 0, capsys.readouterr().err
    with VideoReader(out) as r:
        frames = list(r)
    assert len(frames) == 4 and frames[0].shape == (180, 320, 3)
    # The photo's own size without --output-size (astronaut: 512×512), depth beside it at its height.
    out2 = tmp_path / "own.mp4"
    assert _animate(inputs, out2, "--full-picture", "--show-depth", "--max-frames", "2", "--no-smooth") == 0
    with VideoReader(out2) as r:
        frames = list(r)
    assert frames[0].shape == (512, 1024, 3)
    # The top-left corner is far outside the face: the photo itself (up to the video codec).
    corner = frames[0][:48, :48].astype(int) - astronaut()[:48, :48].astype(int)
    assert np.abs(corner).mean() < 6


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--output-size", "13x7"], "output size"),
        (["--full-picture", "--no-crop"], "--no-crop"),
        (["--smooth-min-cutoff", "0"], "min_cutoff"),
        (["--auto-neutral", "-1"], "--auto-neutral"),
    ],
)
def test_animate_refuses_bad_picture_options_in_one_line(inputs, tmp_path, capsys, extra, words):
    code = _animate(inputs, tmp_path / "never.mp4", *extra)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dagan: error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0], err


def test_animate_auto_neutral_runs(inputs, tmp_path, capsys):
    out = tmp_path / "auto.mp4"
    assert _animate(inputs, out, "--auto-neutral", "--max-frames", "3") == 0, capsys.readouterr().err
    assert out.is_file()


# ----------------------------------------------------------------------------------------------- cam


def test_local_animator_sends_the_full_picture(engine):
    from vcam.io import IterableSource, MemorySink
    from vcam.pipeline import CamRunner, LocalAnimator

    photo = astronaut()
    frames = driving_frames(grace_hopper(), num_frames=4, size=160)
    animator = LocalAnimator(engine, photo, relative=True, full_picture=True, output_size=(320, 180))
    assert animator.session.kp_filter is not None  # steady motion is on by default
    sink = MemorySink(320, 180)
    stats = CamRunner(IterableSource(frames), sink, animator).run()
    assert stats.frames_out == len(sink.frames) >= 1
    plan = animator.paster.plan
    x0, y0, x1, y1 = plan.roi
    outside = np.ones((180, 320), bool)
    outside[y0:y1, x0:x1] = plan.mask <= 0
    for frame in sink.frames:  # a 16:9 picture of the photo, no bars; the photo wherever the mask is 0
        assert frame.shape == (180, 320, 3) and frame[:, :20].mean() > 20
        assert np.array_equal(frame[outside], plan.background[outside])


def test_cam_opens_the_virtual_camera_at_the_output_size(monkeypatch, tmp_path):
    import vcam.io
    from vcam.cli import add_commands, run_cam

    opened = {}

    class Stop(Exception):
        pass

    def fake_sink(width, height, fps, **kw):
        opened.update(width=width, height=height)
        raise Stop

    monkeypatch.setattr(vcam.io, "VirtualCameraSink", fake_sink)
    src = tmp_path / "src.png"
    cv2.imwrite(str(src), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    for argv, want in (([], (1280, 720)), (["--output-size", "640x360"], (640, 360))):
        with pytest.raises(Stop):
            run_cam(parser.parse_args(["cam", "--source", str(src), *argv]))
        assert (opened["width"], opened["height"]) == want
    args = parser.parse_args(["cam", "--source", str(src)])
    assert args.picture == "full" and args.smooth_beta > 0 and not args.no_smooth


# --------------------------------------------------------------------------------------------- serve


@pytest.fixture
def client(engine):
    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        max_sessions=2,
        max_sessions_per_client=2,
        sessions_per_minute=1e6,
        ice_host_addresses=("127.0.0.1",),
        picture_size=(320, 180),
    )
    with TestClient(create_app(settings, engine), base_url="http://127.0.0.1:8000") as c:
        yield c


def test_a_session_chooses_its_picture_and_gets_the_photo_pasted_back(client, astronaut_jpeg):
    from server.worker import compose_picture

    config = client.get("/api/config").json()
    assert config["picture"] == "crop" and config["picture_size"] == [320, 180]
    assert client.post("/api/sessions", json={"picture": "wide"}).status_code == 400
    r = client.post("/api/sessions", json={"picture": "full", "auto_neutral": True})
    assert r.status_code == 201 and r.json()["picture"] == "full"
    sid = r.json()["id"]
    up = client.put(f"/api/sessions/{sid}/source", files={"file": ("p.jpg", astronaut_jpeg, "image/jpeg")})
    assert up.status_code == 200, up.text
    service = client.app.state.service
    session = service.registry.get(sid)
    assert session.engine_session.kp_filter is not None  # the server's default smoothing
    assert session.engine_session.auto_neutral is not None  # asked for at creation
    picture = session.paster(session.source_crop)
    assert picture.shape == (180, 320, 3)
    depth = np.zeros((64, 64), np.uint8)
    assert compose_picture(picture, depth).shape == (180, 500, 3)  # the depth beside it, at its height
    # switched mid-call on the data channel; a bad value is refused and changes nothing
    service.handle_message(session, json.dumps({"type": "picture", "value": "crop"}))
    assert session.picture == "crop"
    service.handle_message(session, json.dumps({"type": "picture", "value": "huge"}))
    assert session.picture == "crop"
    # a session that asks nothing gets the server's defaults
    other = client.post("/api/sessions").json()
    assert other["picture"] == "crop" and service.registry.get(other["id"]).auto_neutral == 0


def test_a_full_picture_call_sends_the_photo_with_the_face_pasted_in(engine, astronaut_jpeg):
    """End to end over WebRTC (loopback): a full-picture session's frames have the picture size, and
    outside the mask they are the framed photo (up to the video codec), also after a switch mid-call."""
    import asyncio

    from test_server_webrtc import (
        DrivingTrack,
        connect,
        hang_up,
        loopback_settings,
        running_server,
        wait_until,
    )

    frames = driving_frames(grace_hopper(), num_frames=20, size=160)

    async def scenario():
        settings = loopback_settings(output_size=128, picture_size=(320, 180))
        async with running_server(settings, engine) as (service, client):
            peer = await connect(client, astronaut_jpeg, DrivingTrack(frames, lambda i: i), picture="full")
            await wait_until(lambda: sum(f.shape == (180, 320, 3) for _, _, f in peer.received) >= 5, 30)
            plan = service.registry.get(peer.session_id).paster.plan
            peer.channel.send(json.dumps({"type": "picture", "value": "crop"}))
            await wait_until(lambda: peer.received[-1][2].shape == (128, 128, 3), 15)
            await hang_up(peer)
            return peer, plan

    peer, plan = asyncio.run(scenario())
    full = [f for _, _, f in peer.received if f.shape == (180, 320, 3)]
    assert len(full) >= 5 and peer.received[-1][2].shape == (128, 128, 3)
    x0, y0, x1, y1 = plan.roi
    outside = np.ones((180, 320), bool)
    outside[y0:y1, x0:x1] = plan.mask <= 0
    diff = np.abs(full[-1].astype(int) - plan.background.astype(int))[outside]
    assert diff.mean() < 6  # VP8 at a low bitrate: close, not exact
