"""The training loop for both stages: single process or ``torchrun`` DDP, checkpoints, exact resume, logging.

Stage ``depth`` (paper §3.2) trains F_d and F_p by view synthesis; stage ``dagan`` (§3.5) trains the keypoint
detector, generator and discriminator with F_d frozen. Both share :class:`Trainer`, which owns what is not
stage-specific:

* Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins one process group (NCCL on
  GPUs, gloo on CPU), wraps the trainable modules in DistributedDataParallel (SyncBatchNorm on GPUs) and
  reads its own slice of each epoch. One process and N processes run the same code path.
* Reproducible: a sample is a function of (seed, epoch, index) (:mod:`training.data`) and a step's own
  random draws (equivariance transforms, auto-mask noise) come from a generator seeded with (seed, rank,
  step), so ``--resume`` continues exactly: the next step after a resume equals the uninterrupted one.
* Crash-safe: every ``checkpoint_every`` steps the weights (``dagan.checkpoint.save_checkpoint``) and a
  training-state file (optimizers, schedulers, grad scalers, step, RNG states of every rank) are written
  atomically, then ``latest.json`` is atomically pointed at them. A kill at any moment leaves the
  previous complete checkpoint in place, so at most the steps since it are lost.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import sys
import time
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dagan.checkpoint import CheckpointError, atomic_write, load_into, read_checkpoint, save_checkpoint
from dagan.errors import UserError
from dagan.model import DaGAN
from dagan.nets.discriminator import discriminator_from_config
from dagan.nets.pose import PoseNet, inverse_warp, transformation_matrix

from . import losses as L
from .config import TrainConfig, load_train_config
from .data import ConsecutiveFramesDataset, ResumableSampler, SourceDrivingDataset

STAGES = ("depth", "dagan")
STATE_FORMAT = "dagan-train-state/1"


class TrainingError(UserError, RuntimeError):
    """A training run that cannot start or resume as asked (bad run folder, missing depth checkpoint)."""


# ================================================================================== distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device_pref!r} requested but CUDA is not available")
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if use_cuda:
        index = local if device_pref in ("auto", "cuda") else int(device_pref.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return DistInfo(rank, world, local), device


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DDP) else module


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a step's own random draws: a pure function of (seed, rank, step), so a resumed step draws
    exactly what the uninterrupted run drew."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**62)


def _milestone_lambda(milestones: tuple[int, ...], gamma: float):
    def factor(step: int) -> float:
        return gamma ** sum(1 for m in milestones if step >= m)

    return factor


# ==================================================================================== stages


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
        enabled = cfg.precision == "fp16"
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self._scaler_enabled = enabled
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

    def _scaler(self, name: str) -> torch.amp.GradScaler:
        if name not in self.scalers:
            self.scalers[name] = torch.amp.GradScaler(self.device.type, enabled=self._scaler_enabled)
        return self.scalers[name]

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP (+ SyncBatchNorm on GPUs) for multi-process runs; the module itself otherwise."""
        if not self.info.distributed:
            return module
        if self.cfg.sync_batchnorm and self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def _optimize(self, name: str, loss: torch.Tensor, params: list[nn.Parameter]) -> float:
        """Backward, unscale, clip, step; returns the global gradient norm before clipping."""
        opt, scaler = self.optimizers[name], self._scaler(name)
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

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights to checkpoint, under the checkpoint format's group prefixes."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None: ...

    @abstractmethod
    def image_grid(self) -> torch.Tensor | None:
        """3×H×W summary image of the last step (rows = samples), or None before the first step."""

    def metadata(self) -> dict[str, str]:
        return {}

    def set_train(self) -> None:  # noqa: B027 - optional hook
        pass


