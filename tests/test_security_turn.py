"""A relay-only WebRTC call through Debian's coturn on 127.0.0.1, with TURN REST API credentials.

The server mints a time-limited credential per session from coturn's ``static-auth-secret``; an aiortc
client restricted to relay candidates (``iceTransportPolicy=relay``) must get its avatar through the TURN
server, and an expired credential must get no relay at all. coturn comes from Debian's ``coturn`` package
(.ci/run installs it); without ``turnserver`` on PATH the test is skipped and says so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from helpers import looping_camera

from dagan.helpers import stop_process
from server.client import ServiceClient, local_offer
from server.compat import nominated_local_candidate_types
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


def test_relay_only_call_through_coturn(engine, astronaut_jpeg, grace_hopper, coturn):
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
            async with ServiceClient(f"http://127.0.0.1:{http_port}", timeout=20) as service:
                received = []
                call = await service.call(
                    astronaut_jpeg, looping_camera(frames), on_frame=received.append, relay_only=True
                )
                sid = call.session_id
                (turn,) = call.ice_servers
                assert turn["username"].endswith(":" + sid)
                offer = call.pc.localDescription.sdp
                t0 = time.monotonic()
                while len(received) < 5:
                    assert time.monotonic() - t0 < 30, (
                        f"no avatar through the relay ({call.pc.connectionState})"
                    )
                    await asyncio.sleep(0.05)
                types = nominated_local_candidate_types(call.pc)
                await call.hang_up()

                # An expired credential: coturn refuses the allocation, so there is no relay candidate.
                user, password = turn_credentials(SECRET, "late", ttl_s=60, now=time.time() - 3600)
                expired = [{"urls": turn["urls"], "username": user, "credential": password}]
                late_sdp = await local_offer(ice_servers=expired, relay_only=True)
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
