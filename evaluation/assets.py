"""Evaluation assets: face-api's identity and expression weights and its demo photos, in a local folder.

``dagan fetch-eval-assets DIR`` is a data-preparation step (like ``dagan prepare``): it runs
``npm pack @vladmandic/face-api@1.7.15`` (MIT licence) in a temporary folder and extracts ``model/``
(all tfjs weight files), ``demo/sample*.jpg`` (group photos used by the identity test), ``LICENSE`` and
``package.json`` into DIR. ``dagan eval`` then only reads DIR; nothing is downloaded while evaluating.

Where ``dagan eval`` looks: ``--assets DIR``, else ``$DAGAN_EVAL_ASSETS``, else
``$XDG_CACHE_HOME/dagan/eval-assets`` (``~/.cache/dagan/eval-assets``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from dagan.errors import UserError

__all__ = [
    "ASSETS_ENV",
    "FACE_API_PACKAGE",
    "REQUIRED_FILES",
    "EvalAssetsError",
    "default_assets_dir",
    "fetch_eval_assets",
    "find_eval_assets",
]

FACE_API_PACKAGE = "@vladmandic/face-api@1.7.15"
ASSETS_ENV = "DAGAN_EVAL_ASSETS"
# What the identity metrics cannot do without (the expression model is optional: its metric becomes null).
REQUIRED_FILES = ("model/face_recognition_model-weights_manifest.json", "model/face_recognition_model.bin")
EXPRESSION_FILES = ("model/face_expression_model-weights_manifest.json", "model/face_expression_model.bin")


class EvalAssetsError(UserError):
    """The evaluation assets are missing or could not be fetched."""


def default_assets_dir() -> Path:
    """``$XDG_CACHE_HOME/dagan/eval-assets``, with ``~/.cache`` when XDG_CACHE_HOME is not set."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dagan" / "eval-assets"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def find_eval_assets(explicit: str | os.PathLike[str] | None = None, required: bool = True) -> Path | None:
    """The assets folder: ``explicit``, else ``$DAGAN_EVAL_ASSETS``, else :func:`default_assets_dir`.

    Raises :class:`EvalAssetsError` naming the fetch command when the folder lacks the recognition model
    (or returns None when ``required`` is False), so a missing download is one clear line, not a
    FileNotFoundError from deep inside the weight loader.
    """
    if explicit is not None:
        folder, source = Path(explicit), "--assets"
    elif os.environ.get(ASSETS_ENV):
        folder, source = Path(os.environ[ASSETS_ENV]), f"${ASSETS_ENV}"
    else:
        folder, source = default_assets_dir(), "the default cache folder"
    if _complete(folder):
        return folder
    if not required:
        return None
    raise EvalAssetsError(
        f"face-identity weights not found in {folder} ({source}); run `dagan fetch-eval-assets {folder}` "
        f"once (needs npm and the npm registry), or set ${ASSETS_ENV} to a folder made by it"
    )


def _wanted(name: str) -> str | None:
    """Path inside DIR for a tarball member (``package/...``), or None to skip it."""
    if not name.startswith("package/"):
        return None
    rel = name[len("package/") :]
    if rel.startswith("model/") and "/" not in rel[len("model/") :]:
        return rel
    if rel.startswith("demo/sample") and rel.endswith(".jpg"):
        return rel
    if rel in ("LICENSE", "package.json"):
        return rel
    return None


def extract_face_api_tarball(tarball: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Extract model/*, demo/sample*.jpg, LICENSE and package.json of a face-api npm tarball into out_dir."""
    out = Path(out_dir)
    written: list[Path] = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            rel = _wanted(member.name)
            if rel is None or not member.isfile() or ".." in Path(rel).parts:
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            tmp = target.with_name(target.name + ".part")
            with source, open(tmp, "wb") as f:
                shutil.copyfileobj(source, f)
            os.replace(tmp, target)
            written.append(target)
    return written


def fetch_eval_assets(out_dir: str | os.PathLike[str], package: str = FACE_API_PACKAGE) -> list[Path]:
    """Run ``npm pack PACKAGE`` in a temporary folder and extract the assets into ``out_dir``."""
    npm = shutil.which("npm")
    if npm is None:
        raise EvalAssetsError(
            "npm is not installed; install Node.js/npm (e.g. `apt-get install npm`) and retry"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dagan-face-api-") as tmp:
        proc = subprocess.run(
            [npm, "pack", package, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise EvalAssetsError(
                f"`npm pack {package}` failed ({detail[-1] if detail else f'exit {proc.returncode}'})"
            )
        written = extract_face_api_tarball(tarballs[0], out)
    if not _complete(out):
        raise EvalAssetsError(f"{package} did not contain {', '.join(REQUIRED_FILES)}")
    return written
