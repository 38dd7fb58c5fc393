"""The HTTP + WebRTC service: ``create_app(settings, engine)`` returns the FastAPI app.

Flow of one viewer: ``POST /api/sessions`` reserves a slot, ``PUT /api/sessions/{id}/source`` uploads the
photo (decoded, size-checked and face-cropped off the event loop; the engine caches the source once),
``POST /api/sessions/{id}/offer`` exchanges SDP (non-trickle: the answer carries all ICE candidates), and
media flows until ``DELETE``, a hang-up, or the peer going silent. Every refusal is a JSON body
``{"error": code, "message": text, "status": http_status}`` so the page can show the message as is.

Everything an untrusted client can send is bounded before it is parsed (docs/security.md): request bodies
and headers by :class:`server.guard.RequestGuard` and the uvicorn protocol, photos by their header before
decoding and by a cap on concurrent decodes, offers by their size and media count, data-channel messages
by their size; every failure is a 4xx JSON error and never touches other sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dagan.face import NoFaceError, locate_source
from dagan.paste import DEFAULT_MASK, plan_paste
from dagan.smoothing import OneEuroFilter
from engine import Engine
from engine.paste import Paster

from .guard import Bucket, RequestGuard, TokenBucket, check_ice_candidates, client_key, ice_servers_for
from .metrics import CONTENT_TYPE, Metrics
from .pipeline import instrument_codecs
from .sessions import (
    ClientLimitError,
    LiveSession,
    OutputFrame,
    ServerBusyError,
    SessionNotFoundError,
    SessionRegistry,
)
from .settings import ServerSettings
from .tracks import AvatarTrack, consume_input, host_candidates, send_json
from .worker import InferenceWorker

log = logging.getLogger("dagan.server")
#: The automatic neutral pose's window (seconds) for a session that asks for it when the server's own
#: setting (--auto-neutral) is off.
AUTO_NEUTRAL_S = 2.0


class ApiError(Exception):
    """An HTTP error with a stable machine-readable ``code`` and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers  # e.g. Retry-After on a 429


# ------------------------------------------------------------------------------------------- schemas


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. no_face, server_busy, not_an_image")
    message: str = Field(description="one sentence for the user")
    status: int


class SessionOptions(BaseModel):
    relative: bool | None = Field(
        None, description="relative motion transfer (default: the server's setting, normally true)"
    )
    show_depth: bool = Field(False, description="send the driving depth map beside the avatar")
    picture: Literal["crop", "full"] | None = Field(
        None,
        description="crop: the model's face crop; full: the avatar pasted back into the whole photo, "
        "fitted to the server's picture size (default: the server's setting, normally crop)",
    )
    auto_neutral: bool | None = Field(
        None,
        description="choose the neutral pose automatically: the frame closest to the photo's pose in the "
        "first seconds (default: the server's setting, normally off)",
    )


class IceServerInfo(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class SessionInfo(BaseModel):
    id: str
    relative: bool
    show_depth: bool
    has_source: bool
    connected: bool
    frames_in: int
    frames_dropped: int
    frames_out: int
    picture: str = "crop"


class NewSession(SessionInfo):
    ice_servers: list[IceServerInfo] = Field(
        description="RTCIceServer list for this session's peer connection; TURN credentials in it are "
        "minted for this session and expire (TURN REST API)"
    )


class CheckedSource(BaseModel):
    width: int = Field(description="uploaded photo width in pixels")
    height: int
    face_box: dict[str, float] = Field(description="square crop around the face: cx, cy, size (pixels)")


class SourceInfo(CheckedSource):
    id: str


class SdpMessage(BaseModel):
    sdp: str = Field(min_length=1)
    type: Literal["offer", "answer"]


# OpenAPI request body of the two photo routes (they read the multipart stream themselves, so FastAPI
# cannot infer it): one field 'file'.
_PHOTO_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            }
        },
    }
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


# ------------------------------------------------------------------------------------------ images


#: Formats Pillow may try (JPEG includes the MPO files many phones write). Fewer parsers, less attack surface.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def _too_large(width: int, height: int, max_side: int) -> ApiError:
    return ApiError(
        413,
        "image_too_large",
        f"the photo is {width}×{height} pixels; the limit is {max_side}×{max_side}, please scale it down",
    )


