"""What keeps ``dagan serve`` safe to put on a network (docs/security.md): the request guard, the session
rate limiter, TURN REST credentials and the uvicorn settings with header and shutdown timeouts.

The guard is a plain ASGI middleware in front of every route, so each check runs before FastAPI reads or
parses anything: the size of the request head, the client address (from ``X-Forwarded-For`` only when the
TCP peer is a proxy named in ``forwarded_allow_ips``), the Host and Origin checks (DNS rebinding,
cross-site requests from any web page), the access token, then the request body, read here with a byte
budget, a deadline and a minimum rate, and handed on from memory. A body over its budget is refused as it
streams in, never spooled to disk first; upload slots are shared out per client address.

Also here, because they are the other checks on what a client sends before anything parses it: the
validation of an offer's ICE candidates (:func:`check_ice_candidates`) and the per-session data-channel
message rate (:class:`Bucket`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
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


def client_key(host: str) -> str:
    """The key limits count a client by: its IP address, or for IPv6 its /64 network (one host usually
    holds a whole /64, so counting single IPv6 addresses would give it 2^64 identities). IPv4-mapped
    IPv6 addresses count as the IPv4 address; anything that is not an IP (a test client) as itself."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _forwarded_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One ``X-Forwarded-For`` entry (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``, ``::1``) as an
    address, or None for anything else (``unknown``, a name, garbage)."""
    value = value.strip()
    if len(value) > 64:
        return None
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class TrustedProxies:
    """Which peers may name the client in ``X-Forwarded-For`` (``--forwarded-allow-ips``).

    A request from any other peer is taken to come from that peer, whatever its headers say: otherwise
    every client could pick a new address per request and walk past the per-address limits. From a
    trusted proxy the client is the rightmost entry of the header that is not itself a trusted proxy
    (each proxy appends the address it received the request from, so everything left of that entry was
    written by the client and proves nothing). An entry that is not an IP address stops the walk and
    the proxy itself counts as the client, so a broken chain shares one key instead of inventing many.
    """

    def __init__(self, entries: tuple[str, ...] | list[str]) -> None:
        self.networks = [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if host is None or not self.networks:
            return False
        try:
            address = host if not isinstance(host, str) else ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == n.version and address in n for n in self.networks)

    def client(self, peer: str, forwarded: list[bytes]) -> str:
        """The client's address for a request from ``peer`` with these ``X-Forwarded-For`` values."""
        if not forwarded or not self.trusts(peer):
            return peer
        entries = b",".join(forwarded).decode("latin-1").split(",")
        for entry in reversed(entries[-32:]):  # a longer chain than 32 proxies is not a real one
            address = _forwarded_address(entry)
            if address is None:
                return peer
            if not self.trusts(address):
                return str(address.ipv4_mapped or address) if address.version == 6 else str(address)
        return peer  # every entry is one of our proxies: the request started at a proxy


