"""Command-line options and their ``DAGAN_*`` environment variables, declared once in tables.

A command declares what it can be told as :class:`Option` rows (field, variable, help; flag, parser and
default where they are not the obvious ones). :func:`add_options` turns a table into ``argparse`` flags,
and :func:`read_options` is the one function that reads them: the flag, else the variable, else the
row's default. A default that depends on the machine (the host name, the installed page) is a row's
``fallback``, computed by :func:`read_options` when it is needed, so the settings dataclasses that take
the values keep plain constant defaults and their tests do not depend on the machine they run on.

The engine options (:data:`ENGINE_OPTIONS`: backend, checkpoint, device, precision, inference threads
and parallel calls) are one table for ``dagan serve``, ``dagan cam``, the container's entry point and the
benchmarks, so a variable means the same thing wherever it is read. The server's own table is
:data:`server.cli.SETTING_OPTIONS`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UserError


class OptionError(UserError, ValueError):
    """A flag or variable whose text cannot be read as its option's type; the message names it."""


def parse_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``: a comma-separated list, blanks dropped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_list_or_none(text: str) -> tuple[str, ...] | None:
    """As :func:`parse_list`, with an empty list meaning "not set" (None: the setting's own default)."""
    return parse_list(text) or None


def parse_threads(text: str) -> int | None:
    """A thread count, 0 meaning "not set" (None: the engine's measured split of the cores)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value or None


@dataclass(frozen=True)
class Option:
    """One thing a command can be told, as a flag and one or more ``DAGAN_*`` variables.

    ``field``: the key :func:`read_options` returns it under (a settings field, a keyword argument).
    ``env``: the variable, or several read in order (an old name after the current one). ``flag``:
    derived from ``field`` unless given (``cli=False``: a variable only). ``kind`` (int, float or str) and
    ``parse`` (text → value) convert flag and variable alike, so the two cannot drift apart. ``default``
    is what is used when neither is given and is shown in ``--help`` (``default_text`` when it is not a
    plain value); ``fallback`` computes a default that depends on the machine, at reading time.
    """

    field: str
    env: str | tuple[str, ...]
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    kind: type = str
    parse: Callable[[str], Any] | None = None
    default: Any = None
    default_text: str | None = None
    fallback: Callable[[], Any] | None = None
    cli: bool = True
    group: str | None = None

    @property
    def envs(self) -> tuple[str, ...]:
        """Every variable of this option, in the order they are read."""
        return (self.env,) if isinstance(self.env, str) else tuple(self.env)

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        """The ``argparse`` attribute the flag is stored in."""
        return self.flag_name[2:].replace("-", "_")

    def convert(self, text: str, source: str) -> Any:
        """Text of a flag or a variable → the value; ``source`` names it in the error (``$DAGAN_PORT``)."""
        try:
            if self.parse is not None:
                return self.parse(text)
            if self.kind is int:
                return int(text)
            if self.kind is float:
                return float(text)
        except OptionError:
            raise
        except (ValueError, TypeError) as err:
            if self.parse is None:
                what = "an integer" if self.kind is int else "a number"
                raise OptionError(f"{source} must be {what}, got {text!r}") from err
            raise OptionError(f"{source}: {err}") from err
        return text

    def help_text(self) -> str:
        default = self.default_text
        if default is None:
            value = self.default
            default = (
                "none" if value in (None, ()) else f"{value:g}" if isinstance(value, float) else str(value)
            )
        return f"{self.help} (env {' or '.join(self.envs)}; default {default})"


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    options: Iterable[Option],
    groups: Mapping[str | None, Any] | None = None,
) -> None:
    """The flags of ``options`` on ``parser`` (or on ``groups[option.group]``), with their help text.

    Every flag is converted by its option's own parser while the command line is read, so a bad value
    is argparse's usage error (exit status 2) naming the flag; unset flags stay None, so that
    :func:`read_options` can tell them from a given value.
    """
    for opt in options:
        if not opt.cli:
            continue
        target = (groups or {}).get(opt.group, parser)

        def convert(text: str, opt: Option = opt) -> Any:
            try:
                return opt.convert(text, opt.flag_name)
            except OptionError as err:
                raise argparse.ArgumentTypeError(str(err)) from err

        target.add_argument(opt.flag_name, *opt.aliases, dest=opt.dest, type=convert, help=opt.help_text())


def read_options(
    options: Iterable[Option],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """{field: value} for every option: the flag in ``args``, else the first of its variables that is set
    (and not empty), else its ``fallback()``, else its default.

    The one reader of flags and ``DAGAN_*`` variables: ``args`` None reads variables only (the container
    entry point, a benchmark's server); ``environ`` defaults to ``os.environ``. A variable whose value
    parses to None (``DAGAN_INFER_THREADS=0``) counts as unset, so the next one is read.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in options:
        value = getattr(args, opt.dest, None) if args is not None and opt.cli else None
        if value is None:
            for name in opt.envs:
                text = env.get(name, "").strip()
                if text and (value := opt.convert(text, f"${name}")) is not None:
                    break
        if value is None:
            value = opt.fallback() if opt.fallback is not None else opt.default
        values[opt.field] = value
    return values


# -- the engine, for every command that runs one --------------------------------------------------
ENGINE_OPTIONS: tuple[Option, ...] = (
    Option(
        "backend",
        "DAGAN_BACKEND",
        "engine backend: auto, torch, onnxruntime or tensorrt",
        default="auto",
    ),
    Option(
        "checkpoint",
        "DAGAN_CHECKPOINT",
        "weights (.safetensors) or engine dir",
        default_text="the shipped weights",
    ),
    Option("device", "DAGAN_DEVICE", "auto, cpu or cuda[:N]", default="auto"),
    Option(
        "precision",
        "DAGAN_PRECISION",
        "fp32, int8 (onnxruntime, CPU), bf16 (torch, CPU) or fp16 (CUDA)",
        default_text="on a CPU the fastest that holds quality, chosen and prepared on first start, see "
        "docs/export.md",
    ),
    Option(
        "threads",
        ("DAGAN_INFER_THREADS", "DAGAN_TORCH_THREADS"),
        "CPU threads for inference, onnxruntime or torch",
        flag="--infer-threads",
        aliases=("--torch-threads",),
        kind=int,
        parse=parse_threads,
        default_text="the cores split between inference and media by measured costs",
    ),
    Option(
        "parallel",
        "DAGAN_INFER_PARALLEL",
        "onnxruntime on a CPU: concurrent calls a batch of several streams is split into",
        flag="--infer-parallel",
        kind=int,
        parse=parse_threads,
        default_text="one per group of inference threads, i.e. every core",
    ),
)
