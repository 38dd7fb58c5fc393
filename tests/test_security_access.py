"""Access control of a server put on a network: token, Host and Origin checks, the session rate limit,
security headers, /docs off by default, TURN REST credentials, and the CLI flags and warnings for them."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.guard import TokenBucket, turn_credentials
from server.settings import ServerSettings, SettingsError

BASE = "http://127.0.0.1:8000"
TOKEN = "s3cret-token-for-tests"


def make(engine, base: str = BASE, client: tuple[str, int] = ("127.0.0.1", 50000), **kw) -> TestClient:
    settings = ServerSettings(ice_host_addresses=("127.0.0.1",), **kw)
    return TestClient(create_app(settings, engine), base_url=base, client=client)


def refused(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["status"] == status and len(body["message"]) > 10, body
    return body


def test_access_token(engine):
    with make(engine, access_token=TOKEN) as c:
        good = {"Authorization": f"Bearer {TOKEN}"}
        # The page, its assets, liveness and the API schema are public; nothing else is.
        for path in ("/", "/static/app.js", "/healthz", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        for method, path in (
            ("GET", "/api/config"),
            ("GET", "/api/sample-source"),
            ("POST", "/api/sessions"),
            ("GET", "/metrics"),
            ("POST", "/api/source-check"),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong-token-xx"}, {"Authorization": TOKEN}):
                r = c.request(method, path, headers=headers)
                refused(r, 401, "unauthorized")
                assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/api/config", headers=good).json()["access_token_required"] is True
        r = c.post("/api/sessions", headers=good)
        assert r.status_code == 201
        sid = r.json()["id"]
        refused(c.get(f"/api/sessions/{sid}"), 401, "unauthorized")
        assert c.get(f"/api/sessions/{sid}", headers=good).status_code == 200
        assert c.delete(f"/api/sessions/{sid}", headers=good).status_code == 204
        assert c.get("/metrics", headers=good).status_code == 200
    # The page sends it: read from its link's #token= and put in an Authorization header.
    js = (ServerSettings().client_dir / "app.js").read_text()
    assert "token=" in js and "Bearer ${token}" in js
    with pytest.raises(SettingsError, match="at least 8"):
        ServerSettings(access_token="short")


def test_host_check_blocks_dns_rebinding(engine):
    with make(engine) as c:  # bound to 127.0.0.1: only loopback names
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.2"):
            assert c.get("/api/config", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            refused(c.get("/api/config", headers={"Host": host}), 403, "forbidden_host")
    with make(engine, base="http://avatar.example.org", allowed_hosts=("avatar.example.org", "*.lan")) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "cam.lan"}).status_code == 200
        refused(c.get("/healthz", headers={"Host": "127.0.0.1"}), 403, "forbidden_host")
    # Bound beyond loopback without a list: only its own addresses and names, never a name a page
    # chose (tests/test_security_clients.py has the rest of it).
    with make(engine, base="http://10.1.2.3:8000", host="0.0.0.0") as c:
        refused(c.get("/healthz"), 403, "forbidden_host")


def test_origin_check_stops_cross_site_requests(engine):
    with make(engine, allowed_origins=("https://friend.example",)) as c:
        # What any web page can send without a preflight: a text/plain POST.
        plain = {"Content-Type": "text/plain"}
        for origin in ("https://evil.example", "null", "http://127.0.0.1:9999", "file://"):
            r = c.post("/api/sessions", headers={**plain, "Origin": origin}, content=b"{}")
            refused(r, 403, "forbidden_origin")
        assert len(c.app.state.service.registry) == 0  # none of them made a session
        for origin in ("http://127.0.0.1:8000", "https://friend.example"):
            assert c.post("/api/sessions", headers={"Origin": origin}).status_code == 201, origin
        assert c.post("/api/sessions").status_code == 201  # no Origin: not a browser (curl, dagan cam)


def test_session_creation_is_rate_limited_per_client(engine):
    with make(engine, session_burst=3, sessions_per_minute=6, max_sessions=8) as c:
        codes = [c.post("/api/sessions").status_code for _ in range(4)]
        assert codes == [201, 201, 201, 429]
        body = refused(c.post("/api/sessions"), 429, "rate_limited")
        assert "try again" in body["message"]
        # Another address is not affected.
        other = TestClient(c.app, base_url=BASE, client=("10.0.0.7", 1234))
        assert other.post("/api/sessions").status_code == 201
    clock = [0.0]
    bucket = TokenBucket(per_minute=6, burst=2, clock=lambda: clock[0])
    assert [bucket.take("a") for _ in range(2)] == [0, 0]
    assert bucket.take("a") == pytest.approx(10.0)  # one token every 10 s
    clock[0] = 10.0
    assert bucket.take("a") == 0 and bucket.take("a") > 0


def test_security_headers_and_docs_off(engine):
    with make(engine) as c:
        for path in ("/", "/static/app.js", "/api/config", "/api/nothing", "/healthz"):
            r = c.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
            assert "script-src 'self';" in csp and "cdn" not in csp, path
            assert r.headers["x-frame-options"] == "DENY"
        refused(c.get("/docs"), 404, "not_found")
        refused(c.get("/redoc"), 404, "not_found")
        page = c.get("/").text
        assert '<script src="/static/app.js">' in page and "http" not in page.split("<body>")[1]
    with make(engine, docs=True) as c:
        r = c.get("/docs")
        assert r.status_code == 200 and "cdn.jsdelivr.net" in r.headers["content-security-policy"]


def test_turn_rest_credentials(engine):
    secret = "turn-shared-secret"
    with make(
        engine,
        turn_urls=("turn:turn.example.org:3478", "turns:turn.example.org:5349"),
        turn_secret=secret,
        turn_ttl_s=600,
    ) as c:
        now = time.time()
        config = c.get("/api/config").json()["ice_servers"]
        a = c.post("/api/sessions").json()
        b = c.post("/api/sessions").json()
    for servers, user in ((config, "config"), (a["ice_servers"], a["id"]), (b["ice_servers"], b["id"])):
        (turn,) = servers
        assert turn["urls"] == ["turn:turn.example.org:3478", "turns:turn.example.org:5349"]
        expiry, _, name = turn["username"].partition(":")
        assert name == user and now + 590 < int(expiry) < now + 610
        expected = base64.b64encode(
            hmac.new(secret.encode(), turn["username"].encode(), hashlib.sha1).digest()
        )
        assert turn["credential"] == expected.decode()
        assert secret not in str(servers)
    assert a["ice_servers"] != b["ice_servers"]  # one credential per session
    # The scheme coturn documents: username "<expiry>:<user>", password base64(HMAC-SHA1(secret, username))
    # (the value below is from `echo -n 1100:u | openssl dgst -sha1 -hmac S -binary | base64`).
    assert turn_credentials("S", "u", 100, now=1000) == ("1100:u", "Mp9rcemQi1n55oCdSaLNXo2S/60=")
    with pytest.raises(SettingsError, match="both"):
        ServerSettings(turn_urls=("turn:x",))
    with pytest.raises(SettingsError, match="turn:"):
        ServerSettings(turn_urls=("stun:x",), turn_secret="s")


def _serve_args(argv: list[str]) -> argparse.Namespace:
    from server.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_cli_security_flags_and_warning(monkeypatch):
    from server.cli import exposure_warnings, settings_from_args

    monkeypatch.setenv("DAGAN_ACCESS_TOKEN", "from-the-environment")
    monkeypatch.setenv("DAGAN_TURN_URLS", "turn:t.example:3478")
    monkeypatch.setenv("DAGAN_TURN_SECRET", "env-secret")
    s = settings_from_args(_serve_args(["--allowed-hosts", "a.example, b.example", "--docs"]))
    assert s.access_token == "from-the-environment" and s.allowed_hosts == ("a.example", "b.example")
    assert s.turn_urls == ("turn:t.example:3478",) and s.turn_secret == "env-secret" and s.docs
    args = _serve_args(["--access-token", "random", "--host", "0.0.0.0"])
    s = settings_from_args(args)
    assert len(s.access_token) >= 24 and settings_from_args(args).access_token == s.access_token
    assert not any("WITHOUT an access token" in line for line in exposure_warnings(s, tls=True))
    monkeypatch.delenv("DAGAN_ACCESS_TOKEN")
    exposed = settings_from_args(_serve_args(["--host", "0.0.0.0"]))
    assert any("WITHOUT an access token" in line for line in exposure_warnings(exposed, tls=False))
    assert exposure_warnings(settings_from_args(_serve_args([])), tls=False) == []  # localhost: quiet
