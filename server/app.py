"""The HTTP + WebRTC service: ``create_app(settings, engine)`` returns the FastAPI app.

Flow of one viewer: ``POST /api/sessions`` reserves a slot, ``PUT /api/sessions/{id}/source`` uploads the
photo (decoded, size-checked and face-cropped off the event loop; the engine caches the source once),
``POST /api/sessions/{id}/offer`` exchanges SDP (non-trickle: the answer carries all ICE candidates), and
media flows until ``DELETE``, a hang-up, or the peer going silent. Every refusal is a JSON body
``{"error": code, "message": text, "status": http_status}`` so the page can show the message as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
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

from dagan.face import NoFaceError, crop_source
from engine import Engine

from .metrics import CONTENT_TYPE, Metrics
from .sessions import LiveSession, OutputFrame, ServerBusyError, SessionNotFoundError, SessionRegistry
from .settings import ServerSettings
from .tracks import AvatarTrack, consume_input, host_candidates, send_json
from .worker import InferenceWorker

log = logging.getLogger("dagan.server")


class ApiError(Exception):
    """An HTTP error with a stable machine-readable ``code`` and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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


class SessionInfo(BaseModel):
    id: str
    relative: bool
    show_depth: bool
    has_source: bool
    connected: bool
    frames_in: int
    frames_dropped: int
    frames_out: int


class SourceInfo(BaseModel):
    id: str
    width: int = Field(description="uploaded photo width in pixels")
    height: int
    face_box: dict[str, float] = Field(description="square crop around the face: cx, cy, size (pixels)")


class SdpMessage(BaseModel):
    sdp: str = Field(min_length=1)
    type: Literal["offer", "answer"]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


# ------------------------------------------------------------------------------------------ images


