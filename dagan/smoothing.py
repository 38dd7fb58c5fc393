"""The One-Euro filter (Casiez, Roussel and Vogel, "1€ Filter: A Simple Speed-based Low-pass Filter for
Noisy Input in Interactive Systems", CHI 2012), for the driving crop box and the driving keypoints.

Why this filter: a webcam's face box and the model's keypoints shake by a fraction of a pixel on a still
head, and the avatar copies the shake. A plain low-pass filter that removes it lags behind every real
head movement; a dead zone alone makes motion start in steps. The One-Euro filter is a first-order
low-pass filter whose cutoff frequency rises with the signal's own (filtered) speed:

    cutoff = min_cutoff + beta · |dx̂/dt|,   α = 1 / (1 + τ/Δt),   τ = 1 / (2π · cutoff)
    x̂_t = α · x_t + (1 − α) · x̂_{t−1}

so a still signal is filtered hard (``min_cutoff``: less jitter) and a moving one lightly (``beta``: less
lag). It is causal and keeps no frames: the output for frame t is ready as soon as frame t is, so it adds
no frame of latency (the small lag it still has on slow motion is measured in docs/server.md).

Each element of the signal is filtered on its own (the paper's multi-dimensional form); the speed used
for the cutoff is that element's. Time comes from the caller (seconds, e.g. a frame's capture time), or
without one from a frame counter at ``rate`` frames per second, which is what an offline video wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_BOX",
    "DEFAULT_KEYPOINTS",
    "DEFAULT_PARAMS",
    "OneEuroFilter",
    "OneEuroParams",
    "smoothing_factor",
]


@dataclass(frozen=True)
class OneEuroParams:
    """The filter's two tuning knobs (and the derivative's fixed cutoff).

    ``min_cutoff`` (Hz): the cutoff of a still signal; lower = steadier but laggier on slow motion.
    ``beta`` (per unit of speed): how fast the cutoff rises with speed; higher = less lag on fast motion.
    ``d_cutoff`` (Hz): cutoff of the speed estimate itself (the paper keeps it at 1 Hz).
    The units of ``beta`` follow the signal's: the keypoints are in the model's [-1, 1] crop coordinates,
    the crop box in units of its own side.
    """

    min_cutoff: float = 1.0
    beta: float = 0.0
    d_cutoff: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_cutoff", "d_cutoff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of Hz, got {value}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be >= 0, got {self.beta}")


# The defaults, for the keypoints and the crop box alike (both in units of half the crop's side), chosen
# on held-out real clips by scripts/measure_jitter.py: the keypoints' shake on a still head drops to
# 35–38 % with 0.55–0.75 frames of lag on motion, the box lags 0.55 frames where the old fixed average
# lagged 2.5 (docs/server.md, "Steady motion", has the sweep and the avatar's jitter before and after).
DEFAULT_PARAMS = OneEuroParams(min_cutoff=1.0, beta=30.0)
DEFAULT_KEYPOINTS = DEFAULT_PARAMS
DEFAULT_BOX = DEFAULT_PARAMS


def smoothing_factor(cutoff: float | np.ndarray, dt: float) -> float | np.ndarray:
    """α of a first-order low-pass filter with this cutoff (Hz) sampled every ``dt`` seconds."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """A One-Euro filter over arrays of any fixed shape (float64 state, one filter per element).

    Call it with each new sample (and its time in seconds, if known); it returns the filtered sample.
    The first sample passes through unchanged. :meth:`reset` starts over (a new face, a recalibration).
    """

    def __init__(self, params: OneEuroParams | None = None, rate: float = 30.0) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of frames per second, got {rate}")
        self.params = params or OneEuroParams()
        self.rate = float(rate)
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None
        self._frames = 0

    def __call__(self, x: np.ndarray, t: float | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if t is None:  # a frame clock: offline video, or callers without capture times
            t = self._frames / self.rate
        self._frames += 1
        if self._x is None or self._x.shape != x.shape or self._t is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        dt = float(t) - self._t
        if not dt > 0:  # same or older timestamp (a clock step): treat as one nominal frame
            dt = 1.0 / self.rate
        self._t = float(t)
        p = self.params
        dx = (x - self._x) / dt
        a_d = smoothing_factor(p.d_cutoff, dt)
        self._dx = a_d * dx + (1.0 - a_d) * self._dx
        cutoff = p.min_cutoff + p.beta * np.abs(self._dx)
        a = smoothing_factor(cutoff, dt)
        self._x = a * x + (1.0 - a) * self._x
        return self._x.copy()
