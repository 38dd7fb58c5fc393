"""Distributed set-up: one code path for one process and for N ``torchrun`` processes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins one process group (NCCL on GPUs, gloo on CPU),
takes ``cuda:LOCAL_RANK`` and wraps its trainable modules in DistributedDataParallel (SyncBatchNorm on
GPUs). With one process the helpers below are no-ops, so the stages and the loop never branch on it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .errors import TrainingError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes the run folder, logs and the progress bar."""
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


def cleanup_distributed() -> None:
    """Leave the process group (if one was joined); safe to call always, e.g. in a ``finally``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op with one process)."""
    if info.distributed:
        dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` with one process)."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_module(module: nn.Module, info: DistInfo, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """DDP (+ SyncBatchNorm on GPUs) for multi-process runs; the module itself otherwise."""
    if not info.distributed:
        return module
    if sync_batchnorm and device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DDP) else module