class DepthStage(Stage):
    """Self-supervised face depth: F_d(I_i) and F_p(I_i ‖ I_j) rebuild I_i from each neighbour I_j."""

    name = "depth"

    def __init__(self, cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
        super().__init__(cfg, device, info)
        m, d = cfg.model, cfg.depth
        model = DaGAN(m)
        if model.depth_net is None:
            raise TrainingError("the model config uses no depth (keypoints.use_depth and attention both off)")
        self.depth_net = model.depth_net.to(device)
        self.pose_net = PoseNet(width=m.pose.encoder_width).to(device)
        self.batch_size, self.total_steps = d.batch_size, d.steps
        self.net = self._wrap(_DepthObjective(self.depth_net, self.pose_net, cfg))
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.params = params
        self.optimizers["depth"] = torch.optim.Adam(params, lr=d.lr)
        self.schedulers["depth"] = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["depth"], _milestone_lambda(d.lr_milestones, d.lr_gamma)
        )
        self._last: dict[str, torch.Tensor] | None = None

    def dataset(self, root: str):
        return ConsecutiveFramesDataset(
            root,
            "train",
            self.cfg.model.image_size,
            repeats=self.cfg.data.repeats,
            augment=self.cfg.data.augment,
            seed=self.cfg.seed,
            offsets=self.cfg.depth.source_offsets,
        )

    def set_train(self) -> None:
        self.net.train()

    def train_step(self, batch, step):
        target = batch["target"].to(self.device, non_blocking=True)
        sources = batch["sources"].to(self.device, non_blocking=True)
        noise_seed = _step_seed(self.cfg.seed, self.info.rank, step)
        with self.autocast():
            loss, logs, vis = self.net(target, sources, noise_seed)
        logs["grad_norm"] = self._optimize("depth", loss, self.params)
        logs["lr"] = self.optimizers["depth"].param_groups[0]["lr"]
        self._last = {"target": target, "source": sources[:, -1], **vis}
        return logs

    def tensors(self):
        out = {f"depth_net.{k}": v for k, v in self.depth_net.state_dict().items()}
        out.update({f"pose_net.{k}": v for k, v in self.pose_net.state_dict().items()})
        return out

    def load_tensors(self, tensors, source):
        load_into(self.depth_net, tensors, "depth_net.", source)
        load_into(self.pose_net, tensors, "pose_net.", source)

    def image_grid(self):
        if self._last is None:
            return None
        x = self._last
        disp = x["disp"].float()
        disp = disp / disp.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        cols = [x["target"], x["source"], x["warped"], disp.expand(-1, 3, -1, -1)]
        return _grid(cols)


class _DepthObjective(nn.Module):
    """The depth-stage loss as one module, so DDP sees a single forward per step.

    forward(target B×3×H×W, sources B×S×3×H×W, noise_seed) → (loss, logs, images). For every decoder
    scale s the disparity is upsampled to H×W (monodepth2), turned into depth, each source is warped
    into the target view with F_p's motion and intrinsics, and the minimum-reprojection / auto-masked
    photometric loss plus the edge-aware smoothness (at the decoder's own resolution, weight /2^s) is
    averaged over scales.
    """

    def __init__(self, depth_net: nn.Module, pose_net: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.depth_net = depth_net
        self.pose_net = pose_net
        self.cfg = cfg.depth
        self.min_depth, self.max_depth = cfg.model.depth.min_depth, cfg.model.depth.max_depth

    def forward(self, target: torch.Tensor, sources: torch.Tensor, noise_seed: int):
        b, s, c, h, w = sources.shape
        disps = self.depth_net.forward_multiscale(target)
        flat_sources = sources.transpose(0, 1).reshape(s * b, c, h, w)  # source-major
        pose = self.pose_net(target.repeat(s, 1, 1, 1), flat_sources)
        motion = transformation_matrix(pose.axisangle.float(), pose.translation.float())
        intrinsics = pose.intrinsics.float()
        gen = torch.Generator().manual_seed(noise_seed)
        src_list = [sources[:, j].float() for j in range(s)]
        total = target.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        warped0 = mask0 = None
        for scale in sorted(disps):
            disp = disps[scale].float()
            full = (
                disp if scale == 0 else F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False)
            )
            _, depth = _disp_to_depth(full, self.min_depth, self.max_depth)
            warped = inverse_warp(flat_sources.float(), depth.repeat(s, 1, 1, 1), motion, intrinsics).view(
                s, b, c, h, w
            )
            warped_list = [warped[j] for j in range(s)]
            photo, mask = L.reprojection_loss(
                warped_list,
                src_list,
                target.float(),
                alpha=self.cfg.ssim_alpha,
                min_reprojection=self.cfg.min_reprojection,
                automask=self.cfg.automask,
                generator=gen,
            )
            small = (
                target
                if disp.shape[-1] == w
                else F.interpolate(target.float(), size=disp.shape[-2:], mode="area")
            )
            smooth = L.edge_aware_smoothness(disp, small)
            total = total + photo + self.cfg.smoothness * smooth / (2**scale)
            logs[f"photometric/s{scale}"] = float(photo.detach())
            if scale == 0:
                logs["smoothness"] = float(smooth.detach())
                warped0, mask0 = warped_list[-1], mask
        loss = total / len(disps)
        logs["loss"] = float(loss.detach())
        logs["automask_kept"] = float(mask0.mean())
        vis = {"warped": warped0.detach(), "disp": disps[0].detach()}
        return loss, logs, vis