def decode_upload(data: bytes, max_side: int) -> np.ndarray:
    """Uploaded bytes → H×W×3 uint8 RGB, refusing non-images (415) and oversized pictures (413).

    The size is read from the header before any pixel is decoded, so a small file that claims
    60000×60000 pixels is refused without allocating them. EXIF orientation is applied, as phone photos
    are often stored sideways.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(415, "not_an_image", "the uploaded file is empty; choose a photo (JPEG, PNG or WebP)")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ApiError(
            415,
            "not_an_image",
            "the uploaded file is not an image this server can read (use JPEG, PNG or WebP)",
        ) from err
    width, height = image.size
    if width > max_side or height > max_side:
        raise ApiError(
            413,
            "image_too_large",
            f"the photo is {width}×{height} pixels; the limit is {max_side}×{max_side}, please scale it down",
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(415, "not_an_image", "the image file is corrupt or truncated") from err
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
        self.worker = InferenceWorker(engine, self.registry, self.metrics, settings.output_size)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stack = contextlib.ExitStack()
        self._background: set[asyncio.Task] = set()
        self._sample: bytes | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stack.enter_context(host_candidates(self.settings.ice_host_addresses))
        self.worker.start()
        self._spawn(self._cleanup_loop())

    async def stop(self) -> None:
        for session in self.registry.snapshot():
            await self.close_session(session.id, "server shutting down")
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.worker.stop)
        self._stack.close()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- sessions ----------------------------------------------------------------------------------
    def create_session(self, options: SessionOptions) -> LiveSession:
        relative = self.settings.relative if options.relative is None else options.relative
        try:
            session = self.registry.create(relative=relative, show_depth=options.show_depth)
        except ServerBusyError as err:
            self.metrics.add("sessions_rejected")
            raise ApiError(503, "server_busy", str(err)) from err
        self.metrics.add("sessions_created")
        log.info("session %s created (%d/%d)", session.id, len(self.registry), self.settings.max_sessions)
        return session

    def get(self, session_id: str) -> LiveSession:
        try:
            return self.registry.get(session_id)
        except SessionNotFoundError as err:
            raise ApiError(404, "session_not_found", str(err)) from err

    async def set_source(self, session: LiveSession, data: bytes) -> SourceInfo:
        rgb = await asyncio.to_thread(decode_upload, data, self.settings.max_image_side)
        try:
            crop, box = await asyncio.to_thread(crop_source, rgb, self.engine.image_size)
        except NoFaceError as err:
            raise ApiError(422, "no_face", str(err)) from err

        def build() -> None:  # on the worker thread: the engine is only ever used there
            engine_session = self.engine.new_session(crop, relative=session.relative)
            session.source_crop = crop
            session.engine_session = engine_session
            session.source_size = (rgb.shape[1], rgb.shape[0])

        await self.worker.call(build)
        if session.closed:  # deleted while the photo was being processed
            session.engine_session = session.source_crop = None
            raise ApiError(404, "session_not_found", f"session {session.id!r} ended during the upload")
        return SourceInfo(id=session.id, width=rgb.shape[1], height=rgb.shape[0], face_box=box.to_dict())

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
        if not offer.sdp.lstrip().startswith("v=0") or "m=video" not in offer.sdp:
            raise ApiError(
                400, "bad_sdp", "malformed SDP offer: it must start with v=0 and offer a video track"
            )
        ice = [RTCIceServer(list(s.urls), s.username, s.credential) for s in self.settings.ice_servers]
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
        except ApiError:
            raise
        except Exception as err:
            log.info("session %s: offer refused: %s", session.id, err)
            session.pc = None
            session.output.stop()
            session.output = None
            session.connected_at = None
            pc.remove_all_listeners()  # its "closed" state must not end the session it failed to join
            await pc.close()
            raise ApiError(
                400, "bad_sdp", f"malformed or unsupported SDP offer ({err or type(err).__name__})"
            ) from err
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
        """Control messages from the page: ``recalibrate`` and ``{"type": "show_depth", "value": bool}``."""
        import json

        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        try:
            data = json.loads(message) if message.lstrip().startswith("{") else {"type": message.strip()}
        except json.JSONDecodeError:
            data = {"type": None}
        kind = data.get("type")
        if kind == "recalibrate":
            session.recalibrate = True
            send_json(session.channel, {"type": "recalibrated"})
        elif kind == "show_depth":
            session.show_depth = bool(data.get("value", True))
        else:
            send_json(session.channel, {"type": "error", "message": f"unknown control message {message!r}"})

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
            with contextlib.suppress(Exception):
                await session.pc.close()
        session.input.clear()
        session.engine_session = session.source_crop = session.channel = session.pc = None
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
        '`{"error": code, "message": text, "status": http_status}`.',
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message, "status": exc.status}, exc.status)

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
            "ice_servers": [s.to_browser() for s in settings.ice_servers],
            "max_sessions": settings.max_sessions,
            "relative": settings.relative,
            "untrained": settings.untrained,
            "backend": service.metrics.info["backend"],
            "image_size": engine.image_size,
            "output_size": settings.output_size,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_image_side": settings.max_image_side,
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
        response_model=SessionInfo,
        summary="Reserve a session slot",
        responses=_errors(400, 503),
    )
    async def create_session(options: SessionOptions | None = None) -> dict:
        return service.create_session(options or SessionOptions()).info()

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
        responses=_errors(400, 404, 413, 415, 422),
        openapi_extra={
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
        },
    )
    async def put_source(session_id: str, request: Request) -> SourceInfo:
        session = service.get(session_id)
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            raise ApiError(
                413,
                "file_too_large",
                f"the upload is {int(length) / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB",
            )
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                415, "not_multipart", "send the photo as multipart/form-data in a field named 'file'"
            )
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as err:
            raise ApiError(400, "bad_request", f"could not parse the multipart upload ({err})") from err
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "bad_request", "the multipart upload has no file field named 'file'")
            data = await upload.read(limit + 1)
        finally:
            await form.close()
        if len(data) > limit:
            raise ApiError(413, "file_too_large", f"the photo is over the {limit / 2**20:g} MB limit")
        return await service.set_source(session, data)

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
