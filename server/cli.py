"""``dagan serve``: run the live avatar service with uvicorn.

Every flag has a ``DAGAN_*`` environment variable (flags win), so a container or a systemd unit can be
configured without a command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dagan.checkpoint import CheckpointError

from .settings import ServerSettings, SettingsError, parse_ice_servers


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise SettingsError(f"${name} must be an integer, got {value!r}") from err


UNTRAINED_BANNER = """\
################################################################################
#  WARNING: serving UNTRAINED, randomly initialised tiny weights (--untrained-tiny).
#  The avatar will not look like the photo (a grey square): this only shows that
#  the service works end to end. Pass --checkpoint PATH with trained weights.
################################################################################"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the live WebRTC avatar service (browser page at http://HOST:PORT/)",
        description="Serve the browser client and the WebRTC avatar API. Flags override DAGAN_* variables.",
    )
    p.add_argument("--host", help="interface to listen on (env DAGAN_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (env DAGAN_PORT, default 8000)")
    p.add_argument(
        "--backend",
        help="engine backend: auto, torch, onnxruntime or tensorrt (env DAGAN_BACKEND, default auto)",
    )
    p.add_argument(
        "--checkpoint",
        help="weights (.safetensors) or engine dir (env DAGAN_CHECKPOINT, default: the shipped weights)",
    )
    p.add_argument("--device", help="auto, cpu or cuda[:N] (env DAGAN_DEVICE, default auto)")
    p.add_argument("--precision", help="fp32, fp16 (CUDA) or bf16 (env DAGAN_PRECISION, default fp32)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions (env DAGAN_MAX_SESSIONS, default 8)")
    p.add_argument(
        "--ice-servers",
        help="STUN/TURN servers for use beyond a LAN: comma-separated URLs or a JSON list of RTCIceServer "
        "objects (env DAGAN_ICE_SERVERS)",
    )
    p.add_argument("--ice-username", help="TURN username for --ice-servers URLs (env DAGAN_ICE_USERNAME)")
    p.add_argument("--ice-credential", help="TURN credential (env DAGAN_ICE_CREDENTIAL)")
    p.add_argument(
        "--ice-host-addresses",
        help="comma-separated local addresses to offer as ICE host candidates, e.g. 127.0.0.1 "
        "(env DAGAN_ICE_HOST_ADDRESSES; default: all non-loopback interfaces)",
    )
    p.add_argument("--absolute", action="store_true", help="absolute instead of relative motion by default")
    p.add_argument("--output-size", type=int, help="avatar video side in pixels (env DAGAN_OUTPUT_SIZE, 256)")
    p.add_argument(
        "--ssl-certfile", help="TLS certificate: browsers only allow the camera on https or localhost"
    )
    p.add_argument("--ssl-keyfile", help="TLS private key")
    p.add_argument(
        "--untrained-tiny",
        action="store_true",
        help="serve RANDOMLY INITIALISED tiny weights (no checkpoint needed) to try the service end to end",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        help="PyTorch CPU threads (env DAGAN_TORCH_THREADS; default half the cores, at least 1: the video "
        "codecs and face tracking need the rest)",
    )
    p.add_argument("--client-dir", help="serve the browser client from this folder (env DAGAN_CLIENT_DIR)")
    g = p.add_argument_group("exposure beyond localhost (docs/security.md)")
    g.add_argument(
        "--access-token",
        help="require this bearer token on every /api route and /metrics; 'random' makes one and prints it "
        "(env DAGAN_ACCESS_TOKEN). The page takes it from its address: http://HOST:PORT/#token=TOKEN",
    )
    g.add_argument(
        "--allowed-hosts",
        help="comma-separated host names the server answers to, e.g. avatar.example.org (env "
        "DAGAN_ALLOWED_HOSTS; default: loopback names when bound to loopback, else any)",
    )
    g.add_argument(
        "--allowed-origins",
        help="comma-separated other web origins allowed to call the API (env DAGAN_ALLOWED_ORIGINS)",
    )
    g.add_argument(
        "--turn-urls",
        help="TURN server URLs using coturn's REST API secret, e.g. turn:turn.example.org:3478 "
        "(env DAGAN_TURN_URLS)",
    )
    g.add_argument(
        "--turn-secret",
        help="coturn's static-auth-secret: credentials are minted per session (env DAGAN_TURN_SECRET)",
    )
    g.add_argument(
        "--turn-ttl", type=int, help="TURN credential lifetime in seconds (env DAGAN_TURN_TTL, 21600)"
    )
    g.add_argument(
        "--sessions-per-minute",
        type=float,
        help="new sessions per client address per minute after a burst of 10 "
        "(env DAGAN_SESSIONS_PER_MINUTE, 20)",
    )
    g.add_argument(
        "--docs", action="store_true", help="serve Swagger UI at /docs (it loads scripts from a CDN)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)


def _list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def settings_from_args(args: argparse.Namespace, untrained: bool = False) -> ServerSettings:
    """Flags, then environment variables, then defaults."""
    defaults = ServerSettings()
    hosts = args.ice_host_addresses or _env("DAGAN_ICE_HOST_ADDRESSES")
    client_dir = args.client_dir or _env("DAGAN_CLIENT_DIR")
    token = args.access_token or _env("DAGAN_ACCESS_TOKEN")
    if token == "random":
        from .guard import new_token

        token = args.access_token = new_token()  # the same token when called again after loading weights
    allowed_hosts = _list(args.allowed_hosts or _env("DAGAN_ALLOWED_HOSTS"))
    rate = args.sessions_per_minute
    if rate is None:
        text = _env("DAGAN_SESSIONS_PER_MINUTE")
        try:
            rate = float(text) if text is not None else defaults.sessions_per_minute
        except ValueError as err:
            raise SettingsError(f"$DAGAN_SESSIONS_PER_MINUTE must be a number, got {text!r}") from err
    return ServerSettings(
        host=args.host or _env("DAGAN_HOST", defaults.host),
        port=args.port if args.port is not None else _env_int("DAGAN_PORT", defaults.port),
        max_sessions=(
            args.max_sessions
            if args.max_sessions is not None
            else _env_int("DAGAN_MAX_SESSIONS", defaults.max_sessions)
        ),
        ice_servers=parse_ice_servers(
            args.ice_servers or _env("DAGAN_ICE_SERVERS"),
            args.ice_username or _env("DAGAN_ICE_USERNAME"),
            args.ice_credential or _env("DAGAN_ICE_CREDENTIAL"),
        ),
        ice_host_addresses=tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else None,
        output_size=(
            args.output_size
            if args.output_size is not None
            else _env_int("DAGAN_OUTPUT_SIZE", defaults.output_size)
        ),
        relative=not args.absolute,
        untrained=untrained,
        client_dir=Path(client_dir) if client_dir else defaults.client_dir,
        access_token=token,
        allowed_hosts=allowed_hosts or None,
        allowed_origins=_list(args.allowed_origins or _env("DAGAN_ALLOWED_ORIGINS")),
        turn_urls=_list(args.turn_urls or _env("DAGAN_TURN_URLS")),
        turn_secret=args.turn_secret or _env("DAGAN_TURN_SECRET"),
        turn_ttl_s=args.turn_ttl
        if args.turn_ttl is not None
        else _env_int("DAGAN_TURN_TTL", defaults.turn_ttl_s),
        sessions_per_minute=rate,
        docs=args.docs,
    )


EXPOSED_BANNER = """\
################################################################################
#  WARNING: listening on {host}, beyond this machine, WITHOUT an access token.
#  Anyone who can reach this port can use the service, fill every session slot
#  and spend its GPU. Start it with --access-token random (or DAGAN_ACCESS_TOKEN)
#  and see docs/security.md for TLS and TURN.
################################################################################"""


def exposure_warnings(settings: ServerSettings, tls: bool) -> list[str]:
    """What ``dagan serve`` prints about how exposed this configuration is (empty: nothing to say)."""
    from .guard import is_loopback

    out = []
    if not is_loopback(settings.host):
        if not settings.access_token:
            out.append(EXPOSED_BANNER.format(host=settings.host))
        if not tls:
            out.append(
                "note: browsers allow the camera only on https:// or localhost, and without TLS the token "
                "travels in clear text; use --ssl-certfile/--ssl-keyfile or a TLS reverse proxy"
            )
    if settings.ice_servers and any(s.credential for s in settings.ice_servers):
        out.append(
            "note: --ice-credential is handed to every client as it is; prefer --turn-secret "
            "(time-limited TURN credentials per session)"
        )
    return out


def build_engine(args: argparse.Namespace):
    """The engine to serve: ``--untrained-tiny`` random weights, or a checkpoint resolved like ``animate``."""
    from engine import create_engine

    device = args.device or _env("DAGAN_DEVICE", "auto")
    precision = args.precision or _env("DAGAN_PRECISION", "fp32")
    backend = args.backend or _env("DAGAN_BACKEND", "auto")
    if args.untrained_tiny:
        import torch

        from dagan.config import load_config
        from dagan.model import DaGAN
        from engine.torch_backend import TorchEngine

        torch.manual_seed(0)
        print(UNTRAINED_BANNER, file=sys.stderr)
        return TorchEngine(DaGAN(load_config("tiny")), device=device, precision=precision), True

    from dagan.animate import resolve_checkpoint, warn_if_untrained

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. To try the service without trained weights, run `dagan serve --untrained-tiny`"
        ) from err
    engine = create_engine(checkpoint, backend=backend, device=device, precision=precision)
    untrained = False
    if checkpoint.is_file():
        untrained = warn_if_untrained(checkpoint)
    return engine, untrained


