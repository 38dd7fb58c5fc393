"""server.compat holds every use of aiortc/aioice internals: the installed aiortc must be one it was checked
against (the range pyproject.toml pins), and every internal it reaches for must exist."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from server import compat

ROOT = Path(__file__).resolve().parent.parent


def test_installed_aiortc_is_in_the_checked_range():
    installed = version("aiortc")
    assert compat.aiortc_in_range(installed), (
        f"aiortc {installed} is installed, but server/compat.py was checked against aiortc "
        f"{''.join(compat.AIORTC_RANGE)} (last on {compat.CHECKED_ON}); read its functions against this "
        "aiortc's source, run the WebRTC tests, then widen AIORTC_RANGE and the pin in pyproject.toml"
    )


def test_every_internal_compat_needs_exists():
    missing = compat.missing_internals()
    assert not missing, (
        f"aiortc {version('aiortc')} / aioice {version('aioice')} lack internals server/compat.py uses: "
        f"{', '.join(missing)}; adapt server/compat.py to this version"
    )


def test_pyproject_pins_the_range_compat_was_checked_against():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [
        spec
        for extra in project["project"]["optional-dependencies"].values()
        for spec in extra
        if re.match(r"aiortc\b", spec)
    ]
    assert pins and set(pins) == {"aiortc" + ",".join(compat.AIORTC_RANGE)}, pins


def test_range_check_refuses_versions_outside():
    assert compat.aiortc_in_range("1.9.0") and compat.aiortc_in_range("1.16.0")
    assert not compat.aiortc_in_range("1.8.2") and not compat.aiortc_in_range("1.17.0")
    assert not compat.aiortc_in_range("2.0")
