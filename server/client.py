"""A Python client of the service's HTTP + WebRTC API: the one every Python caller uses, and the example
of how to drive ``dagan serve`` from a program (docs/server.md, "From Python").

One call is: ``POST /api/sessions`` (with its options; the answer carries the session's ICE servers and,
with a TURN secret, credentials minted for it) → ``PUT /api/sessions/{id}/source`` (the photo, multipart
field ``file``) → a peer connection with exactly those ICE servers, a ``control`` data channel and the
caller's camera track → ``POST /api/sessions/{id}/offer`` (non-trickle: the offer carries every candidate)
→ the answer → avatar frames and per-frame messages until the call ends → ``DELETE``::

    async with ServiceClient("https://host:8000/#token=abc") as service:
        async with await service.call(photo_jpeg, camera_track, on_frame=show) as call:
            call.send({"type": "recalibrate"})
            await call.wait_ended()

A server with an access token gets it as ``Authorization: Bearer`` (``token=`` or the URL's
``#token=`` fragment, the link the page uses). Every refusal raises :class:`ServiceError` with the
server's ``error`` code and ``message``. The peer connection never uses aiortc's public default STUN
server: a list of ICE servers, possibly empty, is always given.

Needs aiortc and httpx (the ``serve`` or ``cam`` extra) and nothing else of the server package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

#: The data channel's label: the server reads control messages and sends per-frame records on it.
CONTROL_CHANNEL = "control"


class ServiceError(httpx.HTTPStatusError):
    """The server refused a request: HTTP ``status``, its machine-readable ``code`` (``no_face``,
    ``server_busy``, ``unauthorized``, ...) and the ``message`` meant for a person. An
    ``httpx.HTTPStatusError``, so ``except httpx.HTTPError`` catches refusals and network errors alike."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            self.code = str(body.get("error", "http_error"))
            message = body.get("message") or body.get("detail") or body
        else:
            self.code, message = "http_error", response.text[:200]
        self.status = response.status_code
        self.message = str(message)
        request = response.request
        super().__init__(
            f"{request.method} {request.url.path}: HTTP {self.status}: {self.message}",
            request=request,
            response=response,
        )


def split_token(url: str) -> tuple[str, str | None]:
    """``https://host:8000/#token=abc`` → (``https://host:8000``, ``abc``); no fragment: (url, None)."""
    parts = urlsplit(url)
    token = parse_qs(parts.fragment).get("token", [None])[0]
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    return base.rstrip("/"), token


def rtc_configuration(ice_servers: Iterable[dict], relay_only: bool = False) -> Any:
    """An ``RTCConfiguration`` with exactly these servers (the server's ``RTCIceServer`` dictionaries;
    malformed entries are skipped): a list, never None, since aiortc's None means a public Google STUN
    server, which a client of a private server must not contact. ``relay_only``: only TURN relay
    candidates (``iceTransportPolicy=relay``)."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy

    servers = []
    for item in ice_servers:
        if not isinstance(item, dict) or "urls" not in item:
            continue
        urls = item["urls"]
        servers.append(
            RTCIceServer(
                urls=[urls] if isinstance(urls, str) else list(urls),
                username=item.get("username"),
                credential=item.get("credential"),
            )
        )
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


async def local_offer(video: bool = True, ice_servers: Iterable[dict] = (), relay_only: bool = False) -> str:
    """The SDP offer a caller would send (a placeholder video track when ``video``, the control data
    channel, every gathered candidate), made without any server and closed again: for tests that send
    offers of their own making."""
    from aiortc import RTCPeerConnection, VideoStreamTrack

    pc = RTCPeerConnection(rtc_configuration(ice_servers, relay_only))
    try:
        if video:
            pc.addTrack(VideoStreamTrack())
        pc.createDataChannel(CONTROL_CHANNEL)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


class ServiceClient:
    """The HTTP half: one ``httpx.AsyncClient`` for a server, with the bearer token on every request.

    ``url`` may carry the token as ``#token=...``; an explicit ``token`` wins. ``http``: use this
    client (its base URL and settings) instead of making one; it is then not closed here.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        verify: bool = True,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        url_token = None
        if url is not None:
            url, url_token = split_token(url)
        self.token = token or url_token
        self.headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if http is None:
            if url is None:
                raise ValueError("ServiceClient needs the server's url or an httpx.AsyncClient")
            http = httpx.AsyncClient(base_url=url, verify=verify, timeout=timeout)
            self._owned = True
        else:
            self._owned = False
        self.http = http
        self.url = url or str(http.base_url).rstrip("/")

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with the token; raises :class:`ServiceError` on a 4xx/5xx answer."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = await self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            raise ServiceError(response)
        return response

    # -- the API, one method per route -------------------------------------------------------------
    async def config(self) -> dict:
        """``GET /api/config``: ICE servers, model and picture sizes, limits."""
        return (await self.request("GET", "/api/config")).json()

    async def health(self) -> dict:
        """``GET /healthz``: status, backend, device, sessions in use."""
        return (await self.request("GET", "/healthz")).json()

    async def create_session(self, **options: Any) -> dict:
        """``POST /api/sessions`` with the session's options (relative, show_depth, picture,
        auto_neutral; omitted ones take the server's defaults): the new session with its ICE servers."""
        return (await self._create(options))[0]

    async def _create(self, options: dict) -> tuple[dict, str | None]:
        response = await self.request("POST", "/api/sessions", json=options)
        return response.json(), response.headers.get("x-dagan-replica")

    async def upload_source(self, session_id: str, photo: bytes, filename: str = "source.jpg") -> dict:
        """``PUT /api/sessions/{id}/source``: the photo (JPEG, PNG, WebP) as multipart field ``file``;
        the server's size and face box of it."""
        files = {"file": (filename, photo, "image/jpeg")}
        return (await self.request("PUT", f"/api/sessions/{session_id}/source", files=files)).json()

    async def session(self, session_id: str) -> dict:
        """``GET /api/sessions/{id}``: state and frame counters."""
        return (await self.request("GET", f"/api/sessions/{session_id}")).json()

    async def send_offer(self, session_id: str, sdp: str) -> str:
        """``POST /api/sessions/{id}/offer``: the SDP answer to this offer."""
        body = {"sdp": sdp, "type": "offer"}
        return (await self.request("POST", f"/api/sessions/{session_id}/offer", json=body)).json()["sdp"]

    async def delete_session(self, session_id: str) -> None:
        """``DELETE /api/sessions/{id}``: end the session and free its slot."""
        await self.request("DELETE", f"/api/sessions/{session_id}")

    # -- the whole sequence ----------------------------------------------------------------------------
    async def call(
        self,
        photo: bytes,
        track: Any,
        *,
        options: dict | None = None,
        on_frame: Callable[[Any], None] | None = None,
        on_message: Callable[[Any], None] | None = None,
        relay_only: bool = False,
        codec: str | None = None,
    ) -> Call:
        """A session with ``photo`` animated by ``track`` (an aiortc video track: the camera), connected.

        ``on_frame(av.VideoFrame)`` gets every avatar frame as it is decoded; ``on_message(message)``
        every data-channel message (the decoded JSON, or the text when it is not JSON). ``relay_only``
        restricts ICE to TURN relays; ``codec`` (e.g. ``"video/VP8"``) makes the video use that codec
        only, for a track that sends pre-encoded packets. Raises :class:`ServiceError` on a refusal
        (the session, if one was made, is deleted first).
        """
        body, replica = await self._create(options or {})
        ice = body.get("ice_servers")
        if ice is None:  # the session's own list carries its TURN credentials; the page's is a fallback
            ice = (await self.config()).get("ice_servers", [])
        call = Call(self, body, replica, ice, relay_only, on_frame, on_message)
        try:
            await self.upload_source(call.session_id, photo)
            await call._connect(track, codec)
        except BaseException:
            await call.close()
            raise
        return call


