"""What the two stages share: the :class:`Stage` interface the loop drives, the optimizer step (mixed
precision, clipping, schedules) and the TensorBoard image grids.

A stage owns its modules, optimizers, schedulers and grad scalers, makes one training step from a batch,
and says which tensors go into its checkpoint. Everything else (run folder, resume, data order, logging)
is the loop's (:mod:`training.trainer`), so a stage reads top to bottom as "the model and its loss".
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from dagan.checkpoint import CheckpointError, load_into

from . import losses as L
from .config import TrainConfig
from .distributed import DistInfo, wrap_module


class Stage(ABC):
    """What differs between the two stages: modules, optimizers, one training step, images, checkpoints."""

    name: str
    batch_size: int
    total_steps: int

    def __init__(self, cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
        self.cfg = cfg
        self.device = device
        self.info = info
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self._scaler_enabled = cfg.precision == "fp16"
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

    def scaler(self, name: str) -> torch.amp.GradScaler:
        """The grad scaler of optimizer ``name`` (created on first use; a no-op unless fp16)."""
        if name not in self.scalers:
            self.scalers[name] = torch.amp.GradScaler(self.device.type, enabled=self._scaler_enabled)
        return self.scalers[name]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _wrap(self, module: nn.Module) -> nn.Module:
        return wrap_module(module, self.info, self.device, self.cfg.sync_batchnorm)

    def _optimize(self, name: str, loss: torch.Tensor, params: list[nn.Parameter]) -> float:
        """Backward, unscale, clip, step; returns the global gradient norm before clipping."""
        opt, scaler = self.optimizers[name], self.scaler(name)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = L.gradient_norm(params)
        scaler.step(opt)
        scaler.update()
        with warnings.catch_warnings():
            # fp16: the scaler skips steps whose gradients overflowed; the schedule still follows the
            # global step count (so resume and milestones stay aligned), which torch warns about.
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.schedulers[name].step()
        return norm

    @abstractmethod
    def dataset(self, root: str) -> torch.utils.data.Dataset: ...

    @abstractmethod
    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]: ...

    def _video_dataset(self, cls: type, root: str, **extra) -> torch.utils.data.Dataset:
        """``cls`` (a :mod:`training.data` dataset) over ROOT/train with the run's size, repeats,
        augmentation and seed; ``extra`` are the stage's own arguments."""
        d = self.cfg.data
        return cls(
            root,
            "train",
            self.cfg.model.image_size,
            repeats=d.repeats,
            augment=d.augment,
            seed=self.cfg.seed,
            **extra,
        )

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights to checkpoint, under the checkpoint format's group prefixes."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None: ...

    # Groups of a checkpoint that ``init_from`` loads: (prefix, attribute path, required).
    init_groups: tuple[tuple[str, str, bool], ...] = ()

    def init_from(self, path: str) -> list[str]:
        """Start from another run's weights (fine-tuning): load every group this stage trains from the
        checkpoint ``path``; optimizers, schedulers and the step start fresh. A required group that is
        missing or does not fit the config is an error naming every tensor; optional groups (the pose
        net, the discriminator: training-only, not in shipped weights) are loaded when present. Returns
        the prefixes loaded."""
        from dagan.checkpoint import read_checkpoint

        _, tensors, _ = read_checkpoint(path)
        loaded = []
        for prefix, attr, required in self.init_groups:
            module = self
            for part in attr.split("."):
                module = getattr(module, part)
            if not any(k.startswith(prefix) for k in tensors):
                if required:
                    raise CheckpointError(f"--init {path} has no {prefix}* tensors")
                continue
            load_into(module, tensors, prefix, path)
            loaded.append(prefix)
        return loaded

    @abstractmethod
    def image_grid(self) -> torch.Tensor | None:
        """3×H×W summary image of the last step (rows = samples), or None before the first step."""

    def metadata(self) -> dict[str, str]:
        return {}

    def set_train(self) -> None:  # noqa: B027 - optional hook
        pass


def milestone_lambda(milestones: tuple[int, ...], gamma: float):
    """LambdaLR factor: ``gamma`` to the number of milestones reached (a step schedule)."""

    def factor(step: int) -> float:
        return gamma ** sum(1 for m in milestones if step >= m)

    return factor


# ==================================================================================== visuals


def grid(columns: list[torch.Tensor], max_rows: int = 4) -> torch.Tensor:
    """Columns of B×3×H×W images → one 3×(rows·H)×(cols·W) image in [0, 1]."""
    cols = [c[:max_rows].detach().float().clamp(0, 1).cpu() for c in columns]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(cols[0].shape[0])]
    return torch.cat(rows, dim=1)


def draw_keypoints(images: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Copy of B×3×H×W images with each keypoint (B×K×2 in [-1, 1]) drawn as a coloured 3×3 dot."""
    out = images.detach().float().clone().cpu()
    b, _, h, w = out.shape
    kp = kp.detach().float().cpu()
    k = kp.shape[1]
    colors = torch.tensor(
        [[np.cos(2 * np.pi * (i / k + j / 3)) * 0.5 + 0.5 for j in range(3)] for i in range(k)]
    )
    for n in range(b):
        for i in range(k):
            x = round(float((kp[n, i, 0] + 1) / 2 * (w - 1)))
            y = round(float((kp[n, i, 1] + 1) / 2 * (h - 1)))
            x0, x1, y0, y1 = max(0, x - 1), min(w, x + 2), max(0, y - 1), min(h, y + 2)
            if x0 < x1 and y0 < y1:
                out[n, :, y0:y1, x0:x1] = colors[i].view(3, 1, 1)
    return out