def _to_rgb(image: Any) -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8. 16-bit and 32-bit grey are scaled to 8 bits first: Pillow's own
    conversion clips them (a 16-bit photo comes out almost all white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def decode_upload(data: bytes, max_side: int) -> np.ndarray:
    """Uploaded bytes → H×W×3 uint8 RGB, refusing non-images (415) and oversized pictures (413).

    The size is read from the header before any pixel is decoded, so a small file that claims
    60000×60000 pixels is refused without allocating them (Pillow's own decompression-bomb refusal, which
    it raises while opening such a file, is the same 413). EXIF orientation is applied, as phone photos
    are often stored sideways.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(415, "not_an_image", "the uploaded file is empty; choose a photo (JPEG, PNG or WebP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the side limit decides
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise ApiError(
            413, "image_too_large", f"the photo has far too many pixels; the limit is {max_side}×{max_side}"
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise ApiError(
            415,
            "not_an_image",
            "the uploaded file is not an image this server can read (use JPEG, PNG or WebP)",
        ) from err
    width, height = image.size
    if width > max_side or height > max_side:
        raise _too_large(width, height, max_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.width > max_side or image.height > max_side:  # pragma: no cover - transposes only
                raise _too_large(image.width, image.height, max_side)
            rgb = _to_rgb(image)
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise _too_large(width, height, max_side) from err
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as err:
        raise ApiError(415, "not_an_image", "the image file is corrupt or truncated") from err
    except MemoryError as err:  # pragma: no cover - the side limit keeps decodes well below this
        raise _too_large(width, height, max_side) from err
    if rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise ApiError(
            422, "no_face", f"the photo is only {rgb.shape[1]}×{rgb.shape[0]} pixels: no face fits"
        )
    return np.ascontiguousarray(rgb)


def sample_source_jpeg() -> bytes:
    """The default photo the page starts with (scikit-image's astronaut portrait, available offline)."""
    import cv2

    from dagan.samples import astronaut

    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 image
        raise RuntimeError("could not encode the sample photo")
    return buf.tobytes()


# -------------------------------------------------------------------------------------------- offers

_CONTROL_CHARS = {chr(c) for c in range(32)} - {"\r", "\n", "\t"} | {"\x7f"}


def check_sdp(sdp: str, max_media: int, max_candidates: int = 32) -> None:
    """Cheap checks before aiortc parses an offer: SDP text, a video section, a bounded media count.

    Each m= section costs aiortc a transceiver with its own ICE and DTLS transports (UDP sockets), so a
    64 KB offer with hundreds of them must not get that far.
    """
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it must start with v=0 and offer a video track")
    if any(ch in _CONTROL_CHARS for ch in sdp):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it contains control characters")
    media = [line for line in sdp.splitlines() if line.startswith("m=")]
    if not any(line.startswith("m=video ") for line in media):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it must offer a video track (m=video)")
    if len(media) > max_media:
        raise ApiError(
            400, "bad_sdp", f"the SDP offer has {len(media)} media sections; at most {max_media} are accepted"
        )
    # Every candidate field, since aiortc only int()s them (server.guard.check_ice_candidates).
    problem = check_ice_candidates(sdp, max_candidates)
    if problem is not None:
        raise ApiError(400, "bad_sdp", f"malformed SDP offer: {problem}")
    # What aiortc accepts here but fails on later, in a background task, leaving a dead call behind a
    # 200: every section needs its ICE credentials, a DTLS fingerprint and a mid of its own.
    from aiortc.sdp import SessionDescription

    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as err:
        raise ApiError(400, "bad_sdp", f"malformed SDP offer ({type(err).__name__})") from err
    mids = [m.rtp.muxId for m in parsed.media]
    if len(set(mids)) != len(mids) or not all(mids):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: every media section needs its own a=mid")
    for m in parsed.media:
        if not (m.ice and m.ice.usernameFragment and m.ice.password):
            missing = "ICE credentials"
        elif not (m.dtls and m.dtls.fingerprints):
            missing = "DTLS fingerprint"
        else:
            continue
        raise ApiError(400, "bad_sdp", f"malformed SDP offer: the {m.kind} section has no {missing}")


async def close_quietly(pc: Any) -> None:
    """Close a peer connection that may be half-built (a refused offer) without ever raising.

    aiortc's ``close`` can fail part-way on a connection whose remote description was rejected mid-way;
    the transports it did create are then stopped one by one so no UDP socket is left open.
    """
    pc.remove_all_listeners()  # its "closed" state must not end the session it failed to join
    try:
        await asyncio.wait_for(pc.close(), 5)
        return
    except Exception as err:
        log.debug("closing a half-built peer connection: %s: %s", type(err).__name__, err)
    for transceiver in list(getattr(pc, "_RTCPeerConnection__transceivers", [])):
        for part in (transceiver.sender, transceiver.receiver):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part.stop(), 2)
        dtls = transceiver.sender.transport if transceiver.sender else None
        with contextlib.suppress(Exception):
            if dtls is not None:
                await asyncio.wait_for(dtls.stop(), 2)
                await asyncio.wait_for(dtls.transport.stop(), 2)
    sctp = getattr(pc, "_RTCPeerConnection__sctp", None)
    if sctp is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sctp.stop(), 2)
            await asyncio.wait_for(sctp.transport.stop(), 2)
            await asyncio.wait_for(sctp.transport.transport.stop(), 2)


