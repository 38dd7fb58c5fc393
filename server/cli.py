"""``dagan serve``: run the live avatar service with uvicorn.

Every :class:`~server.settings.ServerSettings` flag and ``DAGAN_*`` variable is a row of one table
(:data:`SETTING_OPTIONS`: field, variable, help; type and default from the dataclass), the engine's are
the shared :data:`dagan.options.ENGINE_OPTIONS`, and :func:`settings_from_args` reads them all with the
one reader :func:`dagan.options.read_options`, so a container or a systemd unit can be configured without
a command line. Flags win over variables. A few settings are variables only (the media pipeline and the
replica name), and ``--absolute``, ``--docs``, ``--untrained-tiny``, ``--ssl-*`` and ``--log-level`` are
flags only (docs/server.md lists them all).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dagan.checkpoint import CheckpointError
from dagan.options import (
    ENGINE_OPTIONS,
    Option,
    OptionError,
    add_options,
    parse_list,
    parse_list_or_none,
    read_options,
)

from . import settings as settings_module
from .settings import ServerSettings, SettingsError, parse_ice_servers, parse_picture_size

UNTRAINED_BANNER = """\
################################################################################
#  WARNING: serving UNTRAINED, randomly initialised tiny weights (--untrained-tiny).
#  The avatar will not look like the photo (a grey square): this only shows that
#  the service works end to end. Pass --checkpoint PATH with trained weights.
################################################################################"""


# -- ServerSettings on the command line and in the environment, declared once ------------------------
def _plain(kind: Any) -> Any:
    """``int | None`` → ``int``: a setting whose None means "derived from another" is given as an int."""
    args = [t for t in typing.get_args(kind) if t is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float) else kind


_SETTING_TYPES = {name: _plain(kind) for name, kind in typing.get_type_hints(ServerSettings).items()}
_SETTING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
EXPOSURE = "exposure beyond localhost (docs/security.md)"


def setting(field: str, env: str, help: str, **row: Any) -> Option:
    """A :class:`ServerSettings` field as an :class:`~dagan.options.Option`: type (int and float are
    converted, anything else is text unless the row has its own parser) and default from the dataclass,
    so the table cannot disagree with it."""
    kind = _SETTING_TYPES[field]
    return Option(
        field,
        env,
        help,
        kind=kind if kind in (int, float) else str,
        default=_SETTING_DEFAULTS[field],
        **row,
    )


def _installed_page() -> Any:
    # looked up when read, so that a test can stand in for a broken install
    return settings_module.default_client_dir()


