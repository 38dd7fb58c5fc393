#!/usr/bin/env python3
"""A real WebRTC call against a running ``dagan serve`` (the container in CI), as a viewer makes it.

Uses only the server's public API, like the browser page and ``dagan cam`` do: create a session, upload a
photo, send an SDP offer with a camera track (a real face photo moving: ``dagan.samples.driving_frames``)
and a control data channel, then count the avatar frames that come back. Prints one JSON line with what
it saw and exits 0 only if at least ``--frames`` avatar frames arrived within ``--timeout`` seconds and
they are real pictures (the right size, not all one colour).

Runs on the host, in the project's virtual environment (aiortc, httpx, numpy, opencv): scripts/ci_docker.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import sys
import time

import cv2
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

FPS = 25


class MovingFaceTrack(MediaStreamTrack):
    """A paced camera stand-in that loops over pre-rendered frames at ``FPS``."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray]) -> None:
        super().__init__()
        self.frames, self.i, self.t0 = frames, 0, None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
        await asyncio.sleep(max(0.0, self.t0 + self.i / FPS - time.monotonic()))
        frame = VideoFrame.from_ndarray(self.frames[self.i % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = self.i * (90_000 // FPS), fractions.Fraction(1, 90_000)
        self.i += 1
        return frame


def _check(resp: httpx.Response, what: str) -> dict:
    if resp.status_code >= 400:
        raise SystemExit(f"webrtc_smoke: {what}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else {}


async def call(url: str, photo: np.ndarray, want: int, timeout: float, token: str | None) -> dict:
    """One session end to end; returns the measurements (frames received, timings, frame size)."""
    from dagan.samples import driving_frames

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert ok
    received: list[np.ndarray] = []
    done = asyncio.Event()
    t0 = time.monotonic()
    first_at: float | None = None
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        health = _check(await http.get("/healthz"), "GET /healthz")
        if token:  # the token must have reached the server: a call without it is refused
            async with httpx.AsyncClient(base_url=url, timeout=60) as anonymous:
                refused = (await anonymous.post("/api/sessions", json={})).status_code
            if refused != 401:
                raise SystemExit(f"webrtc_smoke: a session without the token got HTTP {refused}, not 401")
        sid = _check(await http.post("/api/sessions", json={}), "POST /api/sessions")["id"]
        files = {"file": ("photo.jpg", jpeg.tobytes(), "image/jpeg")}
        _check(await http.put(f"/api/sessions/{sid}/source", files=files), "PUT source")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        reader: asyncio.Task | None = None
        try:
            pc.createDataChannel("control")
            pc.addTrack(MovingFaceTrack(driving_frames(photo, num_frames=50, size=160, amplitude=1.5)))

            @pc.on("track")
            def on_track(track) -> None:
                nonlocal reader

                async def read() -> None:
                    nonlocal first_at
                    with contextlib.suppress(MediaStreamError):
                        while len(received) < want:
                            frame = await track.recv()
                            if first_at is None:
                                first_at = time.monotonic()
                            received.append(frame.to_ndarray(format="rgb24"))
                    done.set()

                reader = asyncio.ensure_future(read())

            await pc.setLocalDescription(await pc.createOffer())
            answer = _check(
                await http.post(
                    f"/api/sessions/{sid}/offer",
                    json={"sdp": pc.localDescription.sdp, "type": pc.localDescription.type},
                ),
                "POST offer",
            )
            await pc.setRemoteDescription(RTCSessionDescription(**answer))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            await pc.close()
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            with contextlib.suppress(httpx.HTTPError):
                await http.delete(f"/api/sessions/{sid}")
    end = time.monotonic()
    shapes = sorted({f.shape for f in received})
    stds = [float(f.std()) for f in received]
    span = (end - first_at) if first_at is not None and len(received) > 1 else 0.0
    return {
        "frames": len(received),
        "wanted": want,
        "first_frame_s": round(first_at - t0, 2) if first_at is not None else None,
        "fps": round((len(received) - 1) / span, 1) if span > 0 else None,
        "frame_shapes": [list(s) for s in shapes],
        "min_pixel_std": round(min(stds), 2) if stds else None,
        "server": {k: health.get(k) for k in ("status", "backend", "device", "untrained") if k in health},
        "token_required": bool(token),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--frames", type=int, default=30, help="avatar frames that must arrive (default 30)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for them")
    p.add_argument("--token", help="bearer token, when the server requires one (DAGAN_ACCESS_TOKEN)")
    p.add_argument("--photo", help="source photo (default: matplotlib's Grace Hopper portrait)")
    args = p.parse_args(argv)
    from dagan.media import load_image
    from dagan.samples import grace_hopper

    photo = load_image(args.photo) if args.photo else grace_hopper()
    result = asyncio.run(call(args.url.rstrip("/"), photo, args.frames, args.timeout, args.token))
    print(json.dumps(result), flush=True)
    if result["frames"] < args.frames:
        got = result["frames"]
        print(f"webrtc_smoke: only {got} of {args.frames} avatar frames arrived", file=sys.stderr)
        return 1
    if result["min_pixel_std"] is not None and result["min_pixel_std"] < 1.0:
        print("webrtc_smoke: an avatar frame is a flat colour, not a picture", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
