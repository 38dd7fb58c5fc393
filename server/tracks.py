"""aiortc glue: the task that feeds a peer's webcam into its latest-frame slot, the avatar track, the ICE
host addresses and the encoder settings (the aiortc/aioice internals these need are in server.compat).

Nothing here touches pixels: decoded ``av.VideoFrame`` objects go into the slot as they are (the worker
thread converts them), and the worker hands back ready ``av.VideoFrame`` objects, so the event loop only
moves references and stamps timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .compat import override_encoder_options, replace_host_addresses
from .sessions import InputFrame, LiveSession, OutputFrame

log = logging.getLogger("dagan.server")

VIDEO_CLOCK = 90_000  # RTP clock rate of video (RFC 3551)
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


async def consume_input(
    session: LiveSession, track: MediaStreamTrack, on_frame: Callable[[bool], None]
) -> None:
    """Move every decoded frame of ``track`` into the session's latest-frame slot until the track ends.

    ``on_frame(dropped)`` is called per frame (metrics and waking the worker). The frame's ``pts`` is the
    receiver's RTP-derived timestamp (90 kHz, 0 at the first frame received), which the avatar frame made
    from it reports back over the data channel as ``src_pts``.
    """
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        now = time.monotonic()
        session.last_input = now
        dropped = session.input.put(InputFrame(frame, frame.pts, now))
        on_frame(dropped)


class AvatarTrack(MediaStreamTrack):
    """The outgoing video: the newest avatar frame the worker delivered, timestamped on the 90 kHz clock.

    Timestamps follow wall time since the first frame sent (so the receiver's RTP-derived ``pts`` of
    frame *n* equals the ``pts`` this track stamped on it), and a frame is sent as soon as it exists
    rather than on a fixed 30 fps beat: the rate is whatever the model achieves and a viewer never waits
    for a tick. ``deliver`` is thread-safe; a frame not yet picked up by the encoder when a newer one
    arrives is replaced (counted by ``on_drop``).
    """

    kind = "video"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_sent: Callable[[OutputFrame, int], None] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._pending: OutputFrame | None = None
        self._event = asyncio.Event()
        self._t0: float | None = None
        self._last_pts = -1
        self._on_sent = on_sent
        self._on_drop = on_drop
        self.sent = 0

    def deliver(self, item: OutputFrame) -> None:
        """Called from the worker thread."""
        if self.readyState == "live" and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
                self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: OutputFrame) -> None:
        if self._pending is not None and self._on_drop is not None:
            self._on_drop()
        self._pending = item
        self._event.set()

    async def recv(self) -> Any:
        while self._pending is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._event.clear()
            await self._event.wait()
        if self.readyState != "live":
            raise MediaStreamError
        item, self._pending = self._pending, None
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        pts = max(round((now - self._t0) * VIDEO_CLOCK), self._last_pts + 1)
        self._last_pts = pts
        frame = item.frame
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self.sent += 1
        if self._on_sent is not None:
            self._on_sent(item, pts)
        return frame

    def stop(self) -> None:
        super().stop()
        self._event.set()  # wake a pending recv so the sender sees the end


def send_json(channel: Any, message: dict) -> bool:
    """Send ``message`` on an open data channel; False (and nothing raised) when it is not open."""
    if channel is None or channel.readyState != "open":
        return False
    try:
        channel.send(json.dumps(message, separators=(",", ":")))
    except Exception:  # a channel closing under us is not an error of the frame path
        return False
    return True


@contextlib.contextmanager
def host_candidates(addresses: Iterable[str] | None) -> Iterator[None]:
    """Restrict the ICE host candidates of every peer connection in this process to ``addresses``.

    aioice offers every non-loopback interface address and cannot be told otherwise per connection, so
    this replaces its address lookup while the service runs (server.compat). ``("127.0.0.1",)`` keeps all
    media on the loopback interface (same-machine use and the tests); a LAN address pins a multi-homed
    host to one network. ``None`` leaves aioice's default.
    """
    if addresses is None:
        yield
        return
    chosen = list(addresses)

    def restricted(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    with replace_host_addresses(restricted):
        yield


#: Encoder options merged over aiortc's own for the avatar video (``python -m bench.server`` and
#: runs/enc measurements in docs/benchmarks.md, 256² avatar frames at 500 kbit/s, one thread):
#: libvpx without its denoiser (``noise-sensitivity`` 4 smooths a picture that a network made, at a
#: cost) and ``cpu-used`` -10 instead of -6: 1.63 → 1.08 ms of CPU per frame, 39.5 → 40.0 dB;
#: libx264 ``superfast`` instead of its default preset (medium) under ``zerolatency``: 6.5 → 1.0 ms,
#: 40.6 → 39.7 dB.
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libvpx": {"cpu-used": "-10", "noise-sensitivity": "0"},
    "libx264": {"preset": "superfast"},
}

_tuned = False


def tune_encoders(options: dict[str, dict[str, str]] | None = None) -> None:
    """Make aiortc's VP8 and H.264 encoders (once per process) open their codecs with
    :data:`ENCODER_OPTIONS` merged over aiortc's settings (bitrate control, keyframes, packetisation
    untouched); how is :func:`server.compat.override_encoder_options`."""
    global _tuned
    if _tuned:
        return
    override_encoder_options(ENCODER_OPTIONS if options is None else options)
    _tuned = True
