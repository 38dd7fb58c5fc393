"""Remote mode of `dagan cam` against the real in-process server (uvicorn on loopback): avatars come back
through WebRTC, the client reconnects when the server restarts, and the session is freed on close. The
server requires an access token, which the client sends; its ICE servers are the server's, never a
public default; and its reconnect back-off starts again after a session that worked."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn

from dagan.samples import astronaut, driving_frames, grace_hopper
from server.app import create_app
from server.client import rtc_configuration, split_token
from server.settings import ServerSettings
from vcam.io import MemorySink
from vcam.pipeline import CamRunner
from vcam.remote import RemoteAnimator, RemoteError

TOKEN = "test-token-0123456789"


class ServerThread:
    """uvicorn in a thread with its own event loop, as a separate host would be."""

    def __init__(self, engine, port: int) -> None:
        settings = ServerSettings(ice_host_addresses=("127.0.0.1",), output_size=128, access_token=TOKEN)
        self.app = create_app(settings, engine)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def live_sessions(self) -> int:
        return len(self.app.state.service.registry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(animator: RemoteAnimator, frames, until, timeout: float) -> None:
    """Feed camera frames at ~20 fps until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    i = 0
    while not until():
        assert time.monotonic() < deadline, f"timed out; last error: {animator.last_error}"
        animator.process(frames[i % len(frames)])
        i += 1
        time.sleep(0.05)


@pytest.fixture(scope="module")
def frames():
    return driving_frames(grace_hopper(), num_frames=24, size=240)


def test_remote_avatar_reconnect_and_cleanup(engine, frames):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with ServerThread(engine, port) as server:
        animator = RemoteAnimator(
            url + f"/#token={TOKEN}", astronaut(), reconnect_delay=0.2, max_reconnect_delay=0.5
        )
        assert (animator.server, animator.token) == (url, TOKEN)
        try:
            _pump(animator, frames, lambda: animator.avatars_received >= 5, timeout=60)
            # The server's ICE list (none: loopback), not aiortc's public STUN default.
            assert animator.ice_servers == []
            avatar = animator.process(frames[0])
            assert avatar is not None and avatar.shape == (128, 128, 3)
            assert animator.connections == 1 and server.live_sessions() == 1
            # the camera loop with a sink: frames go out at the camera's pace, avatars fill the sink
            sink = MemorySink(160, 90)

            class Paced:
                fps = 20.0

                def __init__(self):
                    self.i = 0

                def read(self):
                    time.sleep(0.05)
                    self.i += 1
                    return frames[self.i % len(frames)] if self.i < 30 else None

                def close(self):
                    pass

            stats = CamRunner(Paced(), sink, animator).run()
            assert stats.frames_out == len(sink.frames) >= 10
            # the sink shows the avatar (square, letterboxed), not the 4:3-ish camera frame
            assert sink.frames[-1][:, :30].max() == 0 and sink.frames[-1][:, 40:120].mean() > 10
            animator.recalibrate()
        finally:
            before_close = server.live_sessions()
            animator.close()
        deadline = time.monotonic() + 10
        while server.live_sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert before_close == 1 and server.live_sessions() == 0  # hang-up frees the session

    # server restart: the client reconnects by itself (new session, photo uploaded again)
    animator = RemoteAnimator(url, astronaut(), reconnect_delay=0.2, max_reconnect_delay=0.5, token=TOKEN)
    try:
        with ServerThread(engine, port):
            _pump(animator, frames, lambda: animator.avatars_received >= 3, timeout=60)
        first = animator.avatars_received
        with ServerThread(engine, port):
            _pump(
                animator,
                frames,
                lambda: animator.connections >= 2 and animator.avatars_received > first + 3,
                90,
            )
    finally:
        animator.close()


def test_remote_refusal_is_reported(engine, frames):
    port = _free_port()
    with ServerThread(engine, port):
        grey = np.full((200, 200, 3), 128, np.uint8)  # no face: the server answers 422
        animator = RemoteAnimator(f"http://127.0.0.1:{port}", grey, reconnect_delay=5, token=TOKEN)
        try:
            deadline = time.monotonic() + 20
            while animator.last_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert animator.last_error is not None and "422" in animator.last_error
            assert animator.avatars_received == 0
        finally:
            animator.close()
        # Without the token: 401, reported as a refusal (not retried quickly as a network error).
        animator = RemoteAnimator(f"http://127.0.0.1:{port}", astronaut(), reconnect_delay=5)
        try:
            deadline = time.monotonic() + 20
            while animator.last_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert animator.last_error is not None and "401" in animator.last_error
        finally:
            animator.close()
    assert issubclass(RemoteError, Exception)


def test_remote_ice_configuration_is_the_servers():
    config = rtc_configuration(
        [{"urls": "turn:t.example:3478", "username": "1700000000:s", "credential": "c"}, {"bad": 1}]
    )
    assert [(s.urls, s.username, s.credential) for s in config.iceServers] == [
        (["turn:t.example:3478"], "1700000000:s", "c")
    ]
    assert rtc_configuration([]).iceServers == []  # a list: aiortc's None would mean Google's STUN
    assert rtc_configuration([]).iceTransportPolicy.value == "all"
    assert rtc_configuration([], relay_only=True).iceTransportPolicy.value == "relay"
    assert split_token("https://h:8000/#token=abc") == ("https://h:8000", "abc")
    assert split_token("https://h:8000/") == ("https://h:8000", None)


def test_backoff_starts_again_after_a_good_session(monkeypatch):
    """Failures double the wait; a session that delivered avatars resets it to the first step."""
    monkeypatch.delenv("DAGAN_ACCESS_TOKEN", raising=False)
    script = ["fail", "fail", "fail", "good", "fail", "fail"]

    class Scripted(RemoteAnimator):
        async def _session_once(self) -> None:
            await asyncio.sleep(0)
            if not script:
                await asyncio.sleep(3600)
            if script.pop(0) == "good":
                self._good_session = True  # what receiving an avatar frame sets
            raise ConnectionError("scripted")

    animator = Scripted("http://127.0.0.1:9", astronaut(), reconnect_delay=0.01, max_reconnect_delay=1.0)
    try:
        deadline = time.monotonic() + 10
        while len(animator.delays) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(animator.delays) == [0.01, 0.02, 0.04, 0.01, 0.02, 0.04]
    finally:
        animator.close()


def test_remote_mouth_keys_reach_the_server_and_survive_a_reconnection(frames):
    """The client starts from the served model's own gain (GET /api/config), the server's session takes
    the stepped gain mid-call, and the options a reconnection creates its session with carry it."""
    from helpers import lip_config, make_model

    from engine.torch_backend import TorchEngine

    engine = TorchEngine(make_model(lip_config(2.5)), device="cpu")
    port = _free_port()
    with ServerThread(engine, port) as server:
        animator = RemoteAnimator(f"http://127.0.0.1:{port}", astronaut(), token=TOKEN)
        try:
            _pump(animator, frames, lambda: animator.avatars_received >= 2, 60)
            assert animator.server_mouth_gain == 2.5
            assert animator.step_mouth_gain(-2) == 2.0
            sessions = server.app.state.service.registry.snapshot
            _pump(animator, frames, lambda: [s.mouth_gain for s in sessions()] == [2.0], 15)
            assert animator.session_options["mouth_gain"] == 2.0  # what a reconnection asks for
        finally:
            animator.close()
