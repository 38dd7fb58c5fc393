"""Who a client is, and what one client may hold (issue 22, rows 1, 2, 5 and 7).

- Client addresses: ``X-Forwarded-For`` counts only from a proxy named in ``forwarded_allow_ips`` (uvicorn
  believed it from any loopback peer), and the HAProxy deployment passes the real address to a server
  that trusts exactly that proxy.
- One address holds at most its share of the session slots, and its rate-limit burst is no larger.
- A server bound beyond loopback without ``--allowed-hosts`` answers only to its own names (DNS rebinding).
- Upload slots: a body must keep a minimum rate after a grace period, and one address holds only its
  share of the slots, so slow connections from one address cannot deny everybody else's uploads.
- Header limits as documented (431), ``Retry-After`` on every 429, the rejected-sessions metric counts
  only 503s, session ids carry 128 random bits.

Servers run in this process on 127.0.0.1 (uvicorn with the production configuration, or the test
client); other client addresses are 127.0.0.2 and 127.0.0.3 (any 127/8 address is this machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import ThreadedServer, read_response

from dagan.helpers import stop_process
from server.app import create_app
from server.guard import TrustedProxies, client_key, interface_addresses
from server.sessions import SessionRegistry
from server.settings import ServerSettings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://127.0.0.1:8000"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)


def settings(**kw) -> ServerSettings:
    return ServerSettings(ice_host_addresses=("127.0.0.1",), **kw)


class LiveServer(ThreadedServer):
    """The production server in a thread, with this module's settings and per-address clients."""

    def __init__(self, engine, **kw) -> None:
        super().__init__(settings(port=0, **kw), engine)

    @property
    def service(self):
        return self.app.state.service

    def clients(self) -> list[str]:
        """The client address of every live session, as the server counted it."""
        return sorted(s.client for s in self.service.registry.snapshot())

    def http(self, source: str = "127.0.0.1") -> httpx.Client:
        """A client whose connections come from ``source`` (a loopback address of this machine)."""
        return httpx.Client(
            base_url=self.url, transport=httpx.HTTPTransport(local_address=source), timeout=60
        )


