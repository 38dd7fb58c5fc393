"""The HTTP routes of the service: the page, the JSON API and the operator endpoints, and the handlers
that turn every error into the documented body ``{"error": code, "message": text, "status": http_status}``.

Each route only translates between HTTP and :class:`~server.service.AvatarService`; what a request may
contain is declared in server.schemas and bounded before it gets here (server.guard).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import ice_servers_for
from .metrics import CONTENT_TYPE
from .schemas import (
    PHOTO_UPLOAD,
    ApiError,
    CheckedSource,
    NewSession,
    SdpMessage,
    SessionInfo,
    SessionOptions,
    SourceInfo,
    error_responses,
)
from .service import AvatarService
from .uploads import read_photo


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal (ours, FastAPI's validation, Starlette's 404/405) as the documented JSON body."""

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


def add_routes(app: FastAPI, service: AvatarService) -> None:
    """The page (``/``, ``/static``), the ``/api`` routes, ``/healthz`` and ``/metrics``."""
    settings = service.settings

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
            "image_size": service.engine.image_size,
            "output_size": settings.output_size,
            "picture": settings.picture,
            "picture_size": list(settings.picture_size),
            "auto_neutral": settings.auto_neutral_s,
            # the model's own lip-opening gain, which a session may change; null: the model has none
            "mouth_gain": service.engine.mouth_open_gain if service.engine.mouth_keypoints else None,
            # whether the model blinks with the driver (a lid reader); each photo's upload says if it will
            "blinks": service.engine.lid_reader is not None,
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
        responses=error_responses(400, 401, 403, 413, 429, 503),
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
        responses=error_responses(404),
    )
    async def get_session(session_id: str) -> dict:
        return service.get(session_id).info()

    @app.put(
        "/api/sessions/{session_id}/source",
        response_model=SourceInfo,
        summary="Upload the photo to animate (multipart field 'file'); replaces the previous one",
        responses=error_responses(400, 401, 404, 413, 415, 422, 503),
        openapi_extra=PHOTO_UPLOAD,
    )
    async def put_source(session_id: str, request: Request) -> SourceInfo:
        session = service.get(session_id)
        return await service.set_source(session, await read_photo(request, settings.max_upload_bytes))

    @app.post(
        "/api/source-check",
        response_model=CheckedSource,
        summary="Check a photo (multipart field 'file') without a session: decodable, in limits, a face",
        responses=error_responses(400, 401, 413, 415, 422, 503),
        openapi_extra=PHOTO_UPLOAD,
    )
    async def source_check(request: Request) -> CheckedSource:
        return await service.check_source(await read_photo(request, settings.max_upload_bytes))

    @app.post(
        "/api/sessions/{session_id}/offer",
        response_model=SdpMessage,
        summary="WebRTC offer → answer (non-trickle ICE: gather candidates before sending)",
        responses=error_responses(400, 404, 409),
    )
    async def offer(session_id: str, body: SdpMessage) -> SdpMessage:
        return await service.answer(service.get(session_id), body)

    @app.delete(
        "/api/sessions/{session_id}",
        status_code=204,
        summary="End a session and free it",
        responses=error_responses(404),
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
