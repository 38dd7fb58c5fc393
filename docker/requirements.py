#!/usr/bin/env python3
"""Print the project's third-party requirements for some extras, one per line, read from pyproject.toml.

The images install these *before* they copy the sources, so a source change rebuilds only the last small
layer instead of reinstalling ~1 GB of dependencies. Reading pyproject.toml keeps one list of
requirements (no requirements.txt to drift). Self-references such as ``dagan-avatar[serve,cam]`` are
expanded; ``--exclude NAME`` drops a requirement the image installs on its own (torch from the right
index, onnxruntime-gpu instead of the CPU wheel).

Usage: ``python3 requirements.py pyproject.toml serve,export,ort [--exclude torch ...] [--freeze]``

``--freeze`` prints instead the installed version of every distribution these requirements pull in,
walked through the metadata of the environment running the script: that is how docker/constraints.txt
is made from the project's tested .venv, so an image resolves to the versions CI tests instead of
letting pip backtrack through dozens of mediapipe/jaxlib/opencv releases (minutes and gigabytes).
Distributions reached only through an excluded one (torch's own dependencies) are left out, so each
image's torch keeps the versions it pins.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """Normalised distribution name of a PEP 508 requirement (``Foo_Bar>=1`` -> ``foo-bar``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, extras: list[str], exclude: set[str]) -> list[str]:
    """Base dependencies plus those of ``extras`` (self-references expanded), without ``exclude``."""
    project = pyproject["project"]
    own = requirement_name(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(items: list[str]) -> None:
        for item in items:
            name = requirement_name(item)
            if name == own:  # "dagan-avatar[serve,cam]": the project's own extras
                inner = re.search(r"\[([^\]]*)\]", item)
                for extra in inner.group(1).split(",") if inner else []:
                    add_extra(extra.strip())
            elif name not in exclude and item not in out:
                out.append(item)

    def add_extra(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            raise SystemExit(f"requirements.py: pyproject.toml has no extra {extra!r}")
        seen_extras.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        add_extra(extra)
    return out


def freeze(reqs: list[str]) -> list[str]:
    """``name==version`` of each installed distribution in the closure of ``reqs`` (environment markers
    evaluated here, extras followed), sorted by name."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pinned: dict[str, str] = {}
    todo = [(Requirement(r), frozenset()) for r in reqs]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        name = requirement_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError as err:
            raise SystemExit(f"requirements.py --freeze: {req.name} is not installed here") from err
        seen = name in pinned
        pinned[name] = dist.version
        if seen and not req.extras:
            continue
        for sub in dist.requires or []:
            todo.append((Requirement(sub), frozenset(req.extras)))
    return [f"{n}=={v}" for n, v in sorted(pinned.items())]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path, extras, rest = Path(argv[0]), [e for e in argv[1].split(",") if e], argv[2:]
    exclude = {requirement_name(rest[i + 1]) for i, a in enumerate(rest) if a == "--exclude"}
    out = requirements(tomllib.loads(path.read_text()), extras, exclude)
    if "--freeze" in rest:
        out = [line for line in freeze(out) if requirement_name(line) not in exclude]
    for line in out:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
