"""Smooth random motion for a synthetic clip: head pose, mouth opening, eye blinks and lighting.

Every signal is a sum of a few sinusoids with random frequencies and phases, squashed by a scaled tanh so
it stays within its configured bound while keeping a bounded derivative: the frame-to-frame change of a
signal with amplitude A is at most ``A · SQUASH_SLOPE · 2π · max_frequency / fps`` (see
:func:`max_step`), which the tests check. Blinks are short Gaussian pulses at random times (at least one per
clip). All randomness comes from the ``numpy.random.Generator`` passed in, so a clip is a pure function of
its seed.

Pose convention (ground truth): a head-frame point X (x right, y down, z forward, origin at the head's
rotation centre) is at ``R @ X + t`` in the camera frame, with ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``;
:func:`euler_from_matrix` inverts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .mesh import NUM_FACE_POINTS, HeadMesh

__all__ = [
    "SQUASH_SLOPE",
    "ExpressionRig",
    "MotionConfig",
    "Trajectory",
    "euler_from_matrix",
    "matrix_from_euler",
    "max_step",
    "sample_trajectory",
]

_SQUASH = 1.6
SQUASH_SLOPE = _SQUASH / math.tanh(_SQUASH)  # largest slope of the tanh squashing


@dataclass(frozen=True)
class MotionConfig:
    """Bounds and speeds of the random motion. Angles in degrees, translation as a fraction of the image
    side, scale as the largest relative change of apparent size, frequencies in Hz."""

    yaw: float = 30.0
    pitch: float = 20.0
    roll: float = 15.0
    translation: float = 0.05
    scale: float = 0.08
    fps: float = 25.0
    pose_frequency: tuple[float, float] = (0.08, 0.45)
    mouth_frequency: tuple[float, float] = (0.6, 2.2)
    blink_interval: float = 2.5  # mean seconds between blinks
    blink_width: float = 0.07  # seconds (Gaussian sigma of one blink)
    gain: float = 0.10  # global brightness change ±
    tint: float = 0.04  # per-channel colour change ±
    light: float = 0.25  # strength of the directional shading term

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def max_step(amplitude: float, cfg: MotionConfig, frequency: tuple[float, float] | None = None) -> float:
    """Upper bound of the frame-to-frame change of a pose signal with this amplitude."""
    f_max = (frequency or cfg.pose_frequency)[1]
    return amplitude * SQUASH_SLOPE * 2 * math.pi * f_max / cfg.fps


def _signal(
    rng: np.random.Generator, n: int, fps: float, band: tuple[float, float], k: int = 3
) -> np.ndarray:
    """(n,) smooth random signal in (-1, 1)."""
    t = np.arange(n) / fps
    freq = rng.uniform(band[0], band[1], size=k)
    phase = rng.uniform(0, 2 * math.pi, size=k)
    amp = rng.uniform(0.5, 1.0, size=k)
    s = (amp[:, None] * np.sin(2 * math.pi * freq[:, None] * t + phase[:, None])).sum(0) / amp.sum()
    return np.tanh(_SQUASH * s) / math.tanh(_SQUASH)


def matrix_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch), angles in degrees."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_from_matrix(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a rotation built by :func:`matrix_from_euler` (|yaw| < 90°)."""
    yaw = math.degrees(math.asin(float(np.clip(-rot[2, 0], -1.0, 1.0))))
    pitch = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    roll = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    return yaw, pitch, roll


@dataclass(frozen=True)
class Trajectory:
    """Per-frame motion of one clip (F frames). Translation is in image-side fractions, scale relative."""

    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    shift: np.ndarray  # (F, 2)
    scale: np.ndarray  # (F,)
    mouth: np.ndarray  # (F,) in [0, 1]
    blink: np.ndarray  # (F,) in [0, 1]
    gain: np.ndarray  # (F, 3) RGB multipliers
    light_dir: np.ndarray  # (F, 3) unit vectors (camera frame, in the image plane)
    light: np.ndarray  # (F,) strength of the directional term

    def __len__(self) -> int:
        return len(self.yaw)

    def rotation(self, i: int) -> np.ndarray:
        return matrix_from_euler(self.yaw[i], self.pitch[i], self.roll[i])


