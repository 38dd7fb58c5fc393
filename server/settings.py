"""Server configuration: one frozen dataclass, filled from CLI flags and ``DAGAN_*`` environment variables.

Limits live here (not scattered as constants) so tests can shrink the timeouts and the session cap, and
the documented defaults in docs/server.md are the ones the code uses. The dataclass is pure: its defaults
are constants and it reads no environment; flags and variables are read by one function
(:func:`server.cli.settings_from_args`, over the table :data:`server.cli.SETTING_OPTIONS`), which also
computes the defaults that depend on the machine (the replica's host name).
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from dagan.face import DEFAULT_DETECT_EVERY
from dagan.options import OptionError
from dagan.paste import parse_size
from dagan.smoothing import DEFAULT_PARAMS, OneEuroParams

# The page beside the sources: only a fallback for a checkout that was never installed (``PYTHONPATH=.``).
_SOURCE_CLIENT_DIR = Path(__file__).resolve().parent.parent / "client_web"


def default_client_dir() -> Path:
    """The browser page shipped as package data (``client_web``), wherever the project is installed.

    Deriving it from ``__file__`` only worked in an editable install: a wheel puts ``server`` in
    site-packages and the page nowhere near it. ``client_web`` is a package with its files listed as
    package data, so importlib.resources finds it in a wheel, an editable install or a source tree alike.
    """
    try:
        path = Path(str(importlib.resources.files("client_web")))
    except (ModuleNotFoundError, TypeError):
        return _SOURCE_CLIENT_DIR
    return path if (path / "index.html").is_file() else _SOURCE_CLIENT_DIR


class SettingsError(OptionError):
    """A server option that cannot be used as given (bad ICE server list, impossible limit)."""


PICTURES = ("crop", "full")


def parse_picture_size(value: str | tuple[int, int]) -> tuple[int, int]:
    """``"1280x720"`` (or a (width, height) pair) → (width, height), checked like every output size."""
    try:
        return parse_size(value if isinstance(value, str) else f"{value[0]}x{value[1]}")
    except (ValueError, TypeError, IndexError) as err:
        raise SettingsError(f"picture size: {err}") from err


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server, passed both to the server's peer connections and to the browser."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_browser(self) -> dict:
        """The ``RTCIceServer`` dictionary the browser's ``RTCPeerConnection`` takes."""
        out: dict = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential
        return out