class Call:
    """One live call: its session (``session_id``, the server's ``session`` body, the ``replica`` that
    answered, the ``ice_servers`` used), the peer connection ``pc`` and data channel ``channel``, and
    ``frames_received`` / ``last_frame_at`` (``time.monotonic()``) of the avatar track. Made by
    :meth:`ServiceClient.call`; ``async with`` closes it."""

    def __init__(
        self,
        service: ServiceClient,
        session: dict,
        replica: str | None,
        ice_servers: list[dict],
        relay_only: bool,
        on_frame: Callable[[Any], None] | None,
        on_message: Callable[[Any], None] | None,
    ) -> None:
        from aiortc import RTCPeerConnection

        self.service = service
        self.session = session
        self.session_id: str = session["id"]
        self.replica = replica
        self.ice_servers = ice_servers
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers, relay_only))
        self.channel: Any = None
        self.frames_received = 0
        self.last_frame_at: float | None = None
        self._on_frame = on_frame
        self._on_message = on_message
        self._readers: list[asyncio.Task] = []
        self._ended = asyncio.Event()
        self._closed = False

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self, track: Any, codec: str | None) -> None:
        from aiortc import RTCRtpSender, RTCSessionDescription

        pc = self.pc
        self.channel = pc.createDataChannel(CONTROL_CHANNEL)
        self.channel.on("message", self._message)

        @pc.on("track")
        def on_track(remote: Any) -> None:
            if remote.kind == "video":
                self._readers.append(asyncio.ensure_future(self._read(remote)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._ended.set()

        if codec is None:
            pc.addTrack(track)
        else:
            transceiver = pc.addTransceiver(track, direction="sendrecv")
            wanted = [
                c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == codec.lower()
            ]
            transceiver.setCodecPreferences(wanted)
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self.service.send_offer(self.session_id, pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    def _message(self, message: Any) -> None:
        if self._on_message is None:
            return
        try:
            decoded = json.loads(message)
        except (TypeError, ValueError):
            decoded = message
        self._on_message(decoded)

    async def _read(self, remote: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await remote.recv()
                self.frames_received += 1
                self.last_frame_at = time.monotonic()
                if self._on_frame is not None:
                    self._on_frame(frame)
        except MediaStreamError:
            pass
        finally:
            self._ended.set()

    def send(self, message: str | bytes | dict) -> bool:
        """Send a control message (a dict is sent as JSON); False when the channel is not open."""
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        channel.send(json.dumps(message) if isinstance(message, dict) else message)
        return True

    async def wait_open(self, timeout: float = 20.0) -> None:
        """Until the data channel is open (the call's transport is up); TimeoutError after ``timeout``."""

        async def opened() -> None:
            while self.channel is None or self.channel.readyState != "open":
                await asyncio.sleep(0.05)

        await asyncio.wait_for(opened(), timeout)

    async def wait_ended(self) -> None:
        """Until the connection failed or closed, or the avatar track ended."""
        await self._ended.wait()

    async def hang_up(self) -> None:
        """Close the peer connection without telling the HTTP API (the server sees the peer go)."""
        await self.pc.close()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def close(self) -> None:
        """Hang up and delete the session (a session already gone is not an error); idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.hang_up()
        with contextlib.suppress(httpx.HTTPError):
            await self.service.delete_session(self.session_id)