# ------------------------------------------------------------------------------------------- service


class AvatarService:
    """Owns the registry, the worker, the peer connections and the clean-up loop of one app."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = SessionRegistry(settings.max_sessions)
        self.metrics = Metrics(
            backend=getattr(engine, "backend", "?"),
            image_size=engine.image_size,
            device=str(getattr(engine, "device", "?")),
            untrained=settings.untrained,
        )
        self.metrics.active_sessions = lambda: len(self.registry)
        self.metrics.max_sessions = settings.max_sessions
        self.metrics.replica = settings.replica_id
        self.worker = InferenceWorker(
            engine,
            self.registry,
            self.metrics,
            settings.output_size,
            pool_size=settings.media_threads,
            detect_every=settings.detect_every,
            detect_processes=settings.detect_processes,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session_limiter = TokenBucket(settings.sessions_per_minute, settings.session_burst_size)
        # Camera frames that cannot be cropped: counted, logged once a minute, the peer told why.
        self.worker.min_video_side = settings.min_video_side
        self.worker.max_video_side = settings.max_video_side
        self.worker.bad_video_notice_s = settings.bad_video_notice_s
        self.worker.on_notice = self.notify
        self.worker.smoothing = settings.smoothing  # the One-Euro filter of each session's crop box
        # Photos are decoded and face-searched on their own few threads: that bounds how many run at once,
        # and only these threads' malloc arenas ever hold a big decoded picture (with asyncio's shared
        # executor every one of its threads kept hundreds of MB after a burst of uploads).
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_concurrent_decodes, thread_name_prefix="decode"
        )
        self._stack = contextlib.ExitStack()
        self._background: set[asyncio.Task] = set()
        self._sample: bytes | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stack.enter_context(host_candidates(self.settings.ice_host_addresses))
        instrument_codecs()  # decode/encode stage timers (server.pipeline)
        self.worker.start()
        self._spawn(self._cleanup_loop())

    async def stop(self) -> None:
        for session in self.registry.snapshot():
            await self.close_session(session.id, "server shutting down")
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.worker.stop)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._stack.close()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- sessions ----------------------------------------------------------------------------------
    def create_session(self, options: SessionOptions, client: str = "?") -> LiveSession:
        """A new session for ``client`` (the address the request guard resolved): 429 over the
        per-address rate or share of the slots, 503 when every slot is taken."""
        relative = self.settings.relative if options.relative is None else options.relative
        key = client_key(client)

        def admit() -> None:  # there is room: within the per-address rate?
            wait = self.session_limiter.take(key)
            if wait > 0:
                self.metrics.count("sessions_limited", "rate")
                seconds = max(1, math.ceil(wait))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many new sessions from this address; try again in {seconds} s",
                    {"Retry-After": str(seconds)},
                )

        try:
            session = self.registry.create(
                relative=relative,
                show_depth=options.show_depth,
                client=key,
                per_client=self.settings.sessions_per_client,
                admit=admit,
            )
        except ClientLimitError as err:
            self.metrics.count("sessions_limited", "per_client")
            raise ApiError(429, "too_many_sessions", str(err), {"Retry-After": "10"}) from err
        except ServerBusyError as err:
            self.metrics.add("sessions_rejected")
            raise ApiError(503, "server_busy", str(err), {"Retry-After": "10"}) from err
        s = self.settings
        session.messages = Bucket(s.messages_per_s, s.message_burst)
        session.picture = options.picture or s.picture
        auto = s.auto_neutral_s > 0 if options.auto_neutral is None else options.auto_neutral
        session.auto_neutral = (s.auto_neutral_s or AUTO_NEUTRAL_S) if auto else 0.0
        self.metrics.add("sessions_created")
        log.info("session %s created (%d/%d)", session.id, len(self.registry), self.settings.max_sessions)
        return session

    def get(self, session_id: str) -> LiveSession:
        try:
            return self.registry.get(session_id)
        except SessionNotFoundError as err:
            raise ApiError(404, "session_not_found", str(err)) from err

    async def decode_and_crop(self, data: bytes) -> tuple[np.ndarray, np.ndarray, Any]:
        """Decode the photo and find its face, at most ``max_concurrent_decodes`` at once.

        A decoded 4096² photo and the face search on it take ~200 MB for a moment; without the bound,
        a dozen parallel uploads took 2 GB. The bound is the decode pool's size, so it holds even for a
        request cancelled meanwhile (its thread runs to the end but no other one starts).
        """
        side = self.settings.max_image_side

        def work() -> tuple[np.ndarray, np.ndarray, Any]:
            rgb = decode_upload(data, side)
            try:
                face = locate_source(rgb)  # the face and its crop box (kept for the paste-back)
            except NoFaceError as err:
                raise ApiError(422, "no_face", str(err)) from err
            return rgb, face.crop_box.crop(rgb, self.engine.image_size), face

        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, work)

    async def check_source(self, data: bytes) -> CheckedSource:
        rgb, _, face = await self.decode_and_crop(data)
        return CheckedSource(width=rgb.shape[1], height=rgb.shape[0], face_box=face.crop_box.to_dict())

    async def set_source(self, session: LiveSession, data: bytes) -> SourceInfo:
        rgb, crop, face = await self.decode_and_crop(data)
        box = face.crop_box
        # The paste-back plan (framed photo, mask) for full-picture frames: per photo, on a decode thread.
        plan = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, plan_paste, rgb, face, crop, self.settings.picture_size, DEFAULT_MASK
        )
        size = (rgb.shape[1], rgb.shape[0])
        del rgb  # only the plan's frame-sized picture of it is kept

        def build() -> None:  # on the worker thread: the engine is only ever used there
            engine_session = self.engine.new_session(crop, relative=session.relative)
            if self.settings.smoothing is not None:
                engine_session.kp_filter = OneEuroFilter(self.settings.smoothing)
            if session.auto_neutral > 0:
                engine_session.choose_neutral_automatically(session.auto_neutral)
            session.paster = Paster(plan, getattr(self.engine, "device", "cpu"))
            session.source_crop = crop
            session.engine_session = engine_session
            session.source_size = size

        await self.worker.call(build)
        if session.closed:  # deleted while the photo was being processed
            session.engine_session = session.source_crop = session.paster = None
            raise ApiError(404, "session_not_found", f"session {session.id!r} ended during the upload")
        return SourceInfo(id=session.id, width=size[0], height=size[1], face_box=box.to_dict())

    async def answer(self, session: LiveSession, offer: SdpMessage) -> SdpMessage:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        if offer.type != "offer":
            raise ApiError(400, "bad_sdp", f"expected an SDP of type 'offer', got {offer.type!r}")
        if session.engine_session is None:
            raise ApiError(
                409, "no_source", "upload a source photo (PUT .../source) before starting the video"
            )
        if session.pc is not None:
            raise ApiError(409, "already_connected", "this session already has a peer; create a new session")
        check_sdp(offer.sdp, self.settings.max_sdp_media, self.settings.max_ice_candidates)
        ice = [
            RTCIceServer(list(s.urls), s.username, s.credential)
            for s in ice_servers_for(self.settings, f"server-{session.id}")
        ]
        # iceServers must be a list, never None: aiortc falls back to a public STUN server on None.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        session.pc = pc
        session.connected_at = time.monotonic()
        assert self.loop is not None
        session.output = AvatarTrack(
            self.loop,
            on_sent=lambda item, pts: self._on_sent(session, item, pts),
            on_drop=self._on_output_drop,
        )
        self._wire(session, pc)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not video:
                raise ValueError("no video media section")
            pc.addTrack(session.output)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as err:
            log.info("session %s: offer refused: %s: %s", session.id, type(err).__name__, err)
            session.pc = None
            if session.output is not None:
                session.output.stop()
            session.output = None
            session.connected_at = None
            await close_quietly(pc)
            if session.closed:
                raise ApiError(404, "session_not_found", f"session {session.id!r} ended") from err
            if isinstance(err, ApiError):
                raise
            text = " ".join(str(err).split())[:120] or type(err).__name__
            raise ApiError(400, "bad_sdp", f"malformed or unsupported SDP offer ({text})") from err
        if session.closed:  # deleted while the answer was made: close_session already ran without it
            await close_quietly(pc)
            raise ApiError(404, "session_not_found", f"session {session.id!r} ended during the offer")
        return SdpMessage(sdp=pc.localDescription.sdp, type="answer")

    def _wire(self, session: LiveSession, pc: Any) -> None:
        sid = session.id

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind != "video":
                return
            task = self._spawn(consume_input(session, track, self._on_input))
            session.tasks.append(task)
            task.add_done_callback(lambda _: self._spawn(self.close_session(sid, "peer hung up")))

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            session.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self.handle_message(session, message)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", sid, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self.close_session(sid, f"connection {pc.connectionState}"))

    def handle_message(self, session: LiveSession, message: Any) -> None:
        """Control messages from the page: ``recalibrate`` and ``{"type": "show_depth", "value": bool}``.

        Runs inside aiortc's SCTP receive path, where an exception would end the whole connection, so
        nothing escapes: an oversized, undecodable or unknown message gets one short error reply that
        never repeats what was sent. Over the session's message rate, messages are dropped before they
        are looked at (counted; the peer is told once): a flood must not cost the call its frames.
        """
        if session.messages is not None and not session.messages.allow():
            session.messages_dropped += 1
            self.metrics.add("messages_dropped")
            if not session.messages_told:
                session.messages_told = True
                rate = self.settings.messages_per_s
                log.warning("session %s: data-channel messages over %g/s are being dropped", session.id, rate)
                send_json(
                    session.channel,
                    {
                        "type": "error",
                        "error": "rate_limited",
                        "message": f"too many control messages: at most {rate:g} a second are read, the "
                        "rest are dropped",
                    },
                )
            return
        try:
            error = self._control(session, message)
        except Exception:  # pragma: no cover - _control handles every input; this guards the DTLS loop
            log.exception("session %s: control message failed", session.id)
            error = ("bad_message", "the control message could not be handled")
        if error is not None:
            code, text = error
            send_json(session.channel, {"type": "error", "error": code, "message": text})

    def _control(self, session: LiveSession, message: Any) -> tuple[str, str] | None:
        limit = self.settings.max_message_bytes
        if not isinstance(message, (str, bytes)):
            return ("bad_message", "control messages are text")
        size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "replace"))
        if len(message) > limit or size > limit:
            return ("message_too_large", f"control messages are limited to {limit} bytes")
        if isinstance(message, bytes):
            try:
                message = message.decode("utf-8")
            except UnicodeDecodeError:
                return ("bad_message", "control messages must be UTF-8 text")
        text = message.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                return ("bad_message", "the control message is not valid JSON")
        else:
            data = {"type": text}
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "recalibrate":
            session.recalibrate = True
            send_json(session.channel, {"type": "recalibrated"})
            return None
        if kind == "show_depth":
            value = data.get("value", True)
            if not isinstance(value, bool):
                return ("bad_message", 'show_depth needs "value": true or false')
            session.show_depth = value
            return None
        if kind == "picture":
            value = data.get("value")
            if value not in ("crop", "full"):
                return ("bad_message", 'picture needs "value": "crop" or "full"')
            session.picture = value
            return None
        return (
            "unknown_message",
            'unknown control message; known types: "recalibrate", "show_depth", "picture"',
        )

    def notify(self, session: LiveSession, message: dict) -> None:
        """Send ``message`` on the session's data channel from any thread (the worker tells the peer
        why its video cannot be used); aiortc's objects are only touched on the event loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(lambda: session.closed or send_json(session.channel, message))

    def _on_input(self, dropped: bool) -> None:
        self.metrics.add("frames_in")
        if dropped:
            self.metrics.drop("input")
        self.worker.wake()

    def _on_output_drop(self) -> None:
        self.metrics.drop("output")

    def _on_sent(self, session: LiveSession, item: OutputFrame, pts: int) -> None:
        server_s = time.monotonic() - item.arrived
        self.metrics.observe_frame(server_s)
        session.frames_out += 1
        # The frame-id side channel: which webcam frame (receiver pts) this avatar frame (pts) came from.
        send_json(
            session.channel,
            {
                "type": "frame",
                "pts": pts,
                "src_pts": item.src_pts,
                "server_ms": round(server_s * 1000, 2),
                "infer_ms": round(item.infer_s * 1000, 2),
                "batch": item.batch,
                "face": item.face,
                "dropped": session.input.dropped,
                "stages": getattr(item, "stages", None),  # wall ms per server stage (server.pipeline)
            },
        )

    async def close_session(self, session_id: str, reason: str) -> bool:
        session = self.registry.pop(session_id)
        if session is None:
            return False
        log.info("session %s closed: %s", session_id, reason)
        current = asyncio.current_task()
        for task in session.tasks:
            if task is not current:
                task.cancel()
        if session.output is not None:
            session.output.stop()
        if session.pc is not None:
            await close_quietly(session.pc)
        session.input.clear()
        session.engine_session = session.source_crop = session.channel = session.pc = None
        session.paster = None
        session.tasks.clear()
        self.worker.wake()  # lets the worker free the session's face tracker now
        return True

    async def _cleanup_loop(self) -> None:
        """Free sessions nobody uses: never connected, peer gone silent, connection failed."""
        s = self.settings
        while True:
            await asyncio.sleep(s.cleanup_interval_s)
            now = time.monotonic()
            for session in self.registry.snapshot():
                if session.pc is None:
                    if now - session.created > s.idle_timeout_s:
                        await self.close_session(
                            session.id, f"no peer connected within {s.idle_timeout_s:g} s"
                        )
                    continue
                since = session.last_input or session.connected_at or now
                if now - since > s.peer_timeout_s:
                    await self.close_session(session.id, f"no video from the peer for {s.peer_timeout_s:g} s")

    def sample(self) -> bytes:
        if self._sample is None:
            self._sample = sample_source_jpeg()
        return self._sample


