"""`dagan serve`'s settings flags and DAGAN_* variables come from one table over ServerSettings, read by one
function (dagan.options.read_options) that `dagan cam` and the container's entry point share."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import socket

import pytest

import server.settings
from dagan.options import ENGINE_OPTIONS, Option, OptionError, read_options
from server.cli import SERVE_OPTIONS, SETTING_OPTIONS, add_commands, engine_options, settings_from_args
from server.settings import ServerSettings, SettingsError


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


# A value per option and what ServerSettings should hold for it (written out, not derived).
SAMPLES = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "max_sessions": ("3", 3),
    "ice_host_addresses": ("127.0.0.1, 10.0.0.2", ("127.0.0.1", "10.0.0.2")),
    "output_size": ("320", 320),
    "picture": ("full", "full"),
    "picture_size": ("1280x720", (1280, 720)),
    "smooth_min_cutoff": ("0.5", 0.5),
    "smooth_beta": ("10", 10.0),
    "auto_neutral_s": ("1.5", 1.5),
    "access_token": ("s3cret-token", "s3cret-token"),
    "allowed_hosts": ("a.example,b.example", ("a.example", "b.example")),
    "allowed_origins": ("https://x.example", ("https://x.example",)),
    "turn_urls": ("turn:t.example:3478", ("turn:t.example:3478",)),
    "turn_secret": ("k", "k"),
    "turn_ttl_s": ("60", 60),
    "sessions_per_minute": ("2.5", 2.5),
    "max_sessions_per_client": ("3", 3),
    "forwarded_allow_ips": ("10.0.0.5, 172.18.0.0/16", ("10.0.0.5", "172.18.0.0/16")),
    # variables only
    "media_threads": ("3", 3),
    "detect_every": ("4", 4),
    "detect_processes": ("2", 2),
    "replica_id": ("replica-7", "replica-7"),
}
# Settings that are only valid together: the other half, given as a flag.
COMPANION = {
    "turn_urls": ["--turn-secret", "k"],
    "turn_secret": ["--turn-urls", "turn:t.example:3478"],
}


def test_every_option_is_a_settings_field_with_one_flag_and_variable():
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
    assert {o.field for o in SETTING_OPTIONS} <= set(fields)
    flags = [f for o in SERVE_OPTIONS if o.cli for f in (o.flag_name, *o.aliases)]
    names = [name for o in SERVE_OPTIONS for name in o.envs]
    assert len(set(flags)) == len(flags) and len(set(names)) == len(names)
    assert set(SAMPLES) | {"client_dir"} == {o.field for o in SETTING_OPTIONS}
    for opt in SERVE_OPTIONS:
        assert all(name.startswith("DAGAN_") and name in opt.help_text() for name in opt.envs)
    for opt in SETTING_OPTIONS:
        assert opt.default == fields[opt.field].default  # the table's default is the dataclass's
    port = next(o for o in SETTING_OPTIONS if o.field == "port")
    assert "default 8000" in port.help_text() and fields["port"].default == 8000
    media = {o.field for o in SETTING_OPTIONS if not o.cli}
    assert media == {"media_threads", "detect_every", "detect_processes", "replica_id"}


def test_settings_dataclass_reads_no_environment(monkeypatch):
    """ServerSettings is pure: no variable changes what its constructor gives, and no default depends on
    the machine (the host name is computed by the reader, for `dagan serve` alone)."""
    source = inspect.getsource(server.settings)
    assert "os.environ" not in source and "getenv" not in source and "gethostname" not in source
    plain = ServerSettings()
    for opt in SERVE_OPTIONS:
        for name in opt.envs:
            monkeypatch.setenv(name, SAMPLES.get(opt.field, ("7", None))[0])
    assert ServerSettings() == plain
    assert plain.replica_id == "local" and plain.detect_every == 3 and plain.media_threads == 0
    for opt in SERVE_OPTIONS:
        for name in opt.envs:
            monkeypatch.delenv(name)
    assert settings_from_args(_args([])).replica_id == socket.gethostname()


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_flag_and_variable_give_the_same_setting(field, monkeypatch):
    opt = next(o for o in SETTING_OPTIONS if o.field == field)
    text, want = SAMPLES[field]
    other = COMPANION.get(field, [])
    if opt.cli:
        assert getattr(settings_from_args(_args([opt.flag_name, text, *other])), field) == want
    else:
        with pytest.raises(SystemExit):  # a variable only: no flag of that name
            _args([opt.flag_name, text])
    monkeypatch.setenv(opt.env, text)
    assert getattr(settings_from_args(_args(other)), field) == want
    monkeypatch.delenv(opt.env)
    if not other and opt.fallback is None:  # else a default of the machine's (the host name)
        assert getattr(settings_from_args(_args([])), field) == getattr(ServerSettings(), field)


def test_bad_values_name_their_source(monkeypatch):
    with pytest.raises(SystemExit):  # a typed flag is argparse's error (usage + exit 2)
        _args(["--port", "x"])
    monkeypatch.setenv("DAGAN_PORT", "x")
    with pytest.raises(SettingsError, match=r"\$DAGAN_PORT must be an integer"):
        settings_from_args(_args([]))
    monkeypatch.delenv("DAGAN_PORT")
    monkeypatch.setenv("DAGAN_SESSIONS_PER_MINUTE", "lots")
    with pytest.raises(SettingsError, match=r"\$DAGAN_SESSIONS_PER_MINUTE must be a number"):
        settings_from_args(_args([]))
    monkeypatch.delenv("DAGAN_SESSIONS_PER_MINUTE")
    monkeypatch.setenv("DAGAN_DETECT_EVERY", "often")
    with pytest.raises(SettingsError, match=r"\$DAGAN_DETECT_EVERY must be an integer"):
        settings_from_args(_args([]))
    monkeypatch.setenv("DAGAN_DETECT_EVERY", "0")
    with pytest.raises(SettingsError, match="DAGAN_DETECT_EVERY must be >= 1"):
        settings_from_args(_args([]))


def _clear_engine_env(monkeypatch) -> None:
    for opt in ENGINE_OPTIONS:
        for name in opt.envs:
            monkeypatch.delenv(name, raising=False)


def test_engine_options_flag_then_variable_then_default(monkeypatch):
    """`dagan serve`'s engine options are the shared table: flag, else variable, else default; the old
    DAGAN_TORCH_THREADS is read after DAGAN_INFER_THREADS, and 0 means the measured split (None)."""
    _clear_engine_env(monkeypatch)
    assert engine_options(_args([])) == {
        "backend": "auto",
        "checkpoint": None,
        "device": "auto",
        "precision": None,
        "threads": None,
        "parallel": None,
    }
    monkeypatch.setenv("DAGAN_BACKEND", "onnxruntime")
    monkeypatch.setenv("DAGAN_PRECISION", "int8")
    monkeypatch.setenv("DAGAN_CHECKPOINT", "/w.safetensors")
    monkeypatch.setenv("DAGAN_TORCH_THREADS", "3")
    got = engine_options(_args(["--precision", "fp32"]))
    assert (got["backend"], got["precision"], got["checkpoint"], got["threads"]) == (
        "onnxruntime",
        "fp32",
        "/w.safetensors",
        3,
    )
    monkeypatch.setenv("DAGAN_INFER_THREADS", "0")  # "not set": the old name still counts
    assert engine_options(_args([]))["threads"] == 3
    monkeypatch.setenv("DAGAN_INFER_THREADS", "2")
    assert engine_options(_args([]))["threads"] == 2
    assert engine_options(_args(["--torch-threads", "5"]))["threads"] == 5
    _clear_engine_env(monkeypatch)
    assert engine_options(_args(["--infer-threads", "0"]))["threads"] is None  # 0: the measured split
    assert engine_options(_args(["--infer-parallel", "0"]))["parallel"] is None  # 0: the default
    monkeypatch.setenv("DAGAN_INFER_PARALLEL", "2")
    assert engine_options(_args([]))["parallel"] == 2
    assert engine_options(_args(["--infer-parallel", "1"]))["parallel"] == 1
    monkeypatch.setenv("DAGAN_INFER_THREADS", "many")
    with pytest.raises(SettingsError, match=r"\$DAGAN_INFER_THREADS: must be an integer"):
        engine_options(_args([]))
    with pytest.raises(SystemExit):
        _args(["--infer-threads", "many"])


def test_read_options_is_variables_only_without_args_and_computes_machine_defaults():
    calls = []
    row = Option("name", ("DAGAN_A", "DAGAN_B"), "x", fallback=lambda: calls.append(1) or "computed")
    number = Option("n", "DAGAN_N", "a number", kind=float, default=1.5)
    assert read_options([row, number], environ={}) == {"name": "computed", "n": 1.5} and calls == [1]
    assert read_options([row], environ={"DAGAN_B": " b "}) == {"name": "b"} and calls == [1]
    assert read_options([row], environ={"DAGAN_A": "a", "DAGAN_B": "b"})["name"] == "a"
    with pytest.raises(OptionError, match=r"\$DAGAN_N must be a number, got 'x'"):
        read_options([number], environ={"DAGAN_N": "x"})