SETTING_OPTIONS: tuple[Option, ...] = (
    setting("host", "DAGAN_HOST", "interface to listen on"),
    setting("port", "DAGAN_PORT", "TCP port"),
    setting("max_sessions", "DAGAN_MAX_SESSIONS", "concurrent sessions; one more gets 503"),
    setting(
        "ice_host_addresses",
        "DAGAN_ICE_HOST_ADDRESSES",
        "comma-separated local addresses to offer as ICE host candidates, e.g. 127.0.0.1",
        parse=parse_list_or_none,
        default_text="all non-loopback interfaces",
    ),
    setting(
        "output_size", "DAGAN_OUTPUT_SIZE", "avatar video side in pixels (the model output is resized to it)"
    ),
    setting(
        "picture",
        "DAGAN_PICTURE",
        "what a session shows unless it asks: crop (the model's face crop) or full (the avatar pasted "
        "back into the whole photo)",
    ),
    setting(
        "picture_size",
        "DAGAN_PICTURE_SIZE",
        "video size of full-picture sessions, WIDTHxHEIGHT (the photo is fitted into it)",
        parse=parse_picture_size,
        default_text="640x360",
    ),
    setting(
        "smooth_min_cutoff",
        "DAGAN_SMOOTH_MIN_CUTOFF",
        "One-Euro filter on each session's crop box and keypoints: cutoff (Hz) of a still face, lower is "
        "steadier; 0 turns the filters off",
    ),
    setting(
        "smooth_beta",
        "DAGAN_SMOOTH_BETA",
        "One-Euro speed coefficient: higher follows fast motion with less lag",
    ),
    setting(
        "auto_neutral_s",
        "DAGAN_AUTO_NEUTRAL",
        "> 0: sessions choose their neutral pose automatically, the frame closest to the photo's pose in "
        "their first this-many seconds (a session can ask for it too)",
        flag="--auto-neutral",
    ),
    setting(
        "client_dir",
        "DAGAN_CLIENT_DIR",
        "serve the browser client from this folder",
        parse=Path,
        # The page folder is checked when it is given, so the default one is given too: a broken install
        # fails at start with a message naming --client-dir, not on the first page request.
        fallback=_installed_page,
        default_text="the installed client_web page",
    ),
    setting(
        "access_token",
        "DAGAN_ACCESS_TOKEN",
        "require this bearer token on every /api route and /metrics; 'random' makes one and prints it. "
        "The page takes it from its address: http://HOST:PORT/#token=TOKEN",
        group=EXPOSURE,
    ),
    setting(
        "allowed_hosts",
        "DAGAN_ALLOWED_HOSTS",
        "comma-separated host names the server answers to, e.g. avatar.example.org",
        parse=parse_list_or_none,
        default_text="loopback names when bound to loopback, else this machine's own addresses and names",
        group=EXPOSURE,
    ),
    setting(
        "allowed_origins",
        "DAGAN_ALLOWED_ORIGINS",
        "comma-separated other web origins allowed to call the API",
        parse=parse_list,
        group=EXPOSURE,
    ),
    setting(
        "turn_urls",
        "DAGAN_TURN_URLS",
        "TURN server URLs using coturn's REST API secret, e.g. turn:turn.example.org:3478",
        parse=parse_list,
        group=EXPOSURE,
    ),
    setting(
        "turn_secret",
        "DAGAN_TURN_SECRET",
        "coturn's static-auth-secret: credentials are minted per session",
        group=EXPOSURE,
    ),
    setting(
        "turn_ttl_s",
        "DAGAN_TURN_TTL",
        "TURN credential lifetime in seconds",
        flag="--turn-ttl",
        group=EXPOSURE,
    ),
    setting(
        "sessions_per_minute",
        "DAGAN_SESSIONS_PER_MINUTE",
        "new sessions per client address per minute, after a burst as large as --max-sessions-per-client",
        group=EXPOSURE,
    ),
    setting(
        "max_sessions_per_client",
        "DAGAN_MAX_SESSIONS_PER_CLIENT",
        "sessions one client address may hold at once (IPv6: per /64); one more gets 429",
        default_text="half of --max-sessions, at least 1",
        group=EXPOSURE,
    ),
    setting(
        "forwarded_allow_ips",
        "DAGAN_FORWARDED_ALLOW_IPS",
        "comma-separated addresses or networks of the reverse proxies whose X-Forwarded-For names the "
        "client, e.g. 10.0.0.5; from any other peer the header is ignored",
        parse=parse_list,
        default_text="none: the TCP peer is the client",
        group=EXPOSURE,
    ),
    # The media pipeline and the replica's name: variables only (docs/deployment-scale.md).
    setting(
        "media_threads",
        "DAGAN_MEDIA_THREADS",
        "threads for the per-session media work (YUV to RGB, face tracking, crop, compose); 0: one per core",
        cli=False,
    ),
    setting(
        "detect_every",
        "DAGAN_DETECT_EVERY",
        "face detection on every k-th frame of a session, constant-velocity prediction in between",
        cli=False,
    ),
    setting(
        "detect_processes",
        "DAGAN_DETECT_PROCESSES",
        "> 0: face detection in that many worker processes instead of the media threads",
        cli=False,
    ),
    setting(
        "replica_id",
        "DAGAN_REPLICA_ID",
        "this process's name behind a load balancer (X-Dagan-Replica, dagan_replica_info)",
        fallback=socket.gethostname,
        default_text="the host name",
        cli=False,
    ),
)