def parse_ice_servers(text: str | None, username: str | None = None, credential: str | None = None):
    """ICE servers from a comma-separated URL list or a JSON list of ``RTCIceServer`` objects.

    ``"stun:stun.example.org:3478,turn:turn.example.org:3478"`` gives one server per URL, all sharing
    ``username``/``credential`` (TURN needs them; STUN ignores them). A JSON list such as
    ``[{"urls": "turn:host", "username": "u", "credential": "p"}]`` sets them per server.
    """
    if not text or not text.strip():
        return ()
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise SettingsError(f"ICE servers: invalid JSON ({err.msg} at character {err.pos})") from err
        out = []
        for item in items:
            if not isinstance(item, dict) or "urls" not in item:
                raise SettingsError('ICE servers: each JSON entry needs "urls", e.g. {"urls": "stun:host"}')
            urls = item["urls"]
            urls = (urls,) if isinstance(urls, str) else tuple(urls)
            out.append(IceServer(urls, item.get("username"), item.get("credential")))
    else:
        out = [IceServer((u.strip(),), username, credential) for u in text.split(",") if u.strip()]
    for server in out:
        for url in server.urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise SettingsError(f"ICE server URL {url!r} must start with stun:, stuns:, turn: or turns:")
    return tuple(out)


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``create_app`` needs besides the engine. Defaults match docs/server.md."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Live sessions at once; one more gets 503. Each costs a face tracker, a cached source and a share of
    # every batched engine call, so the cap is what keeps latency bounded on a given machine.
    max_sessions: int = 8
    ice_servers: tuple[IceServer, ...] = ()
    # Local addresses offered as ICE host candidates (None: every non-loopback interface, aioice's default).
    # ("127.0.0.1",) keeps media on loopback: same-machine use and the tests.
    ice_host_addresses: tuple[str, ...] | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_side: int = 4096
    # A session that never connects a peer (or lost it) is freed after this long.
    idle_timeout_s: float = 60.0
    # A connected peer that sends no video frame for this long has vanished: its session is freed.
    peer_timeout_s: float = 8.0
    # Side of the avatar video sent back: the model's output is resized to it (bilinear up, INTER_AREA down).
    output_size: int = 256
    # Full-picture sessions: the avatar pasted back into the whole photo (dagan.paste, docs/server.md
    # "Paste-back") at this width × height; ``picture`` is what a session shows unless it asks ("crop":
    # the model's face crop at output_size², "full").
    picture_size: tuple[int, int] = (640, 360)
    picture: str = "crop"
    # One-Euro filter on every session's crop box and driving keypoints (dagan.smoothing): min cutoff in
    # Hz (0 turns both filters off) and beta; and, > 0, the automatic neutral pose over that many seconds.
    smooth_min_cutoff: float = DEFAULT_PARAMS.min_cutoff
    smooth_beta: float = DEFAULT_PARAMS.beta
    auto_neutral_s: float = 0.0
    relative: bool = True
    # The browser page. None: the page shipped with the package (default_client_dir), checked only once
    # it is given explicitly, so `--client-dir` / DAGAN_CLIENT_DIR can still rescue an install whose
    # packaged page is missing (the CLI builds a default instance before it reads its overrides).
    client_dir: Path | None = None
    # True when the engine runs randomly initialised weights: the page and /healthz say so loudly.
    untrained: bool = False
    cleanup_interval_s: float = 0.5
    # -- the media pipeline and replicas (docs/deployment-scale.md); set by DAGAN_* variables ----------
    # Threads for the per-session media work: YUV→RGB, face tracking, crop, compose (0: one per core).
    media_threads: int = 0
    # Face detection on every k-th frame of a session, constant-velocity prediction in between
    # (dagan.face.DEFAULT_DETECT_EVERY says why 3).
    detect_every: int = DEFAULT_DETECT_EVERY
    # > 0: face detection in that many worker processes (mediapipe serialises across threads).
    detect_processes: int = 0
    # This process's name behind a load balancer: in /healthz, /metrics and the X-Dagan-Replica header.
    # `dagan serve` without DAGAN_REPLICA_ID uses the host name (computed where the variables are read).
    replica_id: str = "local"
    # -- exposure beyond localhost (docs/security.md lists every limit and why) -----------------------
    # Bearer token every /api route, /metrics and the page's calls need (None: no token, localhost use).
    access_token: str | None = None
    # Host names the server answers to (None: the loopback names when bound to loopback, else this
    # machine's own addresses and names; any other Host is how a DNS-rebinding page would arrive).
    allowed_hosts: tuple[str, ...] | None = None
    # Other web origins allowed to call the API from a browser (the page's own origin always is).
    allowed_origins: tuple[str, ...] = ()
    # Reverse proxies (IP addresses or networks) whose X-Forwarded-For names the client. Any other
    # peer's header is ignored, loopback included: the TCP peer is the client (docs/security.md).
    forwarded_allow_ips: tuple[str, ...] = ()
    # Sessions one client address may hold at once (None: half of max_sessions, at least 1), so one
    # address can never take every slot. IPv6 clients count per /64, the usual allocation of one host.
    max_sessions_per_client: int | None = None
    # Session creations per client address: a burst (None: the per-client cap, and never more than
    # it), then this many a minute (429 beyond).
    sessions_per_minute: float = 20.0
    session_burst: int | None = None
    max_json_bytes: int = 64 * 1024  # any non-upload request body (an SDP offer is 2-10 KB)
    max_concurrent_decodes: int = 2  # photos decoded and face-searched at once (each up to ~150 MB)
    max_pending_uploads: int = 8  # uploads being received or waiting for a decode (503 beyond)
    # Of those, what one client address may hold (None: a quarter, at least 1; 429 beyond), so a few
    # slow connections from one address cannot take every upload slot.
    max_uploads_per_client: int | None = None
    max_message_bytes: int = 4096  # one data-channel control message
    # Data-channel messages one session may send: this many a second after a burst (excess dropped).
    messages_per_s: float = 20.0
    message_burst: int = 40
    max_sdp_media: int = 4  # m= sections in one offer
    max_ice_candidates: int = 32  # a=candidate lines per media section of an offer
    # Camera frames outside these sides cannot be cropped (a 1×1 frame) or cost too much to convert;
    # after bad_video_notice_s of nothing else the peer is told why on the data channel.
    min_video_side: int = 32
    max_video_side: int = 4096
    bad_video_notice_s: float = 3.0
    header_timeout_s: float = 10.0  # request line + headers must arrive within this
    max_header_bytes: int = 16 * 1024  # request line + headers (431 beyond)
    max_header_count: int = 100  # header lines in one request (431 beyond)
    body_timeout_s: float = 60.0  # a whole request body must arrive within this
    # After the first body_grace_s, a body must keep arriving at this many bytes a second on average
    # (408 otherwise): a trickled body cannot hold its upload slot or connection for body_timeout_s.
    min_body_bytes_per_s: int = 16 * 1024
    body_grace_s: float = 5.0
    shutdown_timeout_s: float = 5.0  # open requests get this long after SIGTERM
    max_connections: int = 256  # open HTTP connections (503 beyond)
    # TURN REST API (coturn use-auth-secret): URLs and the shared secret; credentials expire after ttl.
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl_s: int = 6 * 3600
    docs: bool = False  # serve /docs (Swagger UI, scripts from a CDN); /openapi.json is always there

    def __post_init__(self) -> None:
        if self.detect_every < 1 or self.media_threads < 0 or self.detect_processes < 0:
            raise SettingsError(
                "DAGAN_DETECT_EVERY must be >= 1, DAGAN_MEDIA_THREADS and DAGAN_DETECT_PROCESSES >= 0"
            )
        if not self.replica_id or not all(c.isalnum() or c in "-_." for c in self.replica_id):
            raise SettingsError(f"replica id {self.replica_id!r}: use letters, digits, '-', '_' or '.'")
        if self.max_sessions < 1:
            raise SettingsError(f"max sessions must be at least 1, got {self.max_sessions}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise SettingsError(f"port must be in 1..65535, got {self.port}")
        if self.client_dir is None:
            object.__setattr__(self, "client_dir", default_client_dir())
        else:
            object.__setattr__(self, "client_dir", Path(self.client_dir))
            if not (self.client_dir / "index.html").is_file():
                raise SettingsError(
                    f"{self.client_dir} has no index.html: point --client-dir (or DAGAN_CLIENT_DIR) at the "
                    "folder with the browser page"
                )
        if self.output_size < 16 or self.output_size % 2:
            raise SettingsError(f"output size must be an even number of pixels >= 16, got {self.output_size}")
        object.__setattr__(self, "picture_size", parse_picture_size(self.picture_size))
        if self.picture not in PICTURES:
            raise SettingsError(f"picture must be one of {', '.join(PICTURES)}, got {self.picture!r}")
        if self.smooth_min_cutoff < 0 or self.smooth_beta < 0 or self.auto_neutral_s < 0:
            raise SettingsError("the smoothing parameters and the auto-neutral window must be >= 0")
        if bool(self.turn_urls) != bool(self.turn_secret):
            raise SettingsError("TURN needs both --turn-urls and --turn-secret (coturn's static-auth-secret)")
        for url in self.turn_urls:
            if not url.startswith(("turn:", "turns:")):
                raise SettingsError(f"TURN URL {url!r} must start with turn: or turns:")
        if self.turn_ttl_s < 60:
            raise SettingsError(f"TURN credential lifetime must be at least 60 s, got {self.turn_ttl_s}")
        if self.access_token is not None and len(self.access_token) < 8:
            raise SettingsError("the access token must be at least 8 characters long")
        for name in ("max_sessions_per_client", "session_burst", "max_uploads_per_client"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        for entry in self.forwarded_allow_ips:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as err:
                raise SettingsError(
                    f"forwarded-allow-ips: {entry!r} is not an IP address or network; name the reverse "
                    "proxy by its address, e.g. 10.0.0.5 or 172.18.0.0/16"
                ) from err

    @property
    def smoothing(self) -> OneEuroParams | None:
        """The sessions' One-Euro parameters (None: filters off)."""
        if self.smooth_min_cutoff <= 0:
            return None
        return OneEuroParams(min_cutoff=self.smooth_min_cutoff, beta=self.smooth_beta)

    # -- limits derived from others (properties, so dataclasses.replace keeps them consistent) ------
    @property
    def sessions_per_client(self) -> int:
        """Sessions one client address may hold: the setting, else half the cap (never above it)."""
        value = self.max_sessions_per_client or max(1, self.max_sessions // 2)
        return min(value, self.max_sessions)

    @property
    def session_burst_size(self) -> int:
        """The rate limiter's burst: never more than one address may hold, so a burst cannot be used
        to fill that share, drop it and fill it again at once."""
        return min(self.session_burst or self.sessions_per_client, self.sessions_per_client)

    @property
    def uploads_per_client(self) -> int:
        """Upload slots one client address may hold: the setting, else a quarter of them."""
        value = self.max_uploads_per_client or max(1, self.max_pending_uploads // 4)
        return min(value, self.max_pending_uploads)
