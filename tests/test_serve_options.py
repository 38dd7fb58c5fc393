"""`dagan serve`'s settings flags and DAGAN_* variables come from one table over ServerSettings."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from server.cli import SETTING_OPTIONS, add_commands, settings_from_args
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
}
# Settings that are only valid together: the other half, given as a flag.
COMPANION = {
    "turn_urls": ["--turn-secret", "k"],
    "turn_secret": ["--turn-urls", "turn:t.example:3478"],
}


def test_every_option_is_a_settings_field_with_one_flag_and_variable():
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
    assert {o.field for o in SETTING_OPTIONS} <= set(fields)
    assert (
        len({o.env for o in SETTING_OPTIONS})
        == len({o.flag_name for o in SETTING_OPTIONS})
        == len(SETTING_OPTIONS)
    )
    assert set(SAMPLES) | {"client_dir"} == {o.field for o in SETTING_OPTIONS}
    for opt in SETTING_OPTIONS:
        assert opt.env.startswith("DAGAN_") and opt.env in opt.help_text()
    port = next(o for o in SETTING_OPTIONS if o.field == "port")
    assert "default 8000" in port.help_text() and fields["port"].default == 8000


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_flag_and_variable_give_the_same_setting(field, monkeypatch):
    opt = next(o for o in SETTING_OPTIONS if o.field == field)
    text, want = SAMPLES[field]
    other = COMPANION.get(field, [])
    assert getattr(settings_from_args(_args([opt.flag_name, text, *other])), field) == want
    monkeypatch.setenv(opt.env, text)
    assert getattr(settings_from_args(_args(other)), field) == want
    monkeypatch.delenv(opt.env)
    if not other:
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
