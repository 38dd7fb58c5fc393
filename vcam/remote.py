"""Remote mode of ``dagan cam``: a WebRTC client of ``dagan serve``, so a laptop without a GPU can use a
server's. The webcam goes up as a video track; the avatar track comes back and is written to the virtual
camera. Both directions keep only the newest frame, and the client reconnects (new session, source
uploaded again) whenever the connection fails or the server restarts.

The call itself is :class:`server.client.ServiceClient`'s: the peer connection uses exactly the ICE
servers the server hands out (the session's own time-limited TURN credentials), never aiortc's public
default STUN server. A server with an access token gets it as ``Authorization: Bearer``: from ``token=``,
``$DAGAN_ACCESS_TOKEN`` or the URL's fragment (``https://host:8000/#token=...``, the same link the page
uses).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
from typing import Any

import cv2
import numpy as np

from dagan.errors import UserError
from dagan.latest import LatestSlot
from server.client import ServiceClient, ServiceError, split_token

from .pipeline import stepped_mouth_gain

log = logging.getLogger(__name__)


class RemoteError(UserError):
    """The server refused the session or the photo (busy, no face, bad URL, wrong access token)."""


#: HTTP statuses that are the server's answer to this client (reported as a refusal); any other failure
#: is a network error or a restart (retried as a lost connection).
REFUSALS = (401, 403, 413, 415, 422, 429, 503)


def _camera_track_class():
    from aiortc import VideoStreamTrack
    from av import VideoFrame

    class CameraTrack(VideoStreamTrack):
        """Sends the newest webcam frame at the track's own clock (no queue: stale frames are skipped)."""

        def __init__(self, slot: LatestSlot[np.ndarray]) -> None:
            super().__init__()
            self.slot = slot
            self.last: np.ndarray | None = None

        async def recv(self) -> VideoFrame:
            pts, time_base = await self.next_timestamp()
            frame = self.slot.take()
            while frame is None and self.last is None:
                await asyncio.sleep(0.005)
                frame = self.slot.take()
            if frame is not None:
                self.last = frame
            out = VideoFrame.from_ndarray(self.last, format="rgb24")
            out.pts, out.time_base = pts, time_base
            return out

    return CameraTrack


class RemoteAnimator:
    """The :class:`~vcam.pipeline.Animator` interface over a remote server.

    ``process`` never waits for the network: it posts the frame and returns the newest avatar received so
    far (None until the first one), so the camera loop keeps its pace whatever the round-trip time.
    """

    def __init__(
        self,
        server: str,
        photo: np.ndarray,
        relative: bool = True,
        verify_tls: bool = True,
        reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 10.0,
        token: str | None = None,
        picture: str = "crop",
        auto_neutral: bool = False,
        mouth_gain: float | None = None,
    ) -> None:
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
        )
        if not ok:
            raise RemoteError("could not encode the source photo as JPEG")
        self.server, url_token = split_token(server)
        self.token = token or url_token or os.environ.get("DAGAN_ACCESS_TOKEN") or None
        self.photo_jpeg = jpeg.tobytes()
        self.relative = relative
        # The session's options: only what differs from the server's defaults is sent, so a server that
        # predates them still accepts the session.
        self.session_options: dict[str, Any] = {"relative": relative}
        if picture != "crop":
            self.session_options["picture"] = picture
        if auto_neutral:
            self.session_options["auto_neutral"] = True
        if mouth_gain is not None:
            self.session_options["mouth_gain"] = mouth_gain
        self.verify_tls = verify_tls
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.outgoing: LatestSlot[np.ndarray] = LatestSlot()
        self._avatar: np.ndarray | None = None
        self._avatar_lock = threading.Lock()
        self.avatars_received = 0
        self.server_mouth_gain: float | None = None  # the served model's own, from GET /api/config
        self.connections = 0
        self.last_error: str | None = None
        self.ice_servers: list[dict] | None = None  # what the last peer connection was configured with
        self.delays: collections.deque[float] = collections.deque(maxlen=32)  # back-off waits, newest last
        self._good_session = False
        self._call: Any = None  # server.client.Call while connected
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webrtc", daemon=True)
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    # -- Animator interface -------------------------------------------------------------------------
    def process(self, frame: np.ndarray) -> np.ndarray | None:
        self.outgoing.put(frame)
        with self._avatar_lock:
            return self._avatar

    def recalibrate(self) -> None:
        self._loop.call_soon_threadsafe(self._send_control, "recalibrate")

    def step_mouth_gain(self, steps: int) -> float | None:
        """From the gain this client asked for, else the server model's own (``GET /api/config``, read
        at each connection): the new gain goes to the server as a ``mouth_gain`` message and into the
        session options, so a reconnection keeps it."""
        current = self.session_options.get("mouth_gain", self.server_mouth_gain)
        if current is None:
            log.warning("the server's model has no mouth gain to set (or the server was not reached yet)")
            return None
        gain = stepped_mouth_gain(current, steps)
        self.session_options["mouth_gain"] = gain
        self._loop.call_soon_threadsafe(self._send_control, {"type": "mouth_gain", "value": gain})
        return gain

    def close(self) -> None:
        """Hang up (the server frees the session) and stop the network thread."""
        self._closing = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        """Cancel every task of the network loop and let their clean-up (pc.close, DELETE) finish."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- connection -------------------------------------------------------------------------------
    def _send_control(self, message: str | dict) -> None:
        if self._call is not None:
            self._call.send(message)

    async def _run(self) -> None:
        delay = self.reconnect_delay
        while not self._closing:
            self._good_session = False
            try:
                await self._session_once()
            except asyncio.CancelledError:
                raise
            except RemoteError as exc:
                self.last_error = str(exc)
                log.error("server refused the session: %s", exc)
            except Exception as exc:  # network errors, server restarts: retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("connection to %s lost (%s); reconnecting in %.1f s", self.server, exc, delay)
            if self._closing:
                return
            if self._good_session:  # avatars came back: the next failure starts the back-off again
                delay = self.reconnect_delay
            self.delays.append(delay)
            await asyncio.sleep(delay)
            delay = min(self.max_reconnect_delay, delay * 2)

    async def _session_once(self) -> None:
        async with ServiceClient(self.server, self.token, verify=self.verify_tls, timeout=30) as service:
            try:
                self.server_mouth_gain = (await service.config()).get("mouth_gain")
                call = await service.call(
                    self.photo_jpeg,
                    _camera_track_class()(self.outgoing),
                    options=self.session_options,
                    on_frame=self._on_avatar,
                )
            except ServiceError as err:
                raise (RemoteError if err.status in REFUSALS else ConnectionError)(str(err)) from err
            self.ice_servers = call.ice_servers
            self._call = call
            self.connections += 1
            log.info("connected to %s (session %s)", self.server, call.session_id)
            try:
                await call.wait_ended()
            finally:
                self._call = None
                await call.close()
            raise ConnectionError("the avatar stream ended")

    def _on_avatar(self, frame: Any) -> None:
        image = frame.to_ndarray(format="rgb24")
        with self._avatar_lock:
            self._avatar = image
        self.avatars_received += 1
        self._good_session = True
