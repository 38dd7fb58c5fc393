"""A relay-only WebRTC call through Debian's coturn on 127.0.0.1, with TURN REST API credentials.

The server mints a time-limited credential per session from coturn's ``static-auth-secret``; an aiortc
client restricted to relay candidates (``iceTransportPolicy=relay``) must get its avatar through the TURN
server, and an expired credential must get no relay at all. coturn comes from Debian's ``coturn`` package
(.ci/run installs it); without ``turnserver`` on PATH the test is skipped and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError

from dagan.helpers import stop_process
from server.guard import turn_credentials
from server.settings import ServerSettings

SECRET = "dagan-test-turn-secret"
TURNSERVER = shutil.which("turnserver")
if TURNSERVER is None:
    print(
        "test_security_turn: skipped, `turnserver` (Debian package coturn) is not installed", file=sys.stderr
    )
pytestmark = pytest.mark.skipif(
    TURNSERVER is None, reason="needs coturn's turnserver (apt-get install coturn; .ci/run installs it)"
)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stun_answers(port: int) -> bool:
    """A STUN Binding request (RFC 5389) to 127.0.0.1:port gets a Binding success response."""
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(request, ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    return data[:2] == b"\x01\x01" and data[8:20] == request[8:20]


@pytest.fixture(scope="module")
def coturn(tmp_path_factory):
    """coturn with the issue's recipe, on a free port; stopped by its PID afterwards."""
    folder = tmp_path_factory.mktemp("coturn")
    port = _free_udp_port()
    log = open(folder / "turnserver.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            TURNSERVER,
            "-n",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={port}",
            "--min-port=49160",
            "--max-port=49200",
            "--use-auth-secret",
            f"--static-auth-secret={SECRET}",
            "--realm=dagan.test",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--allow-loopback-peers",
            "--fingerprint",
            f"--pidfile={folder / 'turnserver.pid'}",
            f"--db={folder / 'turndb'}",
            "--log-file=stdout",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    try:
        deadline = time.monotonic() + 15
        while not _stun_answers(port):
            assert proc.poll() is None, (folder / "turnserver.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "coturn did not answer STUN within 15 s"
        yield port, folder / "turnserver.log"
    finally:
        stop_process(proc)
        log.close()


class Camera(VideoStreamTrack):
    def __init__(self, frames) -> None:
        super().__init__()
        self.frames, self.i = frames, 0

    async def recv(self):
        import av

        pts, base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.frames[self.i % len(self.frames)], format="rgb24")
        self.i += 1
        frame.pts, frame.time_base = pts, base
        return frame


def _ice(servers: list[dict]) -> list[RTCIceServer]:
    return [RTCIceServer(s["urls"], s.get("username"), s.get("credential")) for s in servers]


def _nominated_types(pc: RTCPeerConnection) -> set[str]:
    """Candidate types of the local side of every nominated ICE pair (aioice's view of the call)."""
    types = set()
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport
        for pair in ice._connection._nominated.values():
            types.add(pair.local_candidate.type)
    return types


def test_relay_only_call_through_coturn(engine, astronaut_jpeg, grace_hopper, coturn):
    import httpx
    import uvicorn

    from dagan.samples import driving_frames
    from server.app import create_app
    from server.guard import uvicorn_config

    port, log_path = coturn
    frames = driving_frames(grace_hopper, num_frames=10, size=96)
    settings = ServerSettings(
        port=0,
        ice_host_addresses=("127.0.0.1",),
        turn_urls=(f"turn:127.0.0.1:{port}?transport=udp",),
        turn_secret=SECRET,
        turn_ttl_s=600,
        output_size=64,
    )

    async def scenario():
        app = create_app(settings, engine)
        server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
        server.install_signal_handlers = lambda: None
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        http_port = server.servers[0].sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=20) as http:
                session = (await http.post("/api/sessions")).json()
                sid = session["id"]
                (turn,) = session["ice_servers"]
                assert turn["username"].endswith(":" + sid)
                r = await http.put(f"/api/sessions/{sid}/source", files={"file": ("p.jpg", astronaut_jpeg)})
                assert r.status_code == 200
                pc = RTCPeerConnection(
                    RTCConfiguration(
                        iceServers=_ice(session["ice_servers"]),
                        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
                    )
                )
                received = []
                readers = []

                @pc.on("track")
                def on_track(track):
                    async def read():
                        with contextlib.suppress(MediaStreamError):
                            while True:
                                received.append(await track.recv())

                    readers.append(asyncio.ensure_future(read()))

                pc.addTrack(Camera(frames))
                await pc.setLocalDescription(await pc.createOffer())
                offer = pc.localDescription.sdp
                r = await http.post(f"/api/sessions/{sid}/offer", json={"sdp": offer, "type": "offer"})
                assert r.status_code == 200, r.text
                await pc.setRemoteDescription(RTCSessionDescription(**r.json()))
                t0 = time.monotonic()
                while len(received) < 5:
                    assert time.monotonic() - t0 < 30, f"no avatar through the relay ({pc.connectionState})"
                    await asyncio.sleep(0.05)
                types = _nominated_types(pc)
                await pc.close()
                await asyncio.gather(*readers, return_exceptions=True)

                # An expired credential: coturn refuses the allocation, so there is no relay candidate.
                user, password = turn_credentials(SECRET, "late", ttl_s=60, now=time.time() - 3600)
                late = RTCPeerConnection(
                    RTCConfiguration(
                        iceServers=[RTCIceServer(turn["urls"], user, password)],
                        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
                    )
                )
                late.addTrack(Camera(frames))
                await late.setLocalDescription(await late.createOffer())
                late_sdp = late.localDescription.sdp
                await late.close()
                return offer, types, len(received), late_sdp, sid
        finally:
            server.should_exit = True
            await task

    offer, types, n, late_sdp, sid = asyncio.run(scenario())
    candidates = [line for line in offer.splitlines() if line.startswith("a=candidate")]
    assert candidates and all("typ relay" in c for c in candidates), candidates  # relay only
    assert types == {"relay"}, types
    assert n >= 5
    assert "typ relay" not in late_sdp
    # coturn itself checked both: the session's credential was accepted, the expired one refused.
    refusals = [line for line in log_path.read_text().splitlines() if "check_stun_auth" in line]
    assert any(":late>" in line for line in refusals), refusals
    assert not any(sid in line for line in refusals), refusals
