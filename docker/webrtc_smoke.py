#!/usr/bin/env python3
"""A real WebRTC call against a running ``dagan serve`` (the container in CI), as a viewer makes it.

Uses only the server's public API through its Python client (``server.client``, as ``dagan cam`` does):
create a session, upload a photo, send an SDP offer with a camera track (a real face photo moving:
``dagan.samples.driving_frames``) and the control data channel, then count the avatar frames that come
back. Prints one JSON line with what
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
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from server.client import ServiceClient, ServiceError

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


async def call(url: str, photo: np.ndarray, want: int, timeout: float, token: str | None) -> dict:
    """One session end to end; returns the measurements (frames received, timings, frame size)."""
    from dagan.samples import driving_frames

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert ok
    received: list[np.ndarray] = []
    done = asyncio.Event()
    t0 = time.monotonic()
    first_at: float | None = None

    def on_frame(frame: VideoFrame) -> None:
        nonlocal first_at
        if len(received) >= want:
            return
        if first_at is None:
            first_at = time.monotonic()
        received.append(frame.to_ndarray(format="rgb24"))
        if len(received) >= want:
            done.set()

    try:
        async with ServiceClient(url, token, timeout=60) as service:
            health = await service.health()
            if token:  # the token must have reached the server: a call without it is refused
                async with ServiceClient(url, timeout=60) as anonymous:
                    try:
                        await anonymous.create_session()
                        refused = 201
                    except ServiceError as err:
                        refused = err.status
                if refused != 401:
                    raise SystemExit(f"webrtc_smoke: a session without the token got HTTP {refused}, not 401")
            track = MovingFaceTrack(driving_frames(photo, num_frames=50, size=160, amplitude=1.5))
            async with await service.call(jpeg.tobytes(), track, on_frame=on_frame):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout)
    except ServiceError as err:
        raise SystemExit(f"webrtc_smoke: {err}") from err
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
