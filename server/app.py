"""The HTTP + WebRTC service: ``create_app(settings, engine)`` returns the FastAPI app.

Flow of one viewer: ``POST /api/sessions`` reserves a slot, ``PUT /api/sessions/{id}/source`` uploads the
photo (decoded, size-checked and face-cropped off the event loop; the engine caches the source once),
``POST /api/sessions/{id}/offer`` exchanges SDP (non-trickle: the answer carries all ICE candidates), and
media flows until ``DELETE``, a hang-up, or the peer going silent. Every refusal is a JSON body
``{"error": code, "message": text, "status": http_status}`` so the page can show the message as is.
:mod:`server.client` drives this sequence from Python.

Everything an untrusted client can send is bounded before it is parsed (docs/security.md): request bodies
and headers by :class:`server.guard.RequestGuard` and the uvicorn protocol, photos by their header before
decoding and by a cap on concurrent decodes (server.uploads), offers by their size and media count
(server.signalling), data-channel messages by their size (server.service); every failure is a 4xx JSON
error and never touches other sessions.

The parts: server.schemas (request/response models), server.uploads (photo bodies), server.signalling
(SDP checks, offer/answer, peer teardown), server.service (sessions and the worker), server.routes (the
routes); aiortc/aioice internals only in server.compat.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from engine import Engine

from .guard import RequestGuard
from .routes import add_error_handlers, add_routes
from .service import AvatarService
from .settings import ServerSettings


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
    add_error_handlers(app)
    add_routes(app, service)
    return app