def refused(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["status"] == status and len(body["message"]) > 10, body
    return body


# --------------------------------------------------------------------------------- 1: client addresses


def test_forwarded_for_counts_only_from_a_trusted_proxy(engine):
    """The issue's row 1: 40 sessions from one loopback client naming itself 203.0.113.<i>."""
    with LiveServer(engine) as server, server.http() as http:
        codes = [
            http.post("/api/sessions", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
            for i in range(12)
        ]
        # One address, whatever the header says: its share of the 8 slots (4), then 429.
        assert codes == [201] * 4 + [429] * 8, codes
        assert server.clients() == ["127.0.0.1"] * 4
    with LiveServer(engine, forwarded_allow_ips=("127.0.0.1",)) as server, server.http() as http:
        for value in ("203.0.113.7", "10.9.9.9, 203.0.113.8", "garbage", "::1", "x" * 5000):
            assert http.post("/api/sessions", headers={"X-Forwarded-For": value}).status_code == 201
        # The rightmost entry from the trusted proxy is the client; what is not an address (garbage, a
        # 5,000-character value) is the proxy itself, never a new client per request.
        want = ["203.0.113.7", "203.0.113.8", "127.0.0.1", client_key("::1"), "127.0.0.1"]
        assert server.clients() == sorted(want)
        # A peer that is not the proxy is its own client, whatever it writes.
        with server.http("127.0.0.2") as other:
            assert other.post("/api/sessions", headers={"X-Forwarded-For": "1.2.3.4"}).status_code == 201
        assert "127.0.0.2" in server.clients() and "1.2.3.4" not in server.clients()
    proxies = TrustedProxies(("10.0.0.0/8", "::1"))
    assert proxies.client("10.1.2.3", [b"198.51.100.1, 10.0.0.9"]) == "198.51.100.1"  # two proxies
    assert proxies.client("10.1.2.3", [b"198.51.100.1", b"198.51.100.2"]) == "198.51.100.2"
    assert proxies.client("192.0.2.1", [b"198.51.100.1"]) == "192.0.2.1"
    assert proxies.client("::1", [b"[2001:db8::5]:443"]) == "2001:db8::5"
    with pytest.raises(SettingsError, match="not an IP address"):
        settings(forwarded_allow_ips=("proxy.example",))


def test_one_address_holds_only_its_share_of_the_sessions(engine):
    with TestClient(create_app(settings(), engine), base_url=BASE, client=("198.51.100.4", 1)) as c:
        assert [c.post("/api/sessions").status_code for _ in range(4)] == [201] * 4
        r = c.post("/api/sessions")  # one address: at most half of the 8 slots
        assert refused(r, 429, "too_many_sessions") and int(r.headers["retry-after"]) > 0
        other = TestClient(c.app, base_url=BASE, client=("198.51.100.5", 1))
        assert other.post("/api/sessions").status_code == 201
    # IPv6 counts per /64: a host that owns one cannot become 2^64 clients.
    with TestClient(create_app(settings(), engine), base_url=BASE) as c:
        six = [TestClient(c.app, base_url=BASE, client=(f"2001:db8:1:2::{k}", 1)) for k in range(1, 6)]
        codes = [t.post("/api/sessions").status_code for t in six]
        assert codes == [201] * 4 + [429], codes
    s = settings()
    assert (s.sessions_per_client, s.session_burst_size) == (4, 4)
    # The burst is never larger than the share: a bigger one is cut to it.
    assert settings(session_burst=10).session_burst_size == 4
    assert settings(max_sessions=16, max_sessions_per_client=6, session_burst=3).session_burst_size == 3
    assert settings(max_sessions=1).sessions_per_client == 1
    assert client_key("2001:db8:1:2::9") == client_key("2001:db8:1:2:ffff::1") != client_key("2001:db8::1")
    assert client_key("::ffff:198.51.100.4") == "198.51.100.4"


def proxy_config(port: int, lb_port: int) -> str:
    """deploy/haproxy.cfg as shipped, its Docker server block replaced by one loopback server."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text, n = re.subn(
        r"# BEGIN servers.*?# END servers", f"server s1 127.0.0.1:{port} check", text, flags=re.S
    )
    assert n == 1
    text, n = re.subn(r"# BEGIN resolvers.*?# END resolvers", "", text, flags=re.S)
    assert n == 1
    return text


def test_haproxy_deployment_passes_the_real_client_address(engine, tmp_path):
    """deploy/haproxy.cfg appends the client's address; docker-compose.replicas.yml makes the replicas
    trust exactly the proxy (a fixed address outside Docker's dynamic range); through the shipped
    config a server trusting only the proxy counts the real client, not the proxy nor a spoofed value."""
    import yaml

    cfg = (ROOT / "deploy" / "haproxy.cfg").read_text()
    assert re.search(r"(?m)^\s+option forwardfor\b", cfg), "HAProxy does not pass the client's address"
    compose = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    lb_address = compose["services"]["lb"]["networks"]["dagan"]["ipv4_address"]
    trusted = compose["services"]["dagan"]["environment"]["DAGAN_FORWARDED_ALLOW_IPS"]
    assert trusted == lb_address == "${DAGAN_LB_ADDRESS:-172.31.240.2}"
    ipam = compose["networks"]["dagan"]["ipam"]["config"][0]
    default = lambda v: v.split(":-")[1].rstrip("}")  # noqa: E731 - "${VAR:-default}" -> default
    import ipaddress

    address = ipaddress.ip_address(default(lb_address))
    assert address in ipaddress.ip_network(default(ipam["subnet"]))
    assert address not in ipaddress.ip_network(default(ipam["ip_range"]))  # never handed to a replica
    assert compose["services"]["dagan"]["networks"] == ["dagan"]
    if HAPROXY is None:
        pytest.skip("haproxy not installed (apt-get install haproxy): the live check through it is skipped")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        lb_port = s.getsockname()[1]
    with LiveServer(engine, forwarded_allow_ips=("127.0.0.1",)) as server:
        (tmp_path / "haproxy.cfg").write_text(proxy_config(server.port, lb_port))
        env = {**os.environ, "DAGAN_LB_BIND": f"127.0.0.1:{lb_port}", "DAGAN_HEALTH_HOST": "127.0.0.1"}
        with open(tmp_path / "haproxy.log", "wb") as log:
            proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], env=env, stdout=log, stderr=log
            )
        try:
            lb = f"http://127.0.0.1:{lb_port}"
            with httpx.Client(base_url=lb, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
                deadline = time.monotonic() + 20
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if c.get("/healthz", timeout=2).status_code == 200:
                            break
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        tmp_path / "haproxy.log"
                    ).read_text()[-2000:]
                    time.sleep(0.2)
                spoofed = {"X-Forwarded-For": "203.0.113.66"}
                assert c.post("/api/sessions", headers=spoofed).status_code == 201
            with httpx.Client(base_url=lb, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as c:
                assert c.post("/api/sessions").status_code == 201
        finally:
            stop_process(proc)
        assert server.clients() == ["127.0.0.2", "127.0.0.3"]


# ------------------------------------------------------------------------------------- 2: DNS rebinding


def test_wildcard_bind_answers_only_to_its_own_names(engine):
    """The issue's row 2: bound to 0.0.0.0 without --allowed-hosts, a page on evil.example (resolved to
    this machine) could create sessions, upload and read /metrics."""
    from server.cli import exposure_warnings

    with TestClient(create_app(settings(host="0.0.0.0"), engine), base_url=BASE) as c:
        evil = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
        refused(c.post("/api/sessions", headers=evil, json={}), 403, "forbidden_host")
        for path in ("/api/config", "/metrics", "/api/sample-source"):
            body = refused(c.get(path, headers=evil), 403, "forbidden_host")
        assert "--allowed-hosts" in body["message"]
        refused(
            c.post("/api/source-check", headers=evil, files={"file": ("p.jpg", b"x")}), 403, "forbidden_host"
        )
        assert len(c.app.state.service.registry) == 0
        # Its own names and addresses still work: loopback, the host name, every interface's address.
        own = ["localhost:8000", "127.0.0.1", f"{socket.gethostname()}:8000"]
        own += [f"[{a}]:8000" if ":" in a else a for a in sorted(interface_addresses())[:4]]
        for host in own:
            assert c.get("/api/config", headers={"Host": host}).status_code == 200, host
    # Named hosts: exactly those (and not this machine's addresses).
    named = settings(host="0.0.0.0", allowed_hosts=("avatar.example.org",))
    with TestClient(create_app(named, engine), base_url="http://avatar.example.org") as c:
        assert c.get("/api/config").status_code == 200
        refused(c.get("/api/config", headers={"Host": "evil.example"}), 403, "forbidden_host")
    warnings = exposure_warnings(settings(host="0.0.0.0", access_token="t" * 12), tls=True)
    assert any("DNS rebinding" in w and "--allowed-hosts" in w for w in warnings), warnings
    assert not any("rebinding" in w for w in exposure_warnings(named, tls=True))


# ------------------------------------------------------------------------------------- 5: upload slots


def responses(socks: list[socket.socket], count: int, timeout: float) -> list[tuple[int, str]]:
    """(status, error code) of the first ``count`` responses to arrive on ``socks``, in arrival order;
    the sockets that answered are removed from ``socks``."""
    import selectors

    out: list[tuple[int, str]] = []
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(out) < count:
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            assert ready, f"only {len(out)} of {count} responses within {timeout:g} s: {out}"
            for key, _ in ready:
                status, body = read_response(key.fileobj)
                out.append((status, body["error"]))
                sel.unregister(key.fileobj)
                socks.remove(key.fileobj)
                key.fileobj.close()
    return out


def test_slow_bodies_from_one_address_cannot_take_the_upload_slots(engine, astronaut_jpeg):
    """The issue's row 5: 8 connections trickling `POST /api/source-check` bodies held all 8 upload
    slots until the 60 s body timeout, and everybody else's photo got 503 server_busy."""
    grace = 3.0
    with LiveServer(engine, body_grace_s=grace, min_body_bytes_per_s=2000) as server:
        head = (
            b"POST /api/source-check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n-"
        )
        slow = []
        t0 = time.monotonic()
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(head)
            slow.append(s)
        # One address holds 2 of the 8 slots; its other 6 connections are told so at once.
        waiting = list(slow)
        assert responses(waiting, 6, timeout=grace) == [(429, "too_many_uploads")] * 6
        # Somebody else's photo goes through while those two still hold their slots (today: 503).
        assert time.monotonic() - t0 < grace
        result: dict = {}

        def other_upload() -> None:
            with server.http("127.0.0.2") as other:
                files = {"file": ("p.jpg", astronaut_jpeg, "image/jpeg")}
                result["r"] = other.post("/api/source-check", files=files, timeout=120)

        thread = threading.Thread(target=other_upload)
        thread.start()
        # The two are cut off once they fall below the minimum rate, not after the 60 s body timeout.
        late = responses(waiting, 2, timeout=30)
        took = time.monotonic() - t0
        thread.join(120)
        assert late == [(408, "body_too_slow")] * 2 and took < 30, (late, took)
        assert result["r"].status_code == 200, result["r"].text
        refusals = server.service.metrics.uploads_refused
        assert refusals["per_client"] == 6 and refusals["too_slow"] == 2, refusals
        # A body at a healthy rate is unaffected by the rule.
        with server.http() as http:
            r = http.post("/api/source-check", files={"file": ("p.jpg", astronaut_jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
    assert settings().uploads_per_client == 2


# ---------------------------------------------------------------------- 7: headers, Retry-After, metrics


def test_header_limits_retry_after_metrics_and_session_ids(engine):
    with TestClient(create_app(settings(session_burst=2), engine), base_url=BASE) as c:
        body = refused(c.get("/healthz", headers={"X-Big": "a" * 60_000}), 431, "headers_too_large")
        assert "16 KB" in body["message"]
        refused(c.get("/healthz", headers=[(f"X-H{i}", "v") for i in range(3000)]), 431, "headers_too_large")
        assert c.get("/healthz", headers={"X-Fine": "a" * 8000}).status_code == 200
        # Every 429 says when to come back; the 503 counter counts only "full".
        assert [c.post("/api/sessions").status_code for _ in range(2)] == [201, 201]
        r = c.post("/api/sessions")
        assert refused(r, 429, "rate_limited") and int(r.headers["retry-after"]) >= 1
        metrics = c.get("/metrics").text
        assert "dagan_sessions_rejected_total 0" in metrics
        assert 'dagan_sessions_limited_total{reason="rate"} 1' in metrics
        assert re.search(r"# HELP dagan_sessions_rejected_total [^\n]*503", metrics)
    # A session id is a capability: 128 random bits (uuid4's version nibble is always '4').
    ids = [SessionRegistry(100).create(True).id for _ in range(64)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[12] for i in ids}) > 1 and len({i[16] for i in ids}) > 4
    # Over the wire: 60 KB of header in one write (h11 bounds only a head still incomplete, so one that
    # arrives whole reaches the guard's 431; one that arrives in pieces gets uvicorn's own 400).
    with LiveServer(engine) as server:
        for extra in (
            b"X-Big: " + b"a" * 60_000 + b"\r\n",
            b"".join(b"X-H%d: v\r\n" % i for i in range(3000)),
        ):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
            status = int(s.recv(65536).split()[1])
            s.close()
            assert status in (431, 400), status
    security = (ROOT / "docs" / "security.md").read_text()
    assert "128 random bits" in security and "431" in security and "Retry-After" in security