def sample_trajectory(
    num_frames: int, rng: np.random.Generator, cfg: MotionConfig | None = None
) -> Trajectory:
    """Random smooth motion for ``num_frames`` frames (see the module docstring)."""
    cfg = cfg or MotionConfig()
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n, fps = num_frames, cfg.fps
    pose = cfg.pose_frequency
    yaw = cfg.yaw * _signal(rng, n, fps, pose)
    pitch = cfg.pitch * _signal(rng, n, fps, pose)
    roll = cfg.roll * _signal(rng, n, fps, pose)
    shift = cfg.translation * np.stack([_signal(rng, n, fps, pose), _signal(rng, n, fps, pose)], axis=1)
    scale = 1.0 + cfg.scale * _signal(rng, n, fps, pose)

    # Talking: a fast syllable-rate signal gated by a slow "speaking or pausing" envelope, kept C1-smooth.
    syll = _signal(rng, n, fps, cfg.mouth_frequency)
    env = _signal(rng, n, fps, (0.1, 0.4))
    x = np.clip((syll + 0.5) / 1.3, 0.0, 1.0) * np.clip((env + 0.9) / 1.2, 0.0, 1.0)
    mouth = x * x * (3 - 2 * x)

    # Blinks: Poisson-like times, first within the first 1.5 s, at least one per clip, on frame times.
    times: list[float] = []
    t = rng.uniform(0.2, 1.5)
    duration = n / fps
    while t < duration:
        times.append(t)
        t += 0.8 + rng.exponential(cfg.blink_interval - 0.8)
    if not times:
        times.append(rng.uniform(0, duration))
    frames = np.arange(n) / fps
    blink = np.zeros(n)
    for tb in times:
        tb = round(tb * fps) / fps
        blink = np.maximum(blink, np.exp(-0.5 * ((frames - tb) / cfg.blink_width) ** 2))

    gain = (1.0 + cfg.gain * _signal(rng, n, fps, (0.05, 0.3)))[:, None] * (
        1.0 + cfg.tint * np.stack([_signal(rng, n, fps, (0.05, 0.3)) for _ in range(3)], axis=1)
    )
    angle = rng.uniform(0, 2 * math.pi) + 1.5 * _signal(rng, n, fps, (0.05, 0.25))
    light_dir = np.stack([np.cos(angle), np.sin(angle), np.zeros(n)], axis=1)
    light = cfg.light * (0.5 + 0.5 * _signal(rng, n, fps, (0.05, 0.3)))
    return Trajectory(yaw, pitch, roll, shift, scale, mouth, blink, gain, light_dir, light)


# ------------------------------------------------------------------------------------------ expression


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    s = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return s * s * (3 - 2 * s)