def _disp_to_depth(disp: torch.Tensor, min_depth: float, max_depth: float):
    from dagan.nets.depth import disp_to_depth

    return disp_to_depth(disp, min_depth, max_depth)


class DaganStage(Stage):
    """Keypoint detector + generator + discriminator with the depth net frozen (paper eq. 10)."""

    name = "dagan"

    def __init__(
        self, cfg: TrainConfig, device: torch.device, info: DistInfo, depth_checkpoint: str | None
    ) -> None:
        super().__init__(cfg, device, info)
        m, g = cfg.model, cfg.dagan
        torch.manual_seed(cfg.seed)
        self.model = DaGAN(m).to(device)
        if self.model.depth_net is not None:
            if depth_checkpoint:
                _, tensors, _ = read_checkpoint(depth_checkpoint)
                load_into(self.model.depth_net, tensors, "depth_net.", depth_checkpoint)
            self.model.depth_net.eval().requires_grad_(False)
        self.discriminator = discriminator_from_config(m.discriminator).to(device)
        self.perceptual = L.build_perceptual_loss(g.vgg19_weights, g.pyramid_scales).to(device)
        self.batch_size, self.total_steps = g.batch_size, g.steps
        self.gen_net = self._wrap(_GeneratorObjective(self.model, self.discriminator, self.perceptual, cfg))
        self.disc_net = self._wrap(self.discriminator)
        self.gen_params = [p for p in self.gen_net.parameters() if p.requires_grad]
        self.disc_params = list(self.disc_net.parameters())
        unwrapped = _unwrap(self.gen_net)
        betas = (g.beta1, g.beta2)
        self.optimizers["generator"] = torch.optim.Adam(
            [
                {"params": list(unwrapped.model.generator.parameters()), "lr": g.lr_generator},
                {"params": list(unwrapped.model.kp_detector.parameters()), "lr": g.lr_kp_detector},
            ],
            betas=betas,
        )
        self.optimizers["discriminator"] = torch.optim.Adam(
            self.disc_params, lr=g.lr_discriminator, betas=betas
        )
        for name, opt in self.optimizers.items():
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                opt, _milestone_lambda(g.lr_milestones, g.lr_gamma)
            )
        self._last: dict[str, Any] | None = None

    def dataset(self, root: str):
        return SourceDrivingDataset(
            root,
            "train",
            self.cfg.model.image_size,
            repeats=self.cfg.data.repeats,
            augment=self.cfg.data.augment,
            seed=self.cfg.seed,
        )

    def set_train(self) -> None:
        self.gen_net.train()
        self.disc_net.train()
        if self.model.depth_net is not None:
            self.model.depth_net.eval()

    def metadata(self):
        return {"perceptual_loss": self.perceptual.name}

    def train_step(self, batch, step):
        source = batch["source"].to(self.device, non_blocking=True)
        driving = batch["driving"].to(self.device, non_blocking=True)
        seed = _step_seed(self.cfg.seed, self.info.rank, step)
        # Generator step: the discriminator is only a critic here, so its weights take no gradient
        # (which also keeps them out of the generator DDP's gradient reduction).
        self.discriminator.requires_grad_(False)
        with self.autocast():
            loss, logs, out = self.gen_net(source, driving, seed)
        logs["grad_norm/generator"] = self._optimize("generator", loss, self.gen_params)
        self.discriminator.requires_grad_(True)
        w = self.cfg.dagan.weights
        if w.gan > 0 or w.feature_matching > 0:
            # Real and fake in one batch: one DDP forward per backward (InstanceNorm is per sample).
            with self.autocast():
                scores = self.disc_net(torch.cat([driving, out["prediction"].detach()], dim=0))
                b = driving.shape[0]
                d_loss = L.lsgan_discriminator_loss(
                    [v[1][:b] for v in scores.values()], [v[1][b:] for v in scores.values()]
                )
            logs["discriminator"] = float(d_loss.detach())
            logs["grad_norm/discriminator"] = self._optimize("discriminator", d_loss, self.disc_params)
        logs["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
        self._last = {"source": source, "driving": driving, **out}
        return logs

    def tensors(self):
        out = dict(self.model.state_dict())
        out.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        return out

    def load_tensors(self, tensors, source):
        load_into(
            self.model, {k: v for k, v in tensors.items() if not k.startswith("discriminator.")}, "", source
        )
        load_into(self.discriminator, tensors, "discriminator.", source)

    def image_grid(self):
        if self._last is None:
            return None
        x = self._last
        cols = [x["source"], x["driving"], x["prediction"]]
        if x.get("depth_driving") is not None:
            cols.append(x["depth_driving"].expand(-1, 3, -1, -1))
        cols.append(_draw_keypoints(x["driving"], x["kp_driving"]))
        return _grid(cols)


class _GeneratorObjective(nn.Module):
    """Generator-side loss of eq. 10 as one module (DDP-wrapped): keypoint detector + generator train,
    the frozen depth net, the discriminator (as critic) and the perceptual net are held outside the
    module's parameters so DDP only reduces what this step trains.

    forward(source, driving: B×3×H×W, seed) → (loss, logs, outputs).
    """

    def __init__(
        self, model: DaGAN, discriminator: nn.Module, perceptual: nn.Module, cfg: TrainConfig
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg.dagan
        # Plain tuple attributes: not registered as submodules, so not part of this module's parameters.
        self._critics = (discriminator, perceptual)

    def _keypoints(self, image: torch.Tensor):
        depth = None
        if self.model.depth_net is not None:
            with torch.no_grad():
                depth = self.model.depth_net(image)
        return self.model.detect_keypoints(image, depth), depth

    def forward(self, source: torch.Tensor, driving: torch.Tensor, seed: int):
        discriminator, perceptual = self._critics
        w, g = self.cfg.weights, self.cfg
        kp_s, depth_s = self._keypoints(source)
        kp_d, depth_d = self._keypoints(driving)
        out = self.model.generator(source, depth_s, kp_s, kp_d)
        pred = out.prediction
        logs: dict[str, float] = {}
        terms: dict[str, torch.Tensor] = {}
        terms["perceptual"] = w.perceptual * perceptual(pred, driving)
        if w.gan > 0 or w.feature_matching > 0:
            b = driving.shape[0]
            scores = discriminator(torch.cat([driving, pred], dim=0))
            fake = [v[1][b:] for v in scores.values()]
            real_feats = [[f[:b] for f in v[0]] for v in scores.values()]
            fake_feats = [[f[b:] for f in v[0]] for v in scores.values()]
            terms["gan"] = w.gan * L.lsgan_generator_loss(fake)
            terms["feature_matching"] = w.feature_matching * L.feature_matching_loss(real_feats, fake_feats)
        if w.equivariance_value > 0 or w.equivariance_jacobian > 0:
            gen = torch.Generator().manual_seed(seed)
            tr = L.RandomTransform(
                driving.shape[0],
                g.transform.sigma_affine,
                g.transform.sigma_tps,
                g.transform.points_tps,
                generator=gen,
                device=driving.device,
            )
            kp_t, _ = self._keypoints(tr.transform_frame(driving))
            value, jac = L.equivariance_losses(kp_d.value, kp_d.jacobian, kp_t.value, kp_t.jacobian, tr)
            terms["equivariance_value"] = w.equivariance_value * value
            if jac is not None and w.equivariance_jacobian > 0:
                terms["equivariance_jacobian"] = w.equivariance_jacobian * jac
        if w.kp_distance > 0:
            ls, ss = L.keypoint_distance_loss(kp_s.value, g.kp_distance_threshold)
            ld, sd = L.keypoint_distance_loss(kp_d.value, g.kp_distance_threshold)
            terms["kp_distance"] = w.kp_distance * (ls + ld)
            logs["kp_distance_eq13"] = float(ss + sd)
        loss = sum(terms.values())
        logs.update({k: float(v.detach()) for k, v in terms.items()})
        logs["loss"] = float(loss.detach())
        logs["l1"] = float((pred.detach().float() - driving.float()).abs().mean())
        outputs = {
            "prediction": pred,
            "depth_driving": None if depth_d is None else depth_d.detach(),
            "kp_driving": kp_d.value.detach(),
        }
        return loss, logs, outputs


# ==================================================================================== visuals


def _grid(columns: list[torch.Tensor], max_rows: int = 4) -> torch.Tensor:
    """Columns of B×3×H×W images → one 3×(rows·H)×(cols·W) image in [0, 1]."""
    cols = [c[:max_rows].detach().float().clamp(0, 1).cpu() for c in columns]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(cols[0].shape[0])]
    return torch.cat(rows, dim=1)


def _draw_keypoints(images: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
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


# ===================================================================================== run folder


class RunDir:
    """The run folder: ``config.yaml`` (resolved config), ``run.json`` (stage and inputs), ``checkpoints/``
    (``step-XXXXXXXX.safetensors`` + ``.state.pt`` pairs), ``latest.json`` (the last complete pair),
    ``<stage>.safetensors`` (final weights) and ``tb/`` (TensorBoard)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.latest_file = self.path / "latest.json"

    def weights_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.state.pt"

    def latest(self) -> int | None:
        if not self.latest_file.is_file():
            return None
        try:
            step = int(json.loads(self.latest_file.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{self.latest_file} is unreadable ({exc})") from exc
        if not (self.weights_path(step).is_file() and self.state_path(step).is_file()):
            raise TrainingError(f"{self.latest_file} names step {step} but its checkpoint files are missing")
        return step

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def prune(self, keep: int) -> None:
        steps = sorted(int(p.name[5:13]) for p in self.checkpoints.glob("step-*.safetensors"))
        latest = self.latest()
        for step in steps[:-keep]:
            if step != latest:
                self.weights_path(step).unlink(missing_ok=True)
                self.state_path(step).unlink(missing_ok=True)


# ======================================================================================= trainer


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    weights: Path | None = None
    run_dir: Path | None = None


class Trainer:
    """Runs one stage in a run folder; ``run()`` trains from scratch or from the latest checkpoint.

    Args:
        stage: ``"depth"`` or ``"dagan"``.
        cfg: the training config (ignored when resuming: the run folder's ``config.yaml`` wins, with
            ``overrides`` applied on top, e.g. a larger ``dagan.steps`` to extend a run).
        run_dir: the run folder (created).
        data_root: dataset root (``ROOT/train/<video>``); defaults to ``cfg.data.root``.
        depth_checkpoint: stage ``dagan`` only: the depth stage's checkpoint (F_d is loaded and frozen).
        resume: continue from ``latest.json`` in ``run_dir``.
        progress: tqdm bar on rank 0.
    """

    def __init__(
        self,
        stage: str,
        cfg: TrainConfig | None,
        run_dir: str | Path,
        data_root: str | None = None,
        depth_checkpoint: str | None = None,
        resume: bool = False,
        progress: bool = True,
        overrides: dict[str, Any] | None = None,
        tensorboard: bool = True,
    ) -> None:
        if stage not in STAGES:
            raise TrainingError(f"unknown stage {stage!r} (use one of {', '.join(STAGES)})")
        self.stage_name = stage
        self.rundir = RunDir(run_dir)
        self.resume_step: int | None = None
        if resume:
            config_file = self.rundir.path / "config.yaml"
            if not config_file.is_file():
                raise TrainingError(f"--resume: {self.rundir.path} is not a run folder (no config.yaml)")
            info = json.loads((self.rundir.path / "run.json").read_text())
            if info.get("stage") != stage:
                raise TrainingError(
                    f"--resume: {self.rundir.path} is a {info.get('stage')!r} run, not {stage!r}"
                )
            cfg = load_train_config(config_file, overrides)
            data_root = data_root or info.get("data_root")
            depth_checkpoint = None  # the checkpoint itself holds the frozen depth net
            self.resume_step = self.rundir.latest()
        elif cfg is None:
            cfg = load_train_config(None, overrides)
        elif overrides:
            cfg = cfg.replace(**overrides)
        assert cfg is not None
        self.cfg = cfg
        self.data_root = data_root or cfg.data.root
        if not self.data_root:
            raise TrainingError("no dataset: pass --data ROOT (or set data.root in the training config)")
        self.depth_checkpoint = depth_checkpoint
        self.progress = progress
        self.tensorboard = tensorboard
        self.info, self.device = setup_distributed(cfg.device)

        if stage == "dagan" and not resume:
            needs_depth = cfg.model.keypoints.use_depth or cfg.model.generator.attention.enabled
            if needs_depth and not depth_checkpoint:
                raise TrainingError(
                    "this model uses depth: pass --depth CKPT, the checkpoint written by `dagan train depth`"
                )
            if depth_checkpoint and not Path(depth_checkpoint).is_file():
                raise CheckpointError(f"depth checkpoint {depth_checkpoint} does not exist")

        _seed_everything(cfg.seed + self.info.rank)
        if stage == "depth":
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
            self.stage: Stage = DepthStage(cfg, self.device, self.info)
        else:
            self.stage = DaganStage(cfg, self.device, self.info, depth_checkpoint)

    # ---------------------------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> None:
        rng = _rng_state()
        if self.info.distributed:
            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        if self.info.main:
            s = self.stage
            state = {
                "format": STATE_FORMAT,
                "stage": s.name,
                "step": step,
                "world_size": self.info.world_size,
                "optimizers": {k: v.state_dict() for k, v in s.optimizers.items()},
                "schedulers": {k: v.state_dict() for k, v in s.schedulers.items()},
                "scalers": {k: v.state_dict() for k, v in s.scalers.items()},
                "rng": gathered,
            }
            meta = {"stage": s.name, "step": str(step), "trained": "true", **s.metadata()}
            save_checkpoint(self.rundir.weights_path(step), self.cfg.model, s.tensors(), meta)
            atomic_write(self.rundir.state_path(step), lambda tmp: torch.save(state, tmp))
            self.rundir.write_json(self.rundir.latest_file, {"step": step})
            self.rundir.prune(self.cfg.keep_checkpoints)
        _barrier(self.info)

    def _load(self, step: int) -> None:
        weights, state_file = self.rundir.weights_path(step), self.rundir.state_path(step)
        _, tensors, _ = read_checkpoint(weights)
        self.stage.load_tensors(tensors, str(weights))
        try:
            # Our own file, written by _save above: plain containers of tensors and numbers only.
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(f"{state_file} is not a readable training state ({exc})") from exc
        if state.get("format") != STATE_FORMAT or state.get("stage") != self.stage.name:
            raise TrainingError(f"{state_file} is not a {self.stage.name} training state")
        s = self.stage
        for k, v in state["optimizers"].items():
            s.optimizers[k].load_state_dict(v)
        for k, v in state["schedulers"].items():
            s.schedulers[k].load_state_dict(v)
        for k, v in state["scalers"].items():
            s._scaler(k).load_state_dict(v)
        rngs = state["rng"]
        if len(rngs) != self.info.world_size and self.info.main:
            print(
                f"note: resuming a {len(rngs)}-process run with {self.info.world_size} processes: "
                "the data order continues but the run is not bit-identical to an uninterrupted one",
                file=sys.stderr,
            )
        _set_rng_state(rngs[self.info.rank % len(rngs)])

    # ----------------------------------------------------------------------------------------- run
    def _prepare_run_dir(self) -> None:
        if not self.info.main:
            return
        self.rundir.path.mkdir(parents=True, exist_ok=True)
        if self.resume_step is None and self.rundir.latest_file.exists():
            raise TrainingError(
                f"{self.rundir.path} already holds a run; use --resume to continue it or another --run-dir"
            )
        cfg_text = self.cfg.to_yaml()
        atomic_write(self.rundir.path / "config.yaml", lambda tmp: Path(tmp).write_text(cfg_text))
        info = {
            "stage": self.stage_name,
            "data_root": str(self.data_root),
            "depth_checkpoint": self.depth_checkpoint,
            "world_size": self.info.world_size,
            "torch": torch.__version__,
        }
        if self.resume_step is None or not (self.rundir.path / "run.json").exists():
            self.rundir.write_json(self.rundir.path / "run.json", info)

    def _announce(self) -> None:
        if not self.info.main:
            return
        cfg = self.cfg
        print(
            f"dagan train {self.stage_name}: model {cfg.model.name} ({cfg.model.image_size}px), "
            f"{self.info.world_size} process(es) on {self.device.type}, precision {cfg.precision}, "
            f"run folder {self.rundir.path}",
            file=sys.stderr,
        )
        if isinstance(self.stage, DaganStage) and not cfg.dagan.vgg19_weights:
            bar = "!" * 100
            print(
                f"{bar}\n!! NO VGG19 WEIGHTS CONFIGURED (dagan.vgg19_weights): the perceptual loss is the "
                "SUBSTITUTE\n!! 'pixel-pyramid-l1-grad' (multi-scale L1 on pixels and image gradients), not "
                "the paper's\n!! VGG19 perceptual loss. Expect blurrier results. See docs/training.md.\n"
                f"{bar}",
                file=sys.stderr,
            )
        if self.info.distributed and self.device.type != "cuda" and cfg.sync_batchnorm:
            print("note: SyncBatchNorm needs GPUs; CPU processes keep per-process BatchNorm", file=sys.stderr)

    def _writer(self):
        if not (self.tensorboard and self.info.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(
                "note: tensorboard is not installed: no TensorBoard logs (pip install tensorboard)",
                file=sys.stderr,
            )
            return None
        return SummaryWriter(str(self.rundir.path / "tb"), purge_step=self.resume_step or 0)

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train until the stage's ``steps`` (or, for tests, until ``stop_after`` steps, like a kill)."""
        from tqdm import tqdm

        self._prepare_run_dir()
        _barrier(self.info)
        self._announce()
        start = 0
        if self.resume_step is not None:
            self._load(self.resume_step)
            start = self.resume_step
        total = self.stage.total_steps
        end = total if stop_after is None else min(total, stop_after)
        dataset = self.stage.dataset(self.data_root)
        sampler = ResumableSampler(
            len(dataset),
            self.stage.batch_size,
            self.info.rank,
            self.info.world_size,
            self.cfg.seed,
            start_step=start,
        )
        workers = self.cfg.data.workers
        loader = DataLoader(
            dataset,
            batch_size=self.stage.batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
        )
        writer = self._writer()
        bar = tqdm(
            total=total,
            initial=start,
            disable=not (self.progress and self.info.main),
            unit="step",
            dynamic_ncols=True,
        )
        history: list[dict[str, float]] = []
        self.stage.set_train()
        step = start
        t0 = time.perf_counter()
        try:
            batches = iter(loader)
            while step < end:
                batch = next(batches)
                logs = self.stage.train_step(batch, step)
                step += 1
                history.append(logs)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if "/" not in k and k != "lr"})
                if writer is not None and (step % self.cfg.log_every == 0 or step == start + 1):
                    for k, v in logs.items():
                        writer.add_scalar(f"{self.stage_name}/{k}", v, step)
                    writer.add_scalar(
                        f"{self.stage_name}/steps_per_s", (step - start) / (time.perf_counter() - t0), step
                    )
                if writer is not None and (step % self.cfg.image_every == 0 or step == start + 1):
                    grid = self.stage.image_grid()
                    if grid is not None:
                        writer.add_image(f"{self.stage_name}/grid", grid, step)
                if step % self.cfg.checkpoint_every == 0 or step == total:
                    self._save(step)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            del loader
        final = None
        if step == total and self.info.main:
            final = self.rundir.path / f"{self.stage_name}.safetensors"
            meta = {"stage": self.stage_name, "step": str(step), "trained": "true", **self.stage.metadata()}
            save_checkpoint(final, self.cfg.model, self.stage.tensors(), meta)
        _barrier(self.info)
        return TrainResult(step, history, final, self.rundir.path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
