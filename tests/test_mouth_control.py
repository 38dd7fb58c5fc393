"""The mouth gain as a person's control: ``--mouth-gain`` in ``dagan animate`` and ``dagan cam`` (local
and remote), the server's session option and ``mouth_gain`` data-channel message, ``/api/config``'s
default for the page's slider, and the one check all of them go through
(:func:`engine.base.check_mouth_gain`): a number in (0, 4], only for a model that names its lips."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from helpers import lip_config, make_model, write_app_inputs

from commands.cli import main
from dagan.config import MAX_MOUTH_GAIN, load_config
from dagan.samples import astronaut, driving_frames, grace_hopper
from engine.base import EngineError, check_mouth_gain
from engine.torch_backend import TorchEngine


@pytest.fixture(scope="module")
def lip_engine():
    return TorchEngine(make_model(lip_config()), device="cpu")


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv("DAGAN_CHECKPOINT", raising=False)


# ------------------------------------------------------------------------------------------- engine


def test_check_mouth_gain_takes_a_number_in_range_for_a_model_with_lips(engine, lip_engine):
    assert lip_engine.mouth_keypoints == (7, 8) and lip_engine.mouth_open_gain == 2.5
    lips = bool(lip_engine.mouth_keypoints)
    assert check_mouth_gain(None, lips) is None  # the model's own
    assert check_mouth_gain(1, lips) == 1.0 and check_mouth_gain(MAX_MOUTH_GAIN, lips) == 4.0
    for bad in (0, -1.0, MAX_MOUTH_GAIN + 0.1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(EngineError, match="mouth gain must be a number"):
            check_mouth_gain(bad, lips)
    assert engine.mouth_keypoints == ()  # the tiny preset names no lips: nothing to set, said so
    with pytest.raises(EngineError, match="names no lip keypoints"):
        check_mouth_gain(2.0, bool(engine.mouth_keypoints))
    assert check_mouth_gain(None, bool(engine.mouth_keypoints)) is None


def test_a_session_gain_on_a_model_without_lips_is_refused_not_ignored(engine):
    s = engine.new_session(astronaut()[::4, ::4].copy(), relative=True)
    s.mouth_gain = 2.0
    with pytest.raises(EngineError, match="names no lip keypoints"):
        engine.animate_batch([s], [grace_hopper()[::4, ::4].copy()])
    s.mouth_gain = None
    assert engine.animate_batch([s], [grace_hopper()[::4, ::4].copy()])[0].image.shape[2] == 3


# ----------------------------------------------------------------------------------- animate and cam


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mouth-control")
    return write_app_inputs(d, 3, {"plain": load_config("tiny"), "lips": lip_config()})


def _animate(inputs, ckpt: str, out, *extra) -> int:
    argv = ["animate", "--source", str(inputs["source"]), "--driving", str(inputs["driving"])]
    return main([*argv, "--out", str(out), "--checkpoint", str(inputs[ckpt]), "--quiet", *extra])


def test_animate_runs_each_frame_with_the_asked_gain(inputs, tmp_path, monkeypatch, capsys):
    import engine.hot_path as hp

    seen: list[float | None] = []
    real = hp.motion_inputs

    def spy(sessions, *args, **kwargs):
        seen.extend(s.mouth_gain for s in sessions)
        return real(sessions, *args, **kwargs)

    monkeypatch.setattr(hp, "motion_inputs", spy)
    assert _animate(inputs, "lips", tmp_path / "a.mp4", "--mouth-gain", "1.5", "--backend", "torch") == 0, (
        capsys.readouterr().err
    )
    assert seen and set(seen) == {1.5}


@pytest.mark.parametrize(
    "ckpt, gain, words",
    [("lips", "0", "--mouth-gain must be in (0, 4]"), ("lips", "4.5", "--mouth-gain"), ("plain", "2", "lip")],
)
def test_animate_refuses_a_gain_it_cannot_use_in_one_line(inputs, tmp_path, capsys, ckpt, gain, words):
    code = _animate(inputs, ckpt, tmp_path / "never.mp4", "--mouth-gain", gain, "--backend", "torch")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dagan: error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0], err


def test_cam_hands_the_gain_to_the_local_engine_or_the_server(lip_engine, engine):
    from vcam.pipeline import LocalAnimator
    from vcam.remote import RemoteAnimator

    assert LocalAnimator(lip_engine, astronaut(), mouth_gain=3.0).session.mouth_gain == 3.0
    assert LocalAnimator(lip_engine, astronaut()).session.mouth_gain is None  # the model's own
    with pytest.raises(EngineError, match="names no lip keypoints"):
        LocalAnimator(engine, astronaut(), mouth_gain=3.0)
    for gain, options in ((1.5, {"relative": True, "mouth_gain": 1.5}), (None, {"relative": True})):
        remote = RemoteAnimator("http://127.0.0.1:9", astronaut(), mouth_gain=gain, reconnect_delay=0.05)
        try:  # what the server is asked for when the session is created (nothing it need not know)
            assert remote.session_options == options
        finally:
            remote.close()


def test_cam_keys_step_the_local_gain_within_bounds(lip_engine, engine):
    """+ / = and - in the preview window or the terminal move the gain by 0.25 from the model's own, never
    past (0.25, 4]; the runner applies them between frames; a model without lips keeps nothing."""
    from vcam.io import IterableSource, MemorySink
    from vcam.pipeline import MOUTH_STEP, CamRunner, Controls, LocalAnimator

    controls = Controls()
    for key in ("+", "=\n", "-", "+"):
        controls.handle_key(key)
    assert controls.take_mouth_steps() == 2 and controls.take_mouth_steps() == 0
    animator = LocalAnimator(lip_engine, astronaut())
    assert animator.step_mouth_gain(2) == 2.5 + 2 * MOUTH_STEP  # from the model's 2.5
    assert animator.step_mouth_gain(100) == MAX_MOUTH_GAIN and animator.step_mouth_gain(-100) == MOUTH_STEP
    controls.handle_key("+")
    frames = driving_frames(grace_hopper(), num_frames=2, size=160)
    CamRunner(IterableSource(frames), MemorySink(128, 128), animator, controls).run(max_frames=2)
    assert animator.session.mouth_gain == MOUTH_STEP * 2  # one press, applied by the loop
    plain = LocalAnimator(engine, astronaut())
    assert plain.step_mouth_gain(1) is None and plain.session.mouth_gain is None


# -------------------------------------------------------------------------------------------- serve


def _client(engine) -> TestClient:
    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        max_sessions=4, max_sessions_per_client=4, sessions_per_minute=1e6, ice_host_addresses=("127.0.0.1",)
    )
    return TestClient(create_app(settings, engine), base_url="http://127.0.0.1:8000")


def test_server_session_option_message_and_config(lip_engine, monkeypatch):
    import server.service as svc

    with _client(lip_engine) as client:
        assert client.get("/api/config").json()["mouth_gain"] == 2.5  # the slider's start
        r = client.post("/api/sessions", json={"mouth_gain": 1.5})
        assert r.status_code == 201 and r.json()["mouth_gain"] == 1.5, r.text
        for bad in (0, 4.5, "loud"):
            r = client.post("/api/sessions", json={"mouth_gain": bad})
            assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text
        service = client.app.state.service
        session = service.registry.get(client.post("/api/sessions").json()["id"])
        assert session.mouth_gain is None and session.info()["mouth_gain"] is None
        replies: list[dict] = []
        monkeypatch.setattr(svc, "send_json", lambda channel, message: replies.append(message))
        service.handle_message(session, json.dumps({"type": "mouth_gain", "value": 3.0}))
        assert session.mouth_gain == 3.0 and not replies
        for bad in (9, "loud", 0, True):
            service.handle_message(session, json.dumps({"type": "mouth_gain", "value": bad}))
            assert session.mouth_gain == 3.0  # a refused value changes nothing
        assert len(replies) == 4 and all(r["error"] == "bad_mouth_gain" for r in replies), replies
        assert "loud" not in replies[1]["message"]  # a reply never repeats what was sent (docs/security.md)
        service.handle_message(session, json.dumps({"type": "mouth_gain", "value": None}))
        assert session.mouth_gain is None  # back to the model's own


def test_server_refuses_a_gain_for_a_model_without_lips(engine):
    with _client(engine) as client:
        assert client.get("/api/config").json()["mouth_gain"] is None  # the page hides its slider
        r = client.post("/api/sessions", json={"mouth_gain": 2.0})
        assert r.status_code == 422 and r.json()["error"] == "bad_mouth_gain", r.text
        assert "lip keypoints" in r.json()["message"]


def test_the_worker_renders_with_the_session_gain(lip_engine, astronaut_jpeg):
    """Over a loopback call: the engine session takes the gain asked for at creation, and the one sent
    mid-call on the data channel, before the frames it renders."""
    import asyncio

    import test_server_webrtc as rtc

    frames = driving_frames(grace_hopper(), num_frames=20, size=160)

    async def scenario():
        async with rtc.running_server(rtc.loopback_settings(output_size=64), lip_engine) as (service, client):
            track = rtc.DrivingTrack(frames, lambda i: i)
            peer = await rtc.connect(client, astronaut_jpeg, track, mouth_gain=3.5)
            session = service.registry.get(peer.session_id)
            await rtc.wait_until(lambda: len(peer.received) >= 3, 30)
            first = session.engine_session.mouth_gain
            peer.channel.send(json.dumps({"type": "mouth_gain", "value": 1.25}))
            await rtc.wait_until(lambda: session.engine_session.mouth_gain == 1.25, 15)
            await rtc.hang_up(peer)
            return first

    assert asyncio.run(scenario()) == 3.5
