"""Random state for exact resume: per-rank seeding, per-step seeds, and RNG snapshots for the state file.

A sample is a pure function of (seed, epoch, index) (:mod:`training.data`); a step's own random draws
(equivariance transforms, auto-mask noise) come from a generator seeded with :func:`step_seed`; the global
Python / NumPy / torch (/ CUDA) generators of every rank are saved in each checkpoint's state file. So the
step after a ``--resume`` draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a step's own random draws: a pure function of (seed, rank, step), so a resumed step draws
    exactly what the uninterrupted run drew."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**62)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global RNG states as plain containers and tensors (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