# Three rows that make one setting (ServerSettings.ice_servers, by parse_ice_servers).
ICE_OPTIONS: tuple[Option, ...] = (
    Option(
        "ice_servers",
        "DAGAN_ICE_SERVERS",
        "STUN/TURN servers for use beyond a LAN: comma-separated URLs or a JSON list of RTCIceServer objects",
    ),
    Option("ice_username", "DAGAN_ICE_USERNAME", "TURN username for --ice-servers URLs"),
    Option("ice_credential", "DAGAN_ICE_CREDENTIAL", "TURN credential"),
)
# Every row `dagan serve` reads (the compose file passes each variable through: tests/test_docker.py).
SERVE_OPTIONS: tuple[Option, ...] = (*SETTING_OPTIONS, *ICE_OPTIONS, *ENGINE_OPTIONS)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the live WebRTC avatar service (browser page at http://HOST:PORT/)",
        description="Serve the browser client and the WebRTC avatar API. Flags override DAGAN_* variables.",
        epilog="Variables without a flag: " + "; ".join(o.help_text() for o in SETTING_OPTIONS if not o.cli),
    )
    groups = {None: p, EXPOSURE: p.add_argument_group(EXPOSURE)}
    add_options(p, SETTING_OPTIONS, groups)  # ServerSettings fields: flag, variable and default, one table
    add_options(p, ENGINE_OPTIONS)  # the engine, as `dagan cam` and the container's entry point read it
    add_options(p, ICE_OPTIONS)
    p.add_argument("--absolute", action="store_true", help="absolute instead of relative motion by default")
    p.add_argument(
        "--ssl-certfile", help="TLS certificate: browsers only allow the camera on https or localhost"
    )
    p.add_argument("--ssl-keyfile", help="TLS private key")
    p.add_argument(
        "--untrained-tiny",
        action="store_true",
        help="serve RANDOMLY INITIALISED tiny weights (no checkpoint needed) to try the service end to end",
    )
    groups[EXPOSURE].add_argument(
        "--docs", action="store_true", help="serve Swagger UI at /docs (it loads scripts from a CDN)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)


def read_server_options(
    options: Iterable[Option],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`dagan.options.read_options` with its errors as :class:`SettingsError` (what callers of the
    server's configuration catch)."""
    try:
        return read_options(options, args, environ)
    except SettingsError:
        raise
    except OptionError as err:
        raise SettingsError(str(err)) from err


def settings_from_args(
    args: argparse.Namespace | None = None,
    untrained: bool = False,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings:
    """The one reading of ``dagan serve``'s configuration: flags, then ``DAGAN_*`` variables, then
    defaults (:data:`SETTING_OPTIONS`, :data:`ICE_OPTIONS`). ``args`` None: variables only."""
    values = read_server_options(SETTING_OPTIONS, args, environ)
    ice = read_server_options(ICE_OPTIONS, args, environ)
    if values.get("access_token") == "random":
        from .guard import new_token

        values["access_token"] = new_token()
        if args is not None:  # the same token when called again after loading weights
            args.access_token = values["access_token"]
    return ServerSettings(
        **values,
        ice_servers=parse_ice_servers(ice["ice_servers"], ice["ice_username"], ice["ice_credential"]),
        relative=not getattr(args, "absolute", False),
        untrained=untrained,
        docs=getattr(args, "docs", False),
    )


def engine_options(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """The engine to run, as flags and variables give it (:data:`dagan.options.ENGINE_OPTIONS`):
    ``backend``, ``checkpoint``, ``device``, ``precision``, ``threads``."""
    return read_server_options(ENGINE_OPTIONS, args)


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
        if settings.allowed_hosts is None:
            from .guard import own_host_names

            names = sorted(own_host_names(settings.host))
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            out.append(
                f"note: no --allowed-hosts: answering only to this machine's own addresses and names "
                f"({shown}); any other Host gets 403, because a web page could otherwise reach the API "
                "through DNS rebinding (its own name resolved to this machine). Set --allowed-hosts "
                "(DAGAN_ALLOWED_HOSTS) to the names clients use"
            )
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
    from engine.select import default_engine

    opts = engine_options(args)
    device, precision = opts["device"], opts["precision"]
    if args.untrained_tiny:
        precision = precision or "fp32"
        import torch

        from dagan.config import load_config
        from dagan.model import DaGAN
        from engine.torch_backend import TorchEngine

        torch.manual_seed(0)
        print(UNTRAINED_BANNER, file=sys.stderr)
        return TorchEngine(DaGAN(load_config("tiny")), device=device, precision=precision), True

    from dagan.checkpoint import resolve_checkpoint, warn_if_untrained

    try:
        checkpoint = resolve_checkpoint(opts["checkpoint"])
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. To try the service without trained weights, run `dagan serve --untrained-tiny`"
        ) from err
    # on a CPU: the fastest backend and precision that holds quality, prepared on first start (engine.select)
    engine, args.engine_choice = default_engine(
        checkpoint,
        backend=opts["backend"],
        device=device,
        precision=precision,
        threads=opts["threads"],
        parallel=opts["parallel"],
    )
    untrained = False
    if checkpoint.is_file():
        untrained = warn_if_untrained(checkpoint)
    return engine, untrained


def _set_torch_threads(threads: int | None) -> None:
    """CPU inference shares the machine with VP8 encoding/decoding and face detection; PyTorch's default
    (one thread per core, spinning while idle) starves them, so the default is half the cores (the
    measurement behind it is in docs/benchmarks.md)."""
    import torch

    if not threads:
        threads = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .app import create_app
    from .guard import uvicorn_config

    settings_from_args(args)  # fail on bad flags before loading any weights
    if args.untrained_tiny:
        _set_torch_threads(engine_options(args)["threads"])
    engine, untrained = build_engine(args)
    settings = settings_from_args(args, untrained=untrained)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings, engine)
    scheme = "https" if args.ssl_certfile else "http"
    shown = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0", "::") else settings.host
    choice = getattr(args, "engine_choice", None)
    chosen = f": {choice.describe()}" if choice is not None else ""
    print(
        f"dagan serve: {engine.backend} engine ({engine.image_size}px){chosen}; "
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