def _set_torch_threads(threads: int) -> None:
    """CPU inference shares the machine with VP8 encoding/decoding and face detection; PyTorch's default
    (one thread per core, spinning while idle) starves them. Measured on 2 cores with the tiny preset:
    1 thread gave 10 ms per frame and 24 fps, 2 threads 20 ms and 20 fps."""
    import torch

    if threads <= 0:
        threads = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .app import create_app
    from .guard import uvicorn_config

    settings_from_args(args)  # fail on bad flags before loading any weights
    _set_torch_threads(
        args.torch_threads if args.torch_threads is not None else _env_int("DAGAN_TORCH_THREADS", 0)
    )
    engine, untrained = build_engine(args)
    settings = settings_from_args(args, untrained=untrained)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings, engine)
    scheme = "https" if args.ssl_certfile else "http"
    shown = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    print(
        f"dagan serve: {engine.backend} engine ({engine.image_size}px), "
        f"up to {settings.max_sessions} sessions; open {scheme}://{shown}:{settings.port}/",
        file=sys.stderr,
    )
    if settings.access_token:
        print(
            f"access token required; the page's address is {scheme}://{shown}:{settings.port}/#token="
            f"{settings.access_token}",
            file=sys.stderr,
        )
    for line in exposure_warnings(settings, tls=bool(args.ssl_certfile)):
        print(line, file=sys.stderr)
    config = uvicorn_config(
        app,
        settings,
        log_level=args.log_level,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    uvicorn.Server(config).run()
    return 0
