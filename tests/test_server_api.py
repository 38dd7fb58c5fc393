"""The HTTP API of the avatar service: every refusal with its status and JSON body, metrics, OpenAPI, CLI."""

from __future__ import annotations

import argparse
import io
import re
import time

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dagan.checkpoint import CheckpointError
from server.app import create_app
from server.settings import IceServer, ServerSettings, SettingsError, parse_ice_servers

MB = 1024 * 1024
BASE = "http://127.0.0.1:8000"  # a loopback-bound server answers only to loopback host names


@pytest.fixture(scope="module")
def photo(astronaut_jpeg) -> bytes:
    return astronaut_jpeg


def png(width: int, height: int, value: int = 128) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def client(engine):
    # One test client (one address) fills both slots and creates more at once: lift the per-address
    # cap to the global one and the rate limit out of the way (tests/test_security_* test them).
    settings = ServerSettings(
        max_sessions=2, max_sessions_per_client=2, sessions_per_minute=1e6, ice_host_addresses=("127.0.0.1",)
    )
    with TestClient(create_app(settings, engine), base_url=BASE) as c:
        yield c


def new_session(client: TestClient) -> str:
    r = client.post("/api/sessions")
    assert r.status_code == 201, r.text
    return r.json()["id"]


def upload(client: TestClient, sid: str, data: bytes, name: str = "p.jpg", mime: str = "image/jpeg"):
    return client.put(f"/api/sessions/{sid}/source", files={"file": (name, data, mime)})


