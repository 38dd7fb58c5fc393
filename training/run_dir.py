"""The run folder: its layout, its creation, checkpoints and their training state, resume checks.

Layout (stable: a run started by an older version resumes with this one)::

    RUN/run.json                           stage, data root, depth checkpoint, world size, torch version
    RUN/config.yaml                        the resolved training config (authoritative for --resume)
    RUN/checkpoints/step-XXXXXXXX.safetensors   weights (dagan checkpoint format)
    RUN/checkpoints/step-XXXXXXXX.state.pt      optimizers, schedulers, grad scalers, step, RNG of every rank
    RUN/latest.json                        {"step": N}: the last complete pair
    RUN/<stage>.safetensors                final weights
    RUN/tb/                                TensorBoard

Crash safety: every file is written by :func:`dagan.checkpoint.atomic_write` (temporary file in the same
folder, then rename), ``latest.json`` only after both files of a pair exist, and a new folder gets
``run.json`` *before* ``config.yaml``, so ``config.yaml`` marks a complete folder. A kill can still leave
(a) temporary files of interrupted writes, removed by :meth:`RunDir.clean_stale_temp` at every start and
resume, and (b) a folder whose start was interrupted before its first checkpoint; :meth:`RunDir.read_run_info`
turns every such half-made folder into one :class:`TrainingError` line that says what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from dagan.checkpoint import atomic_write, read_checkpoint, save_checkpoint
from dagan.config import ModelConfig

from .errors import TrainingError

STATE_FORMAT = "dagan-train-state/1"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LATEST_FILE = "latest.json"

# The names dagan.checkpoint.atomic_write gives its temporary files: mkstemp(prefix=".<name>.",
# suffix=".tmp") → ".<name>.<random letters, digits, _>.tmp". A complete file never starts with ".".
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]+\.tmp$")


class RunDir:
    """The run folder: ``config.yaml`` (resolved config), ``run.json`` (stage and inputs), ``checkpoints/``
    (``step-XXXXXXXX.safetensors`` + ``.state.pt`` pairs), ``latest.json`` (the last complete pair),
    ``<stage>.safetensors`` (final weights) and ``tb/`` (TensorBoard)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.latest_file = self.path / LATEST_FILE
        self.config_file = self.path / CONFIG_FILE
        self.run_file = self.path / RUN_FILE

    def weights_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.state.pt"

    def final_path(self, stage: str) -> Path:
        return self.path / f"{stage}.safetensors"

    # ------------------------------------------------------------------------------------ reading
    def latest(self) -> int | None:
        """The step of the last complete checkpoint pair, or None before the first checkpoint."""
        if not self.latest_file.is_file():
            return None
        try:
            step = int(json.loads(self.latest_file.read_text())["step"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise TrainingError(
                f'{self.latest_file} is unreadable ({exc}); write {{"step": N}} into it for a step N '
                f"whose two files are in {self.checkpoints}"
            ) from exc
        if not (self.weights_path(step).is_file() and self.state_path(step).is_file()):
            raise TrainingError(
                f"{self.latest_file} names step {step} but its checkpoint files are missing; restore them or "
                f'point it ({{"step": N}}) at another step whose two files are in {self.checkpoints}'
            )
        return step

    def read_run_info(self, stage: str) -> dict[str, Any]:
        """``run.json`` of a folder to resume, after checking the folder is a whole run of ``stage``.

        Every half-made folder (a start killed between its first writes) is one clear TrainingError line
        saying what to do, never a raw FileNotFoundError: a folder without ``latest.json`` holds no
        checkpoint, so starting it again loses nothing.
        """
        where = f"--resume: {self.path}"
        if not self.path.is_dir():
            raise TrainingError(f"{where} does not exist; start a new run without --resume")
        has_config, has_run = self.config_file.is_file(), self.run_file.is_file()
        if not has_config and not has_run:
            raise TrainingError(
                f"{where} is not a run folder (no {CONFIG_FILE}); start a new run without --resume"
            )
        if not (has_config and has_run):
            present, missing = (CONFIG_FILE, RUN_FILE) if has_config else (RUN_FILE, CONFIG_FILE)
            if self.latest_file.exists():
                raise TrainingError(
                    f"{where} holds checkpoints but its {missing} is missing; restore {missing} to resume, "
                    f"or start a new run from its weights in {self.checkpoints}"
                )
            raise TrainingError(
                f"{where} is a half-made run folder ({present} without {missing}: its start was interrupted "
                "before the first checkpoint, so there is nothing to resume); start it again without "
                "--resume (the same --run-dir is fine)"
            )
        try:
            info = json.loads(self.run_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{where}: {self.run_file} is unreadable ({exc})") from exc
        if not isinstance(info, dict):
            raise TrainingError(f"{where}: {self.run_file} is not a JSON object")
        if info.get("stage") != stage:
            raise TrainingError(f"{where} is a {info.get('stage')!r} run, not {stage!r}")
        return info

    # ------------------------------------------------------------------------------------ writing
    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def clean_stale_temp(self) -> list[Path]:
        """Remove temporary files that killed writes left behind in the folder and ``checkpoints/``.

        Only names of :func:`~dagan.checkpoint.atomic_write`'s pattern (``.<file>.<random>.tmp``) are
        touched; complete files (``step-*.safetensors``, ``*.state.pt``, ``*.json``, ``config.yaml``) never
        start with a dot, so no complete checkpoint can be removed. Call it only from the one process
        that writes the folder, before it writes anything, and never while another run writes it (its
        save in flight would lose its temporary file): :meth:`create` does so after its checks.
        """
        removed = []
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def create(self, cfg_text: str, info: dict[str, Any], resume: bool) -> list[Path]:
        """Make (or, on resume, refresh) the folder: ``run.json`` first, then ``config.yaml``; returns the
        stale temporary files it removed (:meth:`clean_stale_temp`).

        The order makes ``config.yaml`` the mark of a complete folder. A fresh start refuses a folder that
        already holds a checkpoint (before touching anything in it: it may be a live run's) but takes over
        a half-made one (nothing in it can be lost). On resume ``run.json`` is kept as it is (it holds the
        inputs of the run's start) and ``config.yaml`` is rewritten with the overrides of this invocation
        (e.g. more steps).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume and self.latest_file.exists():
            raise TrainingError(
                f"{self.path} already holds a run; use --resume to continue it or another --run-dir"
            )
        removed = self.clean_stale_temp()
        if not resume or not self.run_file.exists():
            self.write_json(self.run_file, info)
        atomic_write(self.config_file, lambda tmp: Path(tmp).write_text(cfg_text))
        return removed

    def save(
        self,
        step: int,
        model_config: ModelConfig,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        state: dict[str, Any],
        keep: int,
    ) -> None:
        """Write the pair for ``step`` (weights, then state), point ``latest.json`` at it, prune old pairs."""
        save_checkpoint(self.weights_path(step), model_config, tensors, metadata)
        atomic_write(self.state_path(step), lambda tmp: torch.save(state, tmp))
        self.write_json(self.latest_file, {"step": step})
        self.prune(keep)

    def load(self, step: int, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
        """(tensors, training state, weights path) of the pair for ``step``; errors name the bad file."""
        weights, state_file = self.weights_path(step), self.state_path(step)
        _, tensors, _ = read_checkpoint(weights)
        try:
            # Our own file, written by save() above: plain containers of tensors and numbers only.
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(f"{state_file} is not a readable training state ({exc})") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("stage") != stage:
            raise TrainingError(f"{state_file} is not a {stage} training state")
        return tensors, state, str(weights)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` pairs, never the one ``latest.json`` names."""
        steps = sorted(int(p.name[5:13]) for p in self.checkpoints.glob("step-*.safetensors"))
        latest = self.latest()
        for step in steps[:-keep]:
            if step != latest:
                self.weights_path(step).unlink(missing_ok=True)
                self.state_path(step).unlink(missing_ok=True)