class ExpressionRig:
    """Per-mesh weights that open the mouth (drop the jaw) and close the eyes, in the head frame.

    Mouth: the lower lip and the jaw below it move down and slightly back by up to 30% of the mouth width,
    the upper lip lifts a little; weights fall off sideways towards the jaw angles and below the chin, so
    the cheeks stretch instead of tearing. Blink: each upper-lid landmark moves onto the point of the lower
    lid at the same horizontal position; skin above the lid follows with a Gaussian falloff (σ = 0.3 eye
    widths). The eye and mouth fill centres are recomputed from their (moved) contours.
    """

    def __init__(self, mesh: HeadMesh) -> None:
        topo = mesh.topo
        rest = mesh.rest - mesh.pivot
        self.mesh = mesh
        v = len(rest)
        x, y = rest[:, 0], rest[:, 1]
        inner = [np.asarray(p) for p in topo.inner_lips]
        outer = [np.asarray(p) for p in topo.outer_lips]
        self.mouth_loop = np.concatenate([inner[0], inner[1][::-1][1:-1]])
        m = rest[self.mouth_loop].mean(axis=0)
        a_out = abs(rest[outer[0][0], 0] - rest[outer[0][-1], 0]) / 2
        a_in = abs(rest[inner[0][0], 0] - rest[inner[0][-1], 0]) / 2
        chin_y = rest[152, 1]
        dx = np.abs(x - m[0])
        jaw = np.clip(1 - (dx / (2.5 * a_out)) ** 2, 0, 1) * _smoothstep(0.0, 0.6 * a_out, y - m[1])
        jaw *= np.exp(-((np.maximum(y - chin_y, 0) / (0.6 * mesh.face_radius)) ** 2))
        jaw[NUM_FACE_POINTS:] *= mesh.rigidity[NUM_FACE_POINTS:]
        up = np.zeros(v)
        for path, half in ((inner[1], a_in), (outer[1], a_out)):
            mid = path[1:-1]
            jaw[mid] = np.maximum(jaw[mid], np.sqrt(np.clip(1 - (dx[mid] / half) ** 2, 0, 1)))
        for path, half in ((inner[0], a_in), (outer[0], a_out)):
            mid = path[1:-1]
            jaw[mid] = 0.0
            up[mid] = np.sqrt(np.clip(1 - (dx[mid] / half) ** 2, 0, 1))
        for corner in (inner[0][0], inner[0][-1], outer[0][0], outer[0][-1]):
            jaw[corner] = 0.0
        jaw[NUM_FACE_POINTS : NUM_FACE_POINTS + 10] = 0.0  # irises
        self.jaw_weight = jaw
        self.lip_weight = up
        width = 2 * a_out
        direction = np.array([0.0, 0.95, 0.3])
        self.jaw_vector = 0.3 * width * direction / np.linalg.norm(direction)
        self.lip_vector = np.array([0.0, -0.1 * width, 0.0])

        # Blink.
        self.lids: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.eye_loops = []
        for upper, lower in topo.eyes:
            upper_a, lower_a = np.asarray(upper), np.asarray(lower)
            self.eye_loops.append(np.concatenate([upper_a, lower_a[::-1][1:-1]]))
            mid = upper_a[1:-1]
            lx, order = rest[lower_a, 0], np.argsort(rest[lower_a, 0])
            target = np.stack(
                [np.interp(rest[mid, 0], lx[order], rest[lower_a, k][order]) for k in range(3)], axis=1
            )
            delta = target - rest[mid]
            eye_w = float(np.linalg.norm(rest[upper_a[0]] - rest[upper_a[-1]]))
            others = np.setdiff1d(np.arange(NUM_FACE_POINTS), np.concatenate([upper_a, lower_a]))
            d = np.linalg.norm(rest[others, None, :2] - rest[None, mid, :2], axis=2)  # (n, lid)
            nearest = d.argmin(axis=1)
            lid_y = np.interp(
                rest[others, 0],
                rest[upper_a, 0][np.argsort(rest[upper_a, 0])],
                rest[upper_a, 1][np.argsort(rest[upper_a, 0])],
            )
            weight = np.exp(-0.5 * (d.min(axis=1) / (0.3 * eye_w)) ** 2) * (rest[others, 1] < lid_y)
            sel = weight > 1e-3
            self.lids.append((mid, delta, others[sel], nearest[sel], weight[sel]))
        self.eye_fill_offset = [
            mesh.rest[c] - mesh.rest[loop].mean(axis=0)
            for c, loop in zip(mesh.eye_fill_centres, self.eye_loops, strict=True)
        ]
        self.mouth_fill_offset = mesh.rest[mesh.mouth_fill_centre] - mesh.rest[self.mouth_loop].mean(axis=0)

    def deform(self, mouth: float, blink: float) -> np.ndarray:
        """Head-frame vertex positions (V, 3) with the mouth ``mouth`` open and the eyes ``blink`` closed."""
        mesh = self.mesh
        pts = mesh.rest - mesh.pivot
        if mouth > 0:
            pts = pts + mouth * (
                self.jaw_weight[:, None] * self.jaw_vector + self.lip_weight[:, None] * self.lip_vector
            )
        if blink > 0:
            pts = pts.copy()
            for mid, delta, others, nearest, weight in self.lids:
                pts[mid] += blink * delta
                pts[others] += blink * weight[:, None] * delta[nearest]
        for c, loop, off in zip(mesh.eye_fill_centres, self.eye_loops, self.eye_fill_offset, strict=True):
            pts[c] = pts[loop].mean(axis=0) + off
        pts[mesh.mouth_fill_centre] = pts[self.mouth_loop].mean(axis=0) + self.mouth_fill_offset
        return pts