def assert_error(response, status: int, code: str, words: str = "") -> None:
    """A refusal is exactly: the status, a JSON body {error, message, status}, a readable message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message", "status"}
    assert body["error"] == code and body["status"] == status
    assert words.lower() in body["message"].lower(), body["message"]
    assert "\n" not in body["message"] and len(body["message"]) > 10


# ---------------------------------------------------------------------------------------- page + info


def test_page_sample_config_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="avatar"' in page.text and "/static/app.js" in page.text
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "css")):
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert "RTCPeerConnection" in client.get("/static/app.js").text

    sample = client.get("/api/sample-source")
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(sample.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (512, 512, 3) and image.std() > 30

    config = client.get("/api/config").json()
    assert config["ice_servers"] == [] and config["max_sessions"] == 2 and config["image_size"] == 64
    assert config["untrained"] is False and config["relative"] is True
    health = client.get("/healthz").json()
    assert health == {
        "status": "ok",
        "backend": "torch",
        "device": "cpu",
        "untrained": False,
        "sessions": 0,
        "max_sessions": 2,
    }


def test_unknown_route_is_json(client):
    assert_error(client.get("/api/nothing"), 404, "not_found")
    assert_error(client.patch("/api/sessions"), 405, "method_not_allowed")


# ------------------------------------------------------------------------------------------- sessions


def test_session_lifecycle_and_cap(client, photo):
    a = new_session(client)
    info = client.get(f"/api/sessions/{a}").json()
    assert info["has_source"] is False and info["connected"] is False and info["relative"] is True
    r = client.post("/api/sessions", json={"relative": False, "show_depth": True})
    assert r.status_code == 201 and r.json()["relative"] is False and r.json()["show_depth"] is True
    b = r.json()["id"]
    assert a != b
    # The third is over max_sessions=2.
    assert_error(client.post("/api/sessions"), 503, "server_busy", "busy")
    assert client.get("/healthz").json()["sessions"] == 2
    # Deleting frees the slot; a second delete or any use of the id is a 404.
    assert client.delete(f"/api/sessions/{a}").status_code == 204
    assert_error(client.delete(f"/api/sessions/{a}"), 404, "session_not_found")
    assert_error(client.get(f"/api/sessions/{a}"), 404, "session_not_found")
    assert_error(upload(client, a, photo), 404, "session_not_found")
    assert new_session(client) not in (a, b)
    # Refusals did not disturb the live session b.
    assert upload(client, b, photo).status_code == 200


def test_bad_session_options(client):
    assert_error(client.post("/api/sessions", json={"relative": "sideways"}), 400, "bad_request", "relative")
    r = client.post("/api/sessions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "bad_request")


def test_idle_session_is_freed(engine):
    settings = ServerSettings(idle_timeout_s=0.3, cleanup_interval_s=0.05, ice_host_addresses=("127.0.0.1",))
    with TestClient(create_app(settings, engine), base_url=BASE) as client:
        sid = new_session(client)
        deadline = time.monotonic() + 5
        while client.get(f"/api/sessions/{sid}").status_code == 200:
            assert time.monotonic() < deadline, "idle session was not freed"
            time.sleep(0.05)
        assert client.get("/healthz").json()["sessions"] == 0


# --------------------------------------------------------------------------------------------- source


def test_valid_photo(client, photo):
    sid = new_session(client)
    r = upload(client, sid, photo)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == sid and (body["width"], body["height"]) == (512, 512)
    assert body["blinks"] is False  # the tiny test model has no lid reader
    assert client.get("/api/config").json()["blinks"] is False
    box = body["face_box"]
    # The astronaut's face is in the upper middle of the photo.
    assert 150 < box["cx"] < 350 and 50 < box["cy"] < 300 and 100 < box["size"] < 500
    assert client.get(f"/api/sessions/{sid}").json()["has_source"] is True
    # PNG works too and replaces the source.
    rgb = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    _, buf = cv2.imencode(".png", rgb)
    assert upload(client, sid, buf.tobytes(), "p.png", "image/png").status_code == 200


@pytest.mark.parametrize(
    ("data", "name", "mime", "status", "code", "words"),
    [
        (b"hello, this is not a picture", "notes.txt", "text/plain", 415, "not_an_image", "not an image"),
        (b"GIF89a-but-not-really", "fake.jpg", "image/jpeg", 415, "not_an_image", "not an image"),
        (b"", "empty.jpg", "image/jpeg", 415, "not_an_image", "empty"),
        (png(4097, 8), "wide.png", "image/png", 413, "image_too_large", "4096"),
        (png(8, 5000), "tall.png", "image/png", 413, "image_too_large", "5000"),
        (png(300, 300), "grey.png", "image/png", 422, "no_face", "no face"),
    ],
    ids=["text", "garbage-named-jpg", "empty", "too-wide", "too-tall", "no-face"],
)
def test_bad_uploads(client, photo, data, name, mime, status, code, words):
    sid = new_session(client)
    assert_error(upload(client, sid, data, name, mime), status, code, words)
    # The session is untouched and still takes a good photo.
    assert client.get(f"/api/sessions/{sid}").json()["has_source"] is False
    assert upload(client, sid, photo).status_code == 200


def test_truncated_jpeg(client, photo):
    sid = new_session(client)
    assert_error(upload(client, sid, photo[: len(photo) // 3]), 415, "not_an_image", "corrupt")


def test_over_10_mb(client, photo):
    sid = new_session(client)
    # Just over the limit: parsed, then refused by the read limit.
    padded = photo + b"\0" * (10 * MB + 1 - len(photo))
    assert_error(upload(client, sid, padded), 413, "file_too_large", "10 MB")
    # Far over: refused from the Content-Length header before the body is parsed.
    assert_error(upload(client, sid, b"\0" * (12 * MB)), 413, "file_too_large", "limit")
    assert upload(client, sid, photo).status_code == 200


def test_upload_must_be_multipart_with_a_file(client):
    sid = new_session(client)
    r = client.put(f"/api/sessions/{sid}/source", content=png(64, 64), headers={"content-type": "image/png"})
    assert_error(r, 415, "not_multipart", "multipart")
    r = client.put(f"/api/sessions/{sid}/source", data={"photo": "x"}, files={"other": ("a.png", png(8, 8))})
    assert_error(r, 400, "bad_request", "'file'")


# ---------------------------------------------------------------------------------------------- offer


def test_offer_errors(client, photo):
    sdp = {"sdp": "v=0\r\n", "type": "offer"}
    assert_error(client.post("/api/sessions/nope/offer", json=sdp), 404, "session_not_found")
    sid = new_session(client)
    assert_error(client.post(f"/api/sessions/{sid}/offer", json=sdp), 409, "no_source", "photo")
    assert upload(client, sid, photo).status_code == 200
    assert_error(client.post(f"/api/sessions/{sid}/offer", json={"type": "offer"}), 400, "bad_request", "sdp")
    assert_error(
        client.post(f"/api/sessions/{sid}/offer", json={"sdp": "x", "type": "pranswer"}), 400, "bad_request"
    )
    r = client.post(
        f"/api/sessions/{sid}/offer", content=b"not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "bad_request")
    assert_error(
        client.post(f"/api/sessions/{sid}/offer", json={"sdp": "hello", "type": "offer"}), 400, "bad_sdp"
    )
    assert_error(client.post(f"/api/sessions/{sid}/offer", json={**sdp, "type": "answer"}), 400, "bad_sdp")
    # Starts like SDP and names a video section, but is not a usable offer (no ICE/DTLS attributes).
    broken = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    assert_error(
        client.post(f"/api/sessions/{sid}/offer", json={"sdp": broken, "type": "offer"}), 400, "bad_sdp"
    )
    # None of this disturbed the session.
    info = client.get(f"/api/sessions/{sid}").json()
    assert info["has_source"] is True and info["connected"] is False


# -------------------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r'^([a-z_]+)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (-?[0-9.e+-]+|\+Inf)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Strict enough for Prometheus' text format 0.0.4: HELP and TYPE before each family's samples."""
    samples: dict[str, float] = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram"), line
            assert name in helped, f"TYPE before HELP for {name}"
            typed[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a valid sample line: {line!r}"
            family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
            assert m.group(1) in typed or family in typed, f"sample without TYPE: {line}"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return samples


def test_metrics_format(client, photo):
    new_session(client)
    new_session(client)
    client.post("/api/sessions")  # rejected: counted
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse_metrics(r.text)
    assert m["dagan_active_sessions"] == 2
    assert m["dagan_max_sessions"] == 2
    assert m["dagan_sessions_created_total"] == 2
    assert m["dagan_sessions_rejected_total"] == 1
    assert m['dagan_engine_info{backend="torch",image_size="64",device="cpu",untrained="false"}'] == 1
    for key in (
        "dagan_frames_in_total",
        "dagan_frames_out_total",
        'dagan_frames_dropped_total{stage="input"}',
    ):
        assert m[key] == 0
    # A histogram: cumulative buckets ending in +Inf == count.
    buckets = [(k, v) for k, v in m.items() if k.startswith("dagan_frame_latency_seconds_bucket")]
    assert len(buckets) >= 5 and buckets[-1][0].endswith('le="+Inf"}')
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == m["dagan_frame_latency_seconds_count"]


def test_histogram_counts_observations():
    from server.metrics import Histogram

    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.05, 0.05, 2.0):
        h.observe(v)
    lines = h.lines("x")
    assert lines[:4] == [
        'x_bucket{le="0.01"} 1',
        'x_bucket{le="0.1"} 3',
        'x_bucket{le="1"} 3',
        'x_bucket{le="+Inf"} 4',
    ]
    assert lines[4] == "x_sum 2.105" and lines[5] == "x_count 4"


