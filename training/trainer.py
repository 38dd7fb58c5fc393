"""The training loop for both stages: one process or ``torchrun`` DDP, checkpoints, exact resume, logging.

Stage ``depth`` (paper §3.2, :mod:`training.stage_depth`) trains F_d and F_p by view synthesis; stage
``dagan`` (§3.5, :mod:`training.stage_dagan`) trains the keypoint detector, generator and discriminator
with F_d frozen. :class:`Trainer` owns what is not stage-specific, each part in its own module:

* Distributed (:mod:`training.distributed`): under ``torchrun`` every process joins one process group,
  wraps the trainable modules in DistributedDataParallel and reads its own slice of each epoch. One
  process and N processes run the same code path.
* Reproducible (:mod:`training.rng`): a sample is a function of (seed, epoch, index) and a step's own
  random draws come from a generator seeded with (seed, rank, step), so ``--resume`` continues exactly.
* Crash-safe (:mod:`training.run_dir`): every ``checkpoint_every`` steps the weights and a training-state
  file (optimizers, schedulers, grad scalers, step, RNG states of every rank) are written atomically, then
  ``latest.json`` is atomically pointed at them; temporary files of killed writes are removed at every
  start, and a half-made run folder is a clear error, not a traceback.

This module is the loop itself: build the stage, prepare the run folder, restore the latest checkpoint,
then step, log and checkpoint until the stage's step count.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dagan.checkpoint import CheckpointError, save_checkpoint

from .config import TrainConfig, load_train_config
from .data import ResumableSampler
from .distributed import DistInfo, barrier, cleanup_distributed, gather_objects, setup_distributed
from .errors import TrainingError
from .rng import rng_state, seed_everything, set_rng_state
from .run_dir import STATE_FORMAT, RunDir
from .stage import Stage
from .stage_dagan import DaganStage
from .stage_depth import DepthStage

STAGES = ("depth", "dagan")

__all__ = [
    "STAGES",
    "STATE_FORMAT",
    "DaganStage",
    "DepthStage",
    "DistInfo",
    "RunDir",
    "Stage",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "cleanup_distributed",
    "setup_distributed",
]


@dataclass
class TrainResult:
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    weights: Path | None = None
    run_dir: Path | None = None
    total_steps: int = 0
    time_limited: bool = False  # stopped by ``time_limit_s`` before ``total_steps``


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
        init_checkpoint: str | None = None,
        overrides: dict[str, Any] | None = None,
        tensorboard: bool = True,
    ) -> None:
        if stage not in STAGES:
            raise TrainingError(f"unknown stage {stage!r} (use one of {', '.join(STAGES)})")
        self.stage_name = stage
        # The wall-time budget of run(time_limit_s=...) counts from here, so model and loss-net
        # construction are inside it, as they are inside a lent machine's fixed budget.
        self.created_at = time.perf_counter()
        self.rundir = RunDir(run_dir)
        self.resuming = resume
        self.resume_step: int | None = None
        if resume:
            info = self.rundir.read_run_info(stage)
            cfg = load_train_config(self.rundir.config_file, overrides)
            data_root = data_root or info.get("data_root")
            self.resume_step = self.rundir.latest()
            # From a checkpoint, the checkpoint itself holds the frozen depth net; a run killed before its
            # first checkpoint starts again from the depth checkpoint its run.json names.
            depth_checkpoint = info.get("depth_checkpoint") if self.resume_step is None else None
            init_checkpoint = info.get("init_checkpoint") if self.resume_step is None else None
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
        self.init_checkpoint = init_checkpoint
        if init_checkpoint and not Path(init_checkpoint).is_file():
            raise CheckpointError(f"--init checkpoint {init_checkpoint} does not exist")
        self.progress = progress
        self.tensorboard = tensorboard
        self.info, self.device = setup_distributed(cfg.device)

        if stage == "dagan" and self.resume_step is None:
            if cfg.model.needs_depth and not depth_checkpoint:
                raise TrainingError(
                    "this model uses depth: pass --depth CKPT, the checkpoint written by `dagan train depth`"
                )
            if depth_checkpoint and not Path(depth_checkpoint).is_file():
                raise CheckpointError(f"depth checkpoint {depth_checkpoint} does not exist")

        seed_everything(cfg.seed + self.info.rank)
        if stage == "depth":
            torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
            self.stage: Stage = DepthStage(cfg, self.device, self.info)
        else:
            self.stage = DaganStage(cfg, self.device, self.info, depth_checkpoint)
        if init_checkpoint and self.resume_step is None:
            loaded = self.stage.init_from(init_checkpoint)
            if self.info.main:
                print(f"initialised {', '.join(p.rstrip('.') for p in loaded)} from {init_checkpoint}")

    # ---------------------------------------------------------------------------------- checkpoints
    def _save(self, step: int) -> None:
        gathered = gather_objects(self.info, rng_state())
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
            self.rundir.save(step, self.cfg.model, s.tensors(), meta, state, self.cfg.keep_checkpoints)
        barrier(self.info)

    def _load(self, step: int) -> None:
        s = self.stage
        tensors, state, source = self.rundir.load(step, s.name)
        s.load_tensors(tensors, source)
        for k, v in state["optimizers"].items():
            s.optimizers[k].load_state_dict(v)
        for k, v in state["schedulers"].items():
            s.schedulers[k].load_state_dict(v)
        for k, v in state["scalers"].items():
            s.scaler(k).load_state_dict(v)
        rngs = state["rng"]
        if len(rngs) != self.info.world_size and self.info.main:
            print(
                f"note: resuming a {len(rngs)}-process run with {self.info.world_size} processes: "
                "the data order continues but the run is not bit-identical to an uninterrupted one",
                file=sys.stderr,
            )
        set_rng_state(rngs[self.info.rank % len(rngs)])

    # ----------------------------------------------------------------------------------------- run
    def _prepare_run_dir(self) -> None:
        if not self.info.main:
            return
        if self.resuming and self.resume_step is None:
            print(
                f"note: {self.rundir.path} has no checkpoint yet (its run was stopped before the first one): "
                "starting it from step 0",
                file=sys.stderr,
            )
        info = {
            "stage": self.stage_name,
            "data_root": str(self.data_root),
            "depth_checkpoint": self.depth_checkpoint,
            "init_checkpoint": self.init_checkpoint,
            "world_size": self.info.world_size,
            "torch": torch.__version__,
        }
        stale = self.rundir.create(self.cfg.to_yaml(), info, resume=self.resuming)
        if stale:
            print(
                f"note: removed {len(stale)} temporary file(s) of interrupted writes from {self.rundir.path}",
                file=sys.stderr,
            )

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
        if isinstance(self.stage, DaganStage) and not (
            cfg.dagan.vgg19_weights or cfg.dagan.face_landmark_weights
        ):
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

    def _all_agree(self, flag: bool) -> bool:
        """True on every rank when any rank says True, so all processes leave the loop at the same step
        (a rank that stopped alone would leave the others waiting in a collective)."""
        if not self.info.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def run(self, stop_after: int | None = None, time_limit_s: float | None = None) -> TrainResult:
        """Train until the stage's ``steps`` (or, for tests, until ``stop_after`` steps, like a kill).

        ``time_limit_s``: stop cleanly once the wall time since the Trainer was built would pass it
        before the next step ends — a checkpoint (so ``--resume`` continues exactly) and the final
        weights file are written at the step reached — so a fixed machine budget never loses the run.
        """
        from tqdm import tqdm

        self._prepare_run_dir()
        barrier(self.info)
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
        deadline = None if time_limit_s is None else self.created_at + time_limit_s
        time_limited = False
        try:
            batches = iter(loader)
            while step < end:
                t_step = time.perf_counter()
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
                saved = step % self.cfg.checkpoint_every == 0 or step == total
                if saved:
                    self._save(step)
                if deadline is not None and step < end:
                    now = time.perf_counter()
                    # Stop when one more step like this one would end past the deadline.
                    if self._all_agree(now + (now - t_step) >= deadline):
                        time_limited = True
                        if not saved:
                            self._save(step)
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            del loader
        final = None
        if (step == total or time_limited) and self.info.main:
            final = self.rundir.final_path(self.stage_name)
            meta = {"stage": self.stage_name, "step": str(step), "trained": "true", **self.stage.metadata()}
            if time_limited:
                meta["time_limited"] = f"stopped at step {step} of {total}"
            save_checkpoint(final, self.cfg.model, self.stage.tensors(), meta)
        barrier(self.info)
        return TrainResult(step, history, final, self.rundir.path, total, time_limited)
