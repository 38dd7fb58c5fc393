"""What keeps ``dagan serve`` safe to put on a network (docs/security.md): the request guard, the session
rate limiter, TURN REST credentials and the uvicorn settings with header and shutdown timeouts.

The guard is a plain ASGI middleware in front of every route, so each check runs before FastAPI reads or
parses anything: the Host and Origin checks (DNS rebinding, cross-site requests from any web page), the
access token, then the request body, read here with a byte budget and a deadline and handed on from
memory. A body over its budget is refused as it streams in, never spooled to disk first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import IceServer, ServerSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Upload routes get the photo limit (plus room for the multipart envelope); every other body the JSON one.
UPLOAD_PATH = re.compile(r"^/api/(sessions/[^/]+/source|source-check)$")
MULTIPART_SLACK = 64 * 1024
#: Routes anyone may fetch without the access token: the page itself, its assets, liveness, the schema.
PUBLIC_PATHS = ("/", "/healthz", "/openapi.json", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's Swagger page (only with --docs) is an inline script loading swagger-ui from jsDelivr.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(self), microphone=(), geolocation=()"),
]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, str]:
    """``Host`` header → (name lower-cased without brackets, port or '')."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest.lstrip(":")
    name, _, port = value.partition(":")
    return name, port


def _netloc(scheme: str, netloc: str) -> str:
    """``host[:port]`` with the scheme's default port dropped, for comparing an Origin with a Host."""
    netloc = netloc.lower()
    for default in (":80",) if scheme == "http" else (":443",) if scheme == "https" else ():
        if netloc.endswith(default):
            netloc = netloc[: -len(default)]
    return netloc


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> tuple:
    body = json.dumps({"error": code, "message": message, "status": status}).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    out += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, out, body


