"""The one checkpoint format: a safetensors file whose metadata embeds the model config.

Tensors are stored under the module names of :class:`dagan.model.DaGAN` (``depth_net.*``,
``kp_detector.*``, ``generator.*``) plus any extra groups training adds (``pose_net.*``,
``discriminator.*``). Embedding the config means a checkpoint alone rebuilds its model; loading it
into a model built from a *different* config fails with a list of the tensors that do not fit, rather
than a half-loaded network. Writes go to a temporary file that is renamed into place, so a crash never
leaves a truncated checkpoint under the final name.

Which checkpoint a command uses when none is named (:func:`resolve_checkpoint`) and the warning for
untrained weights live here too, because every application (``dagan animate``, ``serve``, ``cam``,
``eval``, the benchmarks) needs the same answer and none of them may import another's modules.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, ModelConfig, config_from_dict
from .errors import UserError

FORMAT = "dagan-checkpoint/1"
DEFAULT_CHECKPOINT_ENV = "DAGAN_CHECKPOINT"
# The bundled default weights (see weights/ and its model card).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "dagan-default.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model it is loaded into."""


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor] | nn.Module,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (a state dict or a module) and ``config`` atomically to ``path``.

    ``extra_metadata`` may be another checkpoint's whole metadata (a file derived from it keeps its
    entries): its ``format`` and ``config`` never override the ones written for ``config``."""
    state = tensors.state_dict() if isinstance(tensors, nn.Module) else dict(tensors)
    # safetensors refuses shared/non-contiguous storage; cloning costs little and makes any state dict safe.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {**(extra_metadata or {}), "format": FORMAT, "config": config.to_json()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Return (embedded config, tensors, metadata); clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not a DaGAN checkpoint (no '{FORMAT}' metadata); "
            "published reference checkpoints must be converted with the import command first"
        )
    try:
        config = config_from_dict(json.loads(metadata["config"]))
    except (ConfigError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: embedded config is invalid: {exc}") from exc
    return config, tensors, metadata


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint without loading its tensors (cheap: reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({exc})") from exc


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """The checkpoint to use: the argument, then $DAGAN_CHECKPOINT, then the bundled default weights."""
    if checkpoint:
        return Path(checkpoint)
    if os.environ.get(DEFAULT_CHECKPOINT_ENV):
        return Path(os.environ[DEFAULT_CHECKPOINT_ENV])
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    raise CheckpointError(
        f"no trained weights found (the bundled {DEFAULT_CHECKPOINT} is missing): pass --checkpoint PATH "
        f"(or set ${DEFAULT_CHECKPOINT_ENV}); `dagan init-checkpoint` writes an UNTRAINED one that only "
        "exercises the pipeline"
    )


def warn_if_untrained(path: Path) -> bool:
    """Say loudly when a checkpoint holds random weights, so nobody mistakes its output for a result."""
    if checkpoint_metadata(path).get("trained") == "false":
        print(
            f"warning: {path} holds UNTRAINED random weights: the video shows the pipeline running, "
            "not a real avatar",
            file=sys.stderr,
        )
        return True
    return False


def describe_mismatch(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Lines naming every missing, unexpected or mis-shaped tensor between ``module`` and ``tensors``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k[len(prefix) :]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    lines = []
    for name in sorted(expected.keys() - got.keys()):
        lines.append(f"missing: {prefix}{name} {list(expected[name])}")
    for name in sorted(got.keys() - expected.keys()):
        lines.append(f"unexpected: {prefix}{name} {list(got[name])}")
    for name in sorted(expected.keys() & got.keys()):
        if expected[name] != got[name]:
            lines.append(
                f"shape: {prefix}{name} checkpoint {list(got[name])} vs model {list(expected[name])}"
            )
    return lines


def blur_kernels(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The anti-alias blur kernels of ``module`` by checkpoint name (``prefix`` + the module's own name):
    buffers its config's scale factors fix (a Gaussian per ``1/scale`` step,
    :class:`dagan.nets.blocks.AntiAliasInterpolation2d`). A checkpoint stores them and no training
    changes them, so the importer fills them in and a file made at another scale factor loads with the
    module's own (:func:`load_into`, ``scripts/set_model_config.py``)."""
    from .nets.blocks import AntiAliasInterpolation2d

    return {
        f"{prefix}{name}.weight": m.weight.detach().clone()
        for name, m in module.named_modules()
        if isinstance(m, AntiAliasInterpolation2d)
    }


def load_into(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "", source: str = ""
) -> None:
    """Load the ``prefix``-ed tensors into ``module`` strictly, or raise a :class:`CheckpointError` listing
    every tensor that does not fit. The blur kernels are the module's own (:func:`blur_kernels`): an
    ``--init`` file trained at another scale factor is a fine-tuning start at this one."""
    tensors = {**tensors, **blur_kernels(module, prefix)}
    problems = describe_mismatch(module, tensors, prefix)
    if problems:
        shown = problems[:40]
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise CheckpointError(
            f"checkpoint {source} does not match the model config ({len(problems)} tensors differ):\n  "
            + "\n  ".join(shown)
            + more
        )
    module.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True
    )


def inference_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the training-only groups (pose net, discriminator) that ``model`` does not
    have: what an inference model is checked and loaded against."""
    model_keys = set(model.state_dict())
    training_only = ("pose_net.", "discriminator.")
    return {k: v for k, v in tensors.items() if k in model_keys or not k.startswith(training_only)}


def load_model(path: str | Path, config: ModelConfig | None = None, map_location: str = "cpu"):
    """Build a :class:`~dagan.model.DaGAN` from a checkpoint (its embedded config unless ``config`` is given)
    and load its weights, in eval mode. Training-only groups (pose net, discriminator) are ignored."""
    from .model import DaGAN

    embedded, tensors, _ = read_checkpoint(path)
    model = DaGAN(config or embedded)
    load_into(model, inference_tensors(model, tensors), source=str(path))
    return model.to(map_location).eval()