# -------------------------------------------------------------------------------------------- OpenAPI


def test_openapi_lists_the_routes(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/api/sessions": {"post"},
        "/api/sessions/{session_id}": {"get", "delete"},
        "/api/sessions/{session_id}/source": {"put"},
        "/api/sessions/{session_id}/offer": {"post"},
        "/api/config": {"get"},
        "/api/sample-source": {"get"},
        "/healthz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    put = paths["/api/sessions/{session_id}/source"]["put"]
    schema = put["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["file"]["format"] == "binary"
    assert {"413", "415", "422", "404"} <= set(put["responses"])
    assert {"400", "404", "409"} <= set(paths["/api/sessions/{session_id}/offer"]["post"]["responses"])
    assert "503" in paths["/api/sessions"]["post"]["responses"]
    assert "ErrorBody" in spec["components"]["schemas"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    # Swagger UI loads third-party scripts: off unless asked for (docs=True / --docs).
    assert_error(client.get("/docs"), 404, "not_found")
    assert "/api/source-check" in paths and "429" in paths["/api/sessions"]["post"]["responses"]


# ------------------------------------------------------------------------------------------------ CLI


def _serve_args(argv: list[str]) -> argparse.Namespace:
    from server.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_cli_flags_and_environment(monkeypatch):
    from server.cli import settings_from_args

    monkeypatch.setenv("DAGAN_PORT", "9123")
    monkeypatch.setenv("DAGAN_MAX_SESSIONS", "3")
    monkeypatch.setenv("DAGAN_ICE_SERVERS", "stun:stun.example.org:3478,turn:turn.example.org:3478")
    monkeypatch.setenv("DAGAN_ICE_USERNAME", "u")
    monkeypatch.setenv("DAGAN_ICE_CREDENTIAL", "p")
    s = settings_from_args(_serve_args([]))
    assert (s.host, s.port, s.max_sessions) == ("127.0.0.1", 9123, 3)
    assert s.ice_servers == (
        IceServer(("stun:stun.example.org:3478",), "u", "p"),
        IceServer(("turn:turn.example.org:3478",), "u", "p"),
    )
    assert s.ice_host_addresses is None and s.relative is True
    # Flags win over the environment.
    s = settings_from_args(
        _serve_args(
            ["--port", "8080", "--max-sessions", "1", "--ice-host-addresses", "127.0.0.1", "--absolute"]
        )
    )
    assert (s.port, s.max_sessions, s.ice_host_addresses, s.relative) == (8080, 1, ("127.0.0.1",), False)
    monkeypatch.setenv("DAGAN_PORT", "eighty")
    with pytest.raises(SettingsError, match="DAGAN_PORT must be an integer"):
        settings_from_args(_serve_args([]))


def test_ice_server_parsing():
    servers = parse_ice_servers(
        '[{"urls": ["turn:a:3478", "turns:a:5349"], "username": "x", "credential": "y"}]'
    )
    assert servers[0].to_browser() == {
        "urls": ["turn:a:3478", "turns:a:5349"],
        "username": "x",
        "credential": "y",
    }
    assert parse_ice_servers("") == ()
    with pytest.raises(SettingsError, match="must start with stun:"):
        parse_ice_servers("http://example.org")
    with pytest.raises(SettingsError, match="invalid JSON"):
        parse_ice_servers("[{oops")
    with pytest.raises(SettingsError, match="at least 1"):
        ServerSettings(max_sessions=0)


def test_serve_without_weights_says_what_to_do(monkeypatch, tmp_path):
    import dagan.checkpoint
    from server.cli import build_engine

    monkeypatch.delenv("DAGAN_CHECKPOINT", raising=False)
    monkeypatch.setattr(dagan.checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="--untrained-tiny"):
        build_engine(_serve_args([]))


def test_untrained_tiny_engine_is_flagged(capsys):
    from server.cli import build_engine

    engine, untrained = build_engine(_serve_args(["--untrained-tiny", "--device", "cpu"]))
    assert untrained is True and engine.image_size == 64 and engine.backend == "torch"
    assert "UNTRAINED" in capsys.readouterr().err


def test_serve_is_a_dagan_command():
    from commands.cli import build_parser

    args = build_parser().parse_args(["serve", "--untrained-tiny", "--port", "8001"])
    assert args.port == 8001 and args.untrained_tiny and args.func.__name__ == "_cmd_serve"
