"""``dagan serve``: run the live avatar service with uvicorn.

The :class:`~server.settings.ServerSettings` flags and their ``DAGAN_*`` environment variables come from
one table (:data:`SETTING_OPTIONS`: field, flag, variable, help; type and default from the dataclass),
so a container or a systemd unit can be configured without a command line. Flags win over variables.
The engine flags (``--backend``, ``--device``, ...) have variables too; ``--absolute``, ``--docs``,
``--untrained-tiny``, ``--ssl-*`` and ``--log-level`` are flags only (docs/server.md lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagan.checkpoint import CheckpointError

from .settings import ServerSettings, SettingsError, parse_ice_servers, parse_picture_size


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


# -- ServerSettings on the command line and in the environment, declared once ------------------------
def _list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def _list_or_none(text: str) -> tuple[str, ...] | None:
    return _list(text) or None


def _plain(kind: Any) -> Any:
    """``int | None`` → ``int``: a setting whose None means "derived from another" is given as an int."""
    args = [t for t in typing.get_args(kind) if t is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float) else kind


_SETTING_TYPES = {name: _plain(kind) for name, kind in typing.get_type_hints(ServerSettings).items()}
_SETTING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
EXPOSURE = "exposure beyond localhost (docs/security.md)"


@dataclass(frozen=True)
class SettingOption:
    """One :class:`ServerSettings` field as a ``dagan serve`` flag and a ``DAGAN_*`` variable.

    The flag (``--max-sessions``) derives from the field name unless given, the default shown in
    ``--help`` and the type come from the dataclass, and flag and variable go through the same parser
    (a flag wins over the variable, the variable over the default), so the three cannot drift apart.
    """

    field: str
    env: str
    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None  # text → value; default: by the field's type
    default_text: str | None = None  # for a default that is not a plain value
    group: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag_name[2:].replace("-", "_")

    def convert(self, text: str, source: str) -> Any:
        if self.parse is not None:
            return self.parse(text)
        kind = _SETTING_TYPES[self.field]
        if kind is int:
            try:
                return int(text)
            except ValueError as err:
                raise SettingsError(f"{source} must be an integer, got {text!r}") from err
        if kind is float:
            try:
                return float(text)
            except ValueError as err:
                raise SettingsError(f"{source} must be a number, got {text!r}") from err
        return text

    def help_text(self) -> str:
        default = self.default_text
        if default is None:
            value = _SETTING_DEFAULTS[self.field]
            default = (
                "none" if value in (None, ()) else f"{value:g}" if isinstance(value, float) else str(value)
            )
        return f"{self.help} (env {self.env}; default {default})"


SETTING_OPTIONS: tuple[SettingOption, ...] = (
    SettingOption("host", "DAGAN_HOST", "interface to listen on"),
    SettingOption("port", "DAGAN_PORT", "TCP port"),
    SettingOption("max_sessions", "DAGAN_MAX_SESSIONS", "concurrent sessions; one more gets 503"),
    SettingOption(
        "ice_host_addresses",
        "DAGAN_ICE_HOST_ADDRESSES",
        "comma-separated local addresses to offer as ICE host candidates, e.g. 127.0.0.1",
        parse=_list_or_none,
        default_text="all non-loopback interfaces",
    ),
    SettingOption(
        "output_size", "DAGAN_OUTPUT_SIZE", "avatar video side in pixels (the model output is resized to it)"
    ),
    SettingOption(
        "picture",
        "DAGAN_PICTURE",
        "what a session shows unless it asks: crop (the model's face crop) or full (the avatar pasted "
        "back into the whole photo)",
    ),
    SettingOption(
        "picture_size",
        "DAGAN_PICTURE_SIZE",
        "video size of full-picture sessions, WIDTHxHEIGHT (the photo is fitted into it)",
        parse=parse_picture_size,
        default_text="640x360",
    ),
    SettingOption(
        "smooth_min_cutoff",
        "DAGAN_SMOOTH_MIN_CUTOFF",
        "One-Euro filter on each session's crop box and keypoints: cutoff (Hz) of a still face, lower is "
        "steadier; 0 turns the filters off",
    ),
    SettingOption(
        "smooth_beta",
        "DAGAN_SMOOTH_BETA",
        "One-Euro speed coefficient: higher follows fast motion with less lag",
    ),
    SettingOption(
        "auto_neutral_s",
        "DAGAN_AUTO_NEUTRAL",
        "> 0: sessions choose their neutral pose automatically, the frame closest to the photo's pose in "
        "their first this-many seconds (a session can ask for it too)",
        flag="--auto-neutral",
    ),
    SettingOption(
        "client_dir",
        "DAGAN_CLIENT_DIR",
        "serve the browser client from this folder",
        parse=Path,
        default_text="the installed client_web page",
    ),
    SettingOption(
        "access_token",
        "DAGAN_ACCESS_TOKEN",
        "require this bearer token on every /api route and /metrics; 'random' makes one and prints it. "
        "The page takes it from its address: http://HOST:PORT/#token=TOKEN",
        group=EXPOSURE,
    ),
    SettingOption(
        "allowed_hosts",
        "DAGAN_ALLOWED_HOSTS",
        "comma-separated host names the server answers to, e.g. avatar.example.org",
        parse=_list_or_none,
        default_text="loopback names when bound to loopback, else this machine's own addresses and names",
        group=EXPOSURE,
    ),
    SettingOption(
        "allowed_origins",
        "DAGAN_ALLOWED_ORIGINS",
        "comma-separated other web origins allowed to call the API",
        parse=_list,
        group=EXPOSURE,
    ),
    SettingOption(
        "turn_urls",
        "DAGAN_TURN_URLS",
        "TURN server URLs using coturn's REST API secret, e.g. turn:turn.example.org:3478",
        parse=_list,
        group=EXPOSURE,
    ),
    SettingOption(
        "turn_secret",
        "DAGAN_TURN_SECRET",
        "coturn's static-auth-secret: credentials are minted per session",
        group=EXPOSURE,
    ),
    SettingOption(
        "turn_ttl_s",
        "DAGAN_TURN_TTL",
        "TURN credential lifetime in seconds",
        flag="--turn-ttl",
        group=EXPOSURE,
    ),
    SettingOption(
        "sessions_per_minute",
        "DAGAN_SESSIONS_PER_MINUTE",
        "new sessions per client address per minute, after a burst as large as --max-sessions-per-client",
        group=EXPOSURE,
    ),
    SettingOption(
        "max_sessions_per_client",
        "DAGAN_MAX_SESSIONS_PER_CLIENT",
        "sessions one client address may hold at once (IPv6: per /64); one more gets 429",
        default_text="half of --max-sessions, at least 1",
        group=EXPOSURE,
    ),
    SettingOption(
        "forwarded_allow_ips",
        "DAGAN_FORWARDED_ALLOW_IPS",
        "comma-separated addresses or networks of the reverse proxies whose X-Forwarded-For names the "
        "client, e.g. 10.0.0.5; from any other peer the header is ignored",
        parse=_list,
        default_text="none: the TCP peer is the client",
        group=EXPOSURE,
    ),
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the live WebRTC avatar service (browser page at http://HOST:PORT/)",
        description="Serve the browser client and the WebRTC avatar API. Flags override DAGAN_* variables.",
    )
    groups = {None: p, EXPOSURE: p.add_argument_group(EXPOSURE)}
    for opt in SETTING_OPTIONS:  # ServerSettings fields: flag, variable and default from one table
        kind = _SETTING_TYPES[opt.field]
        typed = {"type": kind} if kind in (int, float) and opt.parse is None else {}
        groups[opt.group].add_argument(opt.flag_name, dest=opt.dest, help=opt.help_text(), **typed)
    # The engine and the process (not ServerSettings fields).
    p.add_argument(
        "--backend",
        help="engine backend: auto, torch, onnxruntime or tensorrt (env DAGAN_BACKEND, default auto)",
    )
    p.add_argument(
        "--checkpoint",
        help="weights (.safetensors) or engine dir (env DAGAN_CHECKPOINT, default: the shipped weights)",
    )
    p.add_argument("--device", help="auto, cpu or cuda[:N] (env DAGAN_DEVICE, default auto)")
    p.add_argument(
        "--precision",
        help="fp32, int8 (onnxruntime, CPU), bf16 (torch, CPU) or fp16 (CUDA) (env DAGAN_PRECISION; default: "
        "on a CPU the fastest that holds quality, chosen and prepared on first start, see docs/export.md)",
    )
    p.add_argument(
        "--ice-servers",
        help="STUN/TURN servers for use beyond a LAN: comma-separated URLs or a JSON list of RTCIceServer "
        "objects (env DAGAN_ICE_SERVERS)",
    )
    p.add_argument("--ice-username", help="TURN username for --ice-servers URLs (env DAGAN_ICE_USERNAME)")
    p.add_argument("--ice-credential", help="TURN credential (env DAGAN_ICE_CREDENTIAL)")
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
    p.add_argument(
        "--infer-threads",
        "--torch-threads",
        dest="torch_threads",
        type=int,
        help="CPU threads for inference, onnxruntime or torch (env DAGAN_INFER_THREADS or "
        "DAGAN_TORCH_THREADS; default: the cores split between inference and media by measured costs)",
    )
    groups[EXPOSURE].add_argument(
        "--docs", action="store_true", help="serve Swagger UI at /docs (it loads scripts from a CDN)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_cmd_serve)


def settings_from_args(args: argparse.Namespace, untrained: bool = False) -> ServerSettings:
    """Flags, then environment variables, then defaults (:data:`SETTING_OPTIONS`)."""
    values: dict[str, Any] = {}
    for opt in SETTING_OPTIONS:
        value = getattr(args, opt.dest)  # argparse already converted int/float flags
        if value is None and (text := _env(opt.env)) is not None:
            value = opt.convert(text, f"${opt.env}")
        elif isinstance(value, str):
            value = opt.convert(value, opt.flag_name)
        if value is not None:
            values[opt.field] = value
    # The page folder is checked when it is passed explicitly, so pass the default one too: a broken
    # install fails here with a message naming --client-dir, not on the first page request.
    values.setdefault("client_dir", ServerSettings().client_dir)
    if values.get("access_token") == "random":
        from .guard import new_token

        # the same token when called again after loading weights
        values["access_token"] = args.access_token = new_token()
    return ServerSettings(
        **values,
        ice_servers=parse_ice_servers(
            args.ice_servers or _env("DAGAN_ICE_SERVERS"),
            args.ice_username or _env("DAGAN_ICE_USERNAME"),
            args.ice_credential or _env("DAGAN_ICE_CREDENTIAL"),
        ),
        relative=not args.absolute,
        untrained=untrained,
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

    device = args.device or _env("DAGAN_DEVICE", "auto")
    precision = args.precision or _env("DAGAN_PRECISION")
    backend = args.backend or _env("DAGAN_BACKEND", "auto")
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
        checkpoint = resolve_checkpoint(args.checkpoint)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. To try the service without trained weights, run `dagan serve --untrained-tiny`"
        ) from err
    # on a CPU: the fastest backend and precision that holds quality, prepared on first start (engine.select)
    threads = getattr(args, "torch_threads", None)
    if threads is None:
        threads = _env_int("DAGAN_INFER_THREADS", 0) or _env_int("DAGAN_TORCH_THREADS", 0) or None
    engine, args.engine_choice = default_engine(
        checkpoint, backend=backend, device=device, precision=precision, threads=threads
    )
    untrained = False
    if checkpoint.is_file():
        untrained = warn_if_untrained(checkpoint)
    return engine, untrained


def _set_torch_threads(threads: int) -> None:
    """CPU inference shares the machine with VP8 encoding/decoding and face detection; PyTorch's default
    (one thread per core, spinning while idle) starves them, so the default is half the cores (the
    measurement behind it is in docs/benchmarks.md)."""
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
    if args.untrained_tiny:
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