def own_host_names(bind: str) -> frozenset[str]:
    """The Host names a server bound to ``bind`` can justify without being told its public name: the
    loopback names, this machine's host name (and its mDNS ``.local`` name), and its own addresses
    (every interface's for a wildcard bind, else the bound one). A DNS-rebinding page arrives with a
    name of its own choosing, which is never one of these."""
    names = {"localhost", "127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        hostname = socket.gethostname().lower().rstrip(".")
        if hostname:
            names |= {hostname, hostname.split(".")[0] + ".local"}
    bind = bind.strip("[]").lower()
    if bind in ("", "0.0.0.0", "::"):
        names |= interface_addresses()
    else:
        names.add(bind)
    return frozenset(names)


def interface_addresses() -> set[str]:
    """Every address of every network interface (what a wildcard bind answers on)."""
    out: set[str] = set()
    with contextlib.suppress(Exception):  # ifaddr (an aioice dependency) reads the OS's interface list
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                out.add(str(address).split("%")[0].lower())
    return out


class TokenBucket:
    """Per-client session-creation limit: ``burst`` at once, refilled at ``per_minute``.

    Keyed by :func:`client_key` of the address :class:`RequestGuard` resolved (behind a reverse proxy,
    the forwarded address when ``--forwarded-allow-ips`` names the proxy). Full buckets are forgotten,
    so the table stays as small as the number of clients active in the last minute or so.
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


class Bucket:
    """One token bucket without keys or locks: a session's data-channel messages (event loop only).

    ``allow()`` is True while the sender stays within ``per_s`` messages a second after a burst; what
    is over it costs one clock read and a subtraction, nothing that looks at the message.
    """

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.burst = float(max(1, burst))
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# ---------------------------------------------------------------------------------- ICE candidates

_FOUNDATION = re.compile(r"^[A-Za-z0-9+/]{1,32}$")
_MDNS_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.local$")
_TOKEN = re.compile(r"^[\x21-\x7e]{1,256}$")
_CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 5 and int(text) <= 65535 else None


def _candidate_address(text: str, related: bool = False) -> bool:
    """A unicast IP literal or a browser's mDNS name (``<uuid>.local``); a related address may also be
    the unspecified one (browsers write ``raddr 0.0.0.0`` to hide the local address)."""
    if _MDNS_NAME.match(text):
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if related:
        return True
    broadcast = address == ipaddress.IPv4Address("255.255.255.255")
    return not (address.is_unspecified or address.is_multicast or broadcast)


def candidate_problem(value: str) -> str | None:
    """What is wrong with one ``a=candidate:`` value (RFC 8839, section 5.1), or None.

    aiortc and aioice parse these with ``int()`` and nothing else: a port of 99999 reached
    ``socket.sendto`` and killed the session's ICE transport with an ``OverflowError`` after a 200.
    """
    bits = value.split(" ")
    if len(bits) < 8 or len(bits) > 8 + 2 * 16 or len(bits) % 2:
        return "does not have the fields 'foundation component transport priority address port typ type'"
    foundation, component, transport, priority, address, port, typ, kind = bits[:8]
    if not _FOUNDATION.match(foundation):
        return "has an invalid foundation"
    if not (component.isdigit() and len(component) <= 3 and 1 <= int(component) <= 256):
        return f"has component {component[:12]!r} (must be 1-256)"
    if transport.lower() not in ("udp", "tcp"):
        return f"has transport {transport[:12]!r} (must be UDP or TCP)"
    if not (priority.isdigit() and len(priority) <= 10 and int(priority) <= 2**32 - 1):
        return f"has priority {priority[:24]!r} (must be 0-4294967295)"
    if not _candidate_address(address):
        return f"has address {address[:48]!r} (must be a unicast IP address or an mDNS .local name)"
    if _port(port) is None:
        return f"has port {port[:24]!r} (must be 0-65535)"
    if typ != "typ" or kind not in _CANDIDATE_TYPES:
        return f"has type {kind[:12]!r} (must be host, srflx, prflx or relay)"
    for name, ext in zip(bits[8::2], bits[9::2], strict=True):
        if name == "raddr" and not _candidate_address(ext, related=True):
            return f"has related address {ext[:48]!r}"
        if name == "rport" and _port(ext) is None:
            return f"has related port {ext[:24]!r} (must be 0-65535)"
        if name == "tcptype" and ext not in ("active", "passive", "so"):
            return f"has tcptype {ext[:12]!r}"
        if name in ("generation", "network-id", "network-cost") and not (ext.isdigit() and len(ext) <= 10):
            return f"has {name} {ext[:24]!r} (must be a number)"
        if not (_TOKEN.match(name) and _TOKEN.match(ext)):
            return "has a malformed extension attribute"
    return None


def check_ice_candidates(sdp: str, max_per_section: int) -> str | None:
    """Every ``a=candidate`` line of an offer, and each media line's port, before aiortc sees them:
    the first problem as a sentence for a 400 ``bad_sdp``, or None. At most ``max_per_section``
    candidates per media section: the server sends connectivity checks to every one of them."""
    count = 0
    for n, line in enumerate(sdp.splitlines(), 1):
        if line.startswith("m="):
            count = 0
            fields = line.split(" ")
            port = fields[1].partition("/")[0] if len(fields) > 1 else ""
            if _port(port) is None:
                return f"media line {n} has port {port[:24]!r} (must be 0-65535)"
        elif line.startswith("a=candidate"):
            count += 1
            if count > max_per_section:
                return f"a media section has more than {max_per_section} ICE candidates"
            value = line[len("a=candidate") :]
            problem = "has no value" if not value.startswith(":") else candidate_problem(value[1:])
            if problem is not None:
                return f"the ICE candidate on line {n} {problem}"
    return None


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
    """ASGI middleware: head size, client address, Host, Origin and token checks, security headers,
    bounded, timed and rate-checked body reads, upload slots shared out per client address."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: Any = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics  # server.metrics.Metrics (refusals are counted there), or None
        self.uploads_in_flight = 0
        self.uploads_by_client: dict[str, int] = {}
        self.proxies = TrustedProxies(settings.forwarded_allow_ips)
        self.own_names = False  # True: answering to this machine's own names only (no --allowed-hosts)
        self._names_at = 0.0
        if settings.allowed_hosts is not None:
            self.hosts: tuple[str, ...] = tuple(h.lower() for h in settings.allowed_hosts)
        elif is_loopback(settings.host):
            self.hosts = LOOPBACK_NAMES
        else:
            # Bound beyond loopback but never told its public names: answer to the names it can justify
            # (its own addresses and host name). Answering to any name would let a page on any origin
            # drive the API through DNS rebinding (its own name, resolved to this machine).
            self.own_names = True
            self.hosts = tuple(sorted(own_host_names(settings.host)))
            self._names_at = time.monotonic()
        self.origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    # -- checks --------------------------------------------------------------------------------------
    def host_allowed(self, host: str) -> bool:
        if "*" in self.hosts:
            return True
        name, _ = split_host(host)
        if not name:
            return False
        for allowed in self.hosts:
            if allowed.startswith("*.") and name.endswith(allowed[1:]):
                return True
            if name == allowed:
                return True
        if self.own_names and self._refresh_own_names(name):
            return True
        return (self.hosts == LOOPBACK_NAMES or self.own_names) and is_loopback(name)

    def _refresh_own_names(self, name: str) -> bool:
        """An IP literal we do not know may be an address the machine gained since start-up (DHCP, a
        new interface): look again, at most every 10 s."""
        if time.monotonic() - self._names_at < 10.0:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        self._names_at = time.monotonic()
        self.hosts = tuple(sorted(own_host_names(self.settings.host)))
        return name in self.hosts

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

    def head_too_large(self, scope: Scope) -> str | None:
        """The request line and headers over their documented limits (uvicorn's h11 only bounds a head
        that is still incomplete, so one that arrives in a single read of up to 256 KB passes it)."""
        s = self.settings
        raw = scope.get("headers", [])
        if len(raw) > s.max_header_count:
            return f"the request has {len(raw)} header lines; at most {s.max_header_count} are accepted"
        target = scope.get("raw_path") or scope.get("path", "").encode()
        size = len(target) + len(scope.get("query_string", b"")) + sum(len(k) + len(v) + 4 for k, v in raw)
        if size > s.max_header_bytes:
            limit = s.max_header_bytes // 1024
            return f"the request line and headers are {size // 1024} KB; the limit is {limit} KB"
        return None

    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name, label)

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

        too_large = self.head_too_large(scope)
        if too_large is not None:
            await refuse(431, "headers_too_large", too_large)
            return
        headers: dict[bytes, bytes] = {}
        forwarded: list[bytes] = []
        for k, v in scope.get("headers", []):
            k = k.lower()
            headers.setdefault(k, v)
            if k == b"x-forwarded-for":
                forwarded.append(v)
        # The client address every later limit counts by (request.client in the app): the TCP peer,
        # or what a trusted proxy says it is.
        peer = scope.get("client") or ("", 0)
        client = self.proxies.client(peer[0], forwarded)
        if client != peer[0]:
            scope = {**scope, "client": (client, 0)}
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_allowed(host):
            hint = (
                " (add it with --allowed-hosts)"
                if not self.own_names
                else "; a server bound beyond loopback answers only to its own addresses and names "
                "until --allowed-hosts (DAGAN_ALLOWED_HOSTS) names the ones clients use"
            )
            await refuse(
                403,
                "forbidden_host",
                f"this server does not answer to the host name {split_host(host)[0][:100]!r}{hint}",
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
        key = client_key(client)
        if upload and self.uploads_by_client.get(key, 0) >= s.uploads_per_client:
            self._count("uploads_refused", "per_client")
            await refuse(
                429,
                "too_many_uploads",
                f"this address already has {s.uploads_per_client} photo uploads in progress; wait for "
                "them to finish",
                {"Retry-After": "5"},
            )
            return
        if upload and self.uploads_in_flight >= s.max_pending_uploads:
            self._count("uploads_refused", "busy")
            await refuse(
                503,
                "server_busy",
                f"server busy: {s.max_pending_uploads} photo uploads are already in progress, try again",
                {"Retry-After": "2"},
            )
            return
        if upload:
            self.uploads_in_flight += 1
            self.uploads_by_client[key] = self.uploads_by_client.get(key, 0) + 1
        try:
            try:
                body, over = await self._read_body(receive, limit)
            except TimeoutError:
                await refuse(
                    408, "request_timeout", f"the request body did not arrive within {s.body_timeout_s:g} s"
                )
                return
            except _TooSlow as slow:
                if upload:
                    self._count("uploads_refused", "too_slow")
                await refuse(
                    408,
                    "body_too_slow",
                    f"the request body arrived too slowly ({slow.size} bytes in {slow.elapsed:.0f} s); "
                    f"at least {s.min_body_bytes_per_s // 1024} KB/s are needed",
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
                left = self.uploads_by_client.get(key, 1) - 1
                if left > 0:
                    self.uploads_by_client[key] = left
                else:
                    self.uploads_by_client.pop(key, None)

    async def _read_body(self, receive: Receive, limit: int) -> tuple[bytes, bool]:
        """The whole body, or (partial, True) as soon as it passes ``limit`` (the rest is never read).

        Raises TimeoutError after ``body_timeout_s``, and :class:`_TooSlow` as soon as the body, after
        its first ``body_grace_s``, has arrived at less than ``min_body_bytes_per_s`` on average (also
        while nothing arrives at all): a trickle of one byte every few seconds would otherwise hold an
        upload slot for the whole body timeout.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + s.body_timeout_s
        rate = s.min_body_bytes_per_s
        chunks: list[bytes] = []
        size = 0
        while True:
            slow_at = start + max(s.body_grace_s, size / rate) if rate > 0 else math.inf
            wait = min(deadline, slow_at) - loop.time()
            try:
                if wait <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                if slow_at < deadline:
                    raise _TooSlow(size, loop.time() - start) from None
                raise
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


class _TooSlow(Exception):
    """The body arrives below the minimum rate."""

    def __init__(self, size: int, elapsed: float) -> None:
        super().__init__(size, elapsed)
        self.size, self.elapsed = size, elapsed


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
    a connection cap and a graceful-shutdown deadline from ``settings``.

    uvicorn's own proxy-header handling is off, explicitly: by default it believes ``X-Forwarded-For``
    from any loopback peer (or ``$FORWARDED_ALLOW_IPS``), so every local client could name itself anew
    per request. :class:`RequestGuard` reads the header instead, from ``forwarded_allow_ips`` only.
    h11's limit on a head still being received is the documented header limit."""
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
        proxy_headers=False,
        forwarded_allow_ips=[],
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        **kwargs,
    )


def new_token() -> str:
    """A random access token for people who ask for one (``dagan serve --access-token random``)."""
    return secrets.token_urlsafe(24)