# ----------------------------------------------------------------------------------------------- app


def create_app(settings: ServerSettings, engine: Engine) -> FastAPI:
    """The ASGI app. The service starts (worker thread, clean-up loop) in the app's lifespan."""
    service = AvatarService(settings, engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="DaGAN live avatar",
        version="0.1.0",
        description="Animate a photo with a webcam over WebRTC. Errors are JSON bodies "
        '`{"error": code, "message": text, "status": http_status}`. With an access token set, every '
        "`/api` route and `/metrics` need `Authorization: Bearer <token>` (docs/security.md).",
        lifespan=lifespan,
        # Swagger UI loads its scripts from a CDN: only on request (--docs), never by default.
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url="/docs/oauth2-redirect" if settings.docs else None,
    )
    app.state.service = service
    app.add_middleware(RequestGuard, settings=settings, metrics=service.metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.code, "message": exc.message, "status": exc.status}
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        text = f"bad request: {where + ': ' if where else ''}{first.get('msg', 'invalid body')}"
        return JSONResponse({"error": "bad_request", "message": text, "status": 400}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            code, text = "not_found", f"no page or API route at {request.url.path}"
        elif exc.status_code == 405:
            code, text = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        else:
            code, text = "http_error", str(exc.detail)
        return JSONResponse({"error": code, "message": text, "status": exc.status_code}, exc.status_code)

    # -- page ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(settings.client_dir / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=settings.client_dir), name="static")

    # -- API -----------------------------------------------------------------------------------------
    @app.get("/api/config", summary="What the page needs: ICE servers, model size, limits")
    async def config() -> dict:
        return {
            # TURN credentials here are minted per request and expire; a session gets its own.
            "ice_servers": [s.to_browser() for s in ice_servers_for(settings, "config")],
            "max_sessions": settings.max_sessions,
            "relative": settings.relative,
            "untrained": settings.untrained,
            "backend": service.metrics.info["backend"],
            "image_size": engine.image_size,
            "output_size": settings.output_size,
            "picture": settings.picture,
            "picture_size": list(settings.picture_size),
            "auto_neutral": settings.auto_neutral_s,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_image_side": settings.max_image_side,
            "max_message_bytes": settings.max_message_bytes,
            "access_token_required": bool(settings.access_token),
        }

    @app.get(
        "/api/sample-source",
        summary="The default source photo (JPEG)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def sample_source() -> Response:
        data = await asyncio.to_thread(service.sample)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post(
        "/api/sessions",
        status_code=201,
        response_model=NewSession,
        summary="Reserve a session slot (and get its ICE servers)",
        responses=_errors(400, 401, 403, 413, 429, 503),
    )
    async def create_session(
        request: Request, response: Response, options: SessionOptions | None = None
    ) -> dict:
        client = request.client.host if request.client else "?"
        session = service.create_session(options or SessionOptions(), client)
        # A load balancer learns the session's owner from these (deploy/haproxy.cfg: stick store-response).
        response.headers["X-Dagan-Session"] = session.id
        response.headers["X-Dagan-Replica"] = settings.replica_id
        ice = [s.to_browser() for s in ice_servers_for(settings, session.id)]
        return {**session.info(), "ice_servers": ice}

    @app.get(
        "/api/sessions/{session_id}",
        response_model=SessionInfo,
        summary="A session's state and frame counters",
        responses=_errors(404),
    )
    async def get_session(session_id: str) -> dict:
        return service.get(session_id).info()

    @app.put(
        "/api/sessions/{session_id}/source",
        response_model=SourceInfo,
        summary="Upload the photo to animate (multipart field 'file'); replaces the previous one",
        responses=_errors(400, 401, 404, 413, 415, 422, 503),
        openapi_extra=_PHOTO_UPLOAD,
    )
    async def put_source(session_id: str, request: Request) -> SourceInfo:
        session = service.get(session_id)
        return await service.set_source(session, await read_photo(request))

    @app.post(
        "/api/source-check",
        response_model=CheckedSource,
        summary="Check a photo (multipart field 'file') without a session: decodable, in limits, a face",
        responses=_errors(400, 401, 413, 415, 422, 503),
        openapi_extra=_PHOTO_UPLOAD,
    )
    async def source_check(request: Request) -> CheckedSource:
        return await service.check_source(await read_photo(request))

    async def read_photo(request: Request) -> bytes:
        """The 'file' field of a multipart upload. The guard has already read the body into memory
        within the upload limit, so parsing it never waits on the network."""
        limit = settings.max_upload_bytes
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                415, "not_multipart", "send the photo as multipart/form-data in a field named 'file'"
            )
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
        except Exception as err:
            text = " ".join(str(err).split())[:120] or type(err).__name__
            raise ApiError(400, "bad_request", f"could not parse the multipart upload ({text})") from err
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "bad_request", "the multipart upload has no file field named 'file'")
            data = await upload.read(limit + 1)
        finally:
            await form.close()
        if len(data) > limit:
            raise ApiError(413, "file_too_large", f"the photo is over the {limit / 2**20:g} MB limit")
        return data

    @app.post(
        "/api/sessions/{session_id}/offer",
        response_model=SdpMessage,
        summary="WebRTC offer → answer (non-trickle ICE: gather candidates before sending)",
        responses=_errors(400, 404, 409),
    )
    async def offer(session_id: str, body: SdpMessage) -> SdpMessage:
        return await service.answer(service.get(session_id), body)

    @app.delete(
        "/api/sessions/{session_id}",
        status_code=204,
        summary="End a session and free it",
        responses=_errors(404),
    )
    async def delete_session(session_id: str) -> Response:
        if not await service.close_session(session_id, "deleted by the client"):
            service.get(session_id)  # raises the 404
        return Response(status_code=204)

    @app.get("/healthz", summary="Liveness and capacity")
    async def healthz() -> dict:
        return {
            "status": "ok",
            "backend": service.metrics.info["backend"],
            "device": service.metrics.info["device"],
            "untrained": settings.untrained,
            "sessions": len(service.registry),
            "max_sessions": settings.max_sessions,
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format 0.0.4)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