class TokenBucket:
    """Per-client session-creation limit: ``burst`` at once, refilled at ``per_minute``.

    Keyed by the client address uvicorn reports (behind a reverse proxy, the forwarded address when
    ``--forwarded-allow-ips`` trusts it). Full buckets are forgotten, so the table stays as small as the
    number of clients active in the last minute or so.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
            if len(self._buckets) > 4096:  # forget clients whose bucket has refilled
                full = [k for k, (t, a) in self._buckets.items() if t + (now - a) * self.rate >= self.burst]
                for k in full:
                    del self._buckets[k]
            return wait


def turn_credentials(secret: str, user: str, ttl_s: int, now: float | None = None) -> tuple[str, str]:
    """The TURN REST API credential coturn checks with ``use-auth-secret``/``static-auth-secret``.

    The username is ``<unix expiry>:<user>``, the password base64(HMAC-SHA1(secret, username)); coturn
    recomputes it from its copy of the secret and refuses it once the expiry has passed, so a credential
    seen by anyone is worthless after ``ttl_s`` and the secret itself never leaves the server.
    """
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for(settings: ServerSettings, user: str) -> list[IceServer]:
    """The configured ICE servers plus, with a TURN secret, the TURN URLs with a credential for ``user``."""
    servers = list(settings.ice_servers)
    if settings.turn_urls and settings.turn_secret:
        username, credential = turn_credentials(settings.turn_secret, user, settings.turn_ttl_s)
        servers.append(IceServer(tuple(settings.turn_urls), username, credential))
    return servers


class RequestGuard:
    """ASGI middleware: Host, Origin and token checks, security headers, bounded and timed body reads."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.uploads_in_flight = 0
        if settings.allowed_hosts is not None:
            self.hosts: tuple[str, ...] | None = tuple(h.lower() for h in settings.allowed_hosts)
        elif is_loopback(settings.host):
            self.hosts = LOOPBACK_NAMES
        else:
            self.hosts = None  # any Host: the operator did not name the server's public names
        self.origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    # -- checks --------------------------------------------------------------------------------------
    def host_allowed(self, host: str) -> bool:
        if self.hosts is None or "*" in self.hosts:
            return True
        name, _ = split_host(host)
        if not name:
            return False
        for allowed in self.hosts:
            if allowed.startswith("*.") and name.endswith(allowed[1:]):
                return True
            if name == allowed:
                return True
        return self.hosts == LOOPBACK_NAMES and is_loopback(name)

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Same origin as the page (the Origin's host:port is the Host header) or explicitly allowed."""
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # includes the opaque "null" origin of sandboxed frames and file: pages
        return _netloc(parts.scheme, parts.netloc) in (_netloc("http", host), _netloc("https", host))

    def token_ok(self, headers: dict[bytes, bytes]) -> bool:
        token = self.settings.access_token
        if not token:
            return True
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    @staticmethod
    def is_public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    # -- ASGI ----------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = (DOCS_CSP if path in ("/docs", "/redoc", "/docs/oauth2-redirect") else PAGE_CSP).encode()

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                headers.append((b"content-security-policy", csp))
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> None:
            status, head, body = json_error(status, code, text, headers)
            await send_secured({"type": "http.response.start", "status": status, "headers": head})
            await send_secured({"type": "http.response.body", "body": body})

        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_allowed(host):
            await refuse(
                403,
                "forbidden_host",
                f"this server does not answer to the host name {split_host(host)[0]!r} "
                "(add it with --allowed-hosts)",
            )
            return
        origin = headers.get(b"origin")
        if origin is not None and not self.origin_allowed(origin.decode("latin-1"), host):
            await refuse(
                403,
                "forbidden_origin",
                "requests from other web sites are refused (add the site with --allowed-origins)",
            )
            return
        if not self.is_public(path) and not self.token_ok(headers):
            await refuse(
                401,
                "unauthorized",
                "this server needs its access token: open the page with #token=... or send "
                "'Authorization: Bearer <token>'",
                {"WWW-Authenticate": 'Bearer realm="dagan"'},
            )
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send_secured)
            return

        upload = bool(UPLOAD_PATH.match(path))
        s = self.settings
        limit = s.max_upload_bytes + MULTIPART_SLACK if upload else s.max_json_bytes
        length = headers.get(b"content-length", b"").decode("latin-1").strip()
        if length.isdigit() and int(length) > limit:
            if upload:
                mb = s.max_upload_bytes / 2**20
                text = f"the upload is {int(length) / 2**20:.1f} MB; the limit is {mb:g} MB"
                await refuse(413, "file_too_large", text)
            else:
                await refuse(413, "body_too_large", f"the request body is over the {limit // 1024} KB limit")
            return
        if upload and self.uploads_in_flight >= s.max_pending_uploads:
            await refuse(
                503,
                "server_busy",
                f"server busy: {s.max_pending_uploads} photo uploads are already in progress, try again",
                {"Retry-After": "2"},
            )
            return
        if upload:
            self.uploads_in_flight += 1
        try:
            try:
                body, over = await asyncio.wait_for(self._read_body(receive, limit), s.body_timeout_s)
            except TimeoutError:
                await refuse(
                    408, "request_timeout", f"the request body did not arrive within {s.body_timeout_s:g} s"
                )
                return
            except _Disconnected:
                return
            except asyncio.CancelledError:  # graceful-shutdown deadline: say so instead of uvicorn's 500
                with contextlib.suppress(Exception):
                    await refuse(503, "shutting_down", "the server is shutting down; try again in a moment")
                raise
            if over:
                if upload:
                    text = f"the upload is over the {s.max_upload_bytes / 2**20:g} MB limit"
                    await refuse(413, "file_too_large", text)
                else:
                    text = f"the request body is over the {limit // 1024} KB limit"
                    await refuse(413, "body_too_large", text)
                return
            await self.app(scope, _replay(body, receive), send_secured)
        finally:
            if upload:
                self.uploads_in_flight -= 1

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
        """The whole body, or (partial, True) as soon as it passes ``limit`` (the rest is never read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


class _Disconnected(Exception):
    """The client went away while sending its body."""


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the real receive would

    return replay


# ------------------------------------------------------------------------------------------- uvicorn

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request line and headers (slow-loris defence).

    The clock starts when the connection opens and again when a response completes (a keep-alive
    connection waiting for its next request); it stops once a request's headers are complete. A
    connection that misses it gets a 408 and is closed. Idle keep-alive connections are closed earlier
    still by uvicorn's own keep-alive timeout.
    """

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._seen_cycle: object = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: its body has its own deadline in the guard
        body = json.dumps(
            {
                "error": "request_timeout",
                "message": f"the request headers did not arrive within {self.header_timeout_s:g} s",
                "status": 408,
            }
        ).encode()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:
            self._seen_cycle = self.cycle  # a new request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServerSettings, **kwargs: Any) -> Any:
    """The uvicorn configuration ``dagan serve`` (and the tests) run with: the header timeout protocol,
    a connection cap and a graceful-shutdown deadline from ``settings``."""
    import uvicorn

    protocol = type(
        "GuardedH11Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": settings.header_timeout_s}
    )
    return uvicorn.Config(
        app,
        host=kwargs.pop("host", settings.host),
        port=kwargs.pop("port", settings.port),
        http=protocol,
        ws="none",
        lifespan="on",
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        **kwargs,
    )


def new_token() -> str:
    """A random access token for people who ask for one (``dagan serve --access-token random``)."""
    return secrets.token_urlsafe(24)
