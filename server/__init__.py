"""The live avatar service: a FastAPI + aiortc WebRTC server (``dagan serve``) and its browser client.

``server.app.create_app(settings, engine)`` builds the ASGI app; the engine is any :class:`engine.Engine`
backend, so tests inject a tiny random model and production passes a trained checkpoint's engine.
``server.client`` is the Python client of its HTTP + WebRTC API (``dagan cam --server`` and the tests use it).
"""

from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings"]
