"""The nod: the driver's head pitch, read from the face mesh, turned into a nod of the photo's keypoints.

Why: the keypoint detector of the models trained here does not see a nod. On held-out driving clips the
avatar nodded at a median gain of 0.34 of the driver's (issue 18 asks for 0.7), and a driver's slow 5°
nod came out the other way on half the photos, and even on her own face (r −0.32; weights/README.md,
"The nod"). Yet the generator draws a nod when the keypoints nod: moved as a rotation of a rounded face
would move them (gain 2 below), the avatar's face-mesh pitch follows at 0.6–1.1° per degree. So the
engine reads the driver's pitch from the face mesh (:mod:`dagan.head_pose`, the measure the evaluation
scores) and nods the photo's transferred keypoints by it, before the generator.

The photo's face is modelled as a bump of depth z = 1 − |p − c|² / ρ² over its keypoints (c their
centroid, ρ = 1.6 × their RMS distance from it): the nose stands out, the cheeks and the chin less. A nod
by θ moves each keypoint vertically by ``gain`` · s · sin θ · z (s the keypoints' RMS spread, so the
motion scales with the face) and deforms its neighbourhood by that displacement's gradient, applied to
its Jacobian. The Jacobian part is what the generator follows: the displacement alone moved the avatar's
pitch by a third as much (as with head turns, weights/README.md, "Head turns").

Some photos' avatars barely nod over the bump (a forced ±8° nod moved d9's avatar 0.10° per degree, four
other held-out photos' 0.67–0.87), yet nod over the depth their own face mesh gives each keypoint
(:func:`mesh_profile`: d9 0.37), which nods most photos worse (0.04–0.36) and tilts some sideways as it
nods (s10: 0.33° of pitch with 0.38° of roll per degree). So the engine tries both on each photo when it
is uploaded and keeps the one whose nod its avatar draws better, the turn and tilt drawn with it counted
against it (:class:`NodProfile`, ``engine.hot_path.FramePathEngine._nod_profile``,
``engine.hot_path.nod_response``; weights/README.md, "The photo's own relief").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .head_pose import head_rotation, pitch_since
from .nets.keypoints import Keypoints
from .smoothing import OneEuroFilter, OneEuroParams

# The bump's radius in units of the keypoints' RMS distance from their centroid: 1.6 puts the outermost
# keypoints (the jaw, the forehead) near the bump's edge, where a nod moves least.
BUMP_RADIUS = 1.6

# The pitch reading's filter for a stream whose keypoints are filtered (degrees; beta per °/s). The face
# mesh's pitch shakes from frame to frame: read unfiltered (a probe at gain 2.6), the avatar's landmarks
# moved 2.5 times as much as the driver's where the driver held still (24 held-out pairs); filtered, 1.3
# at that gain and 1.2 at gain 2, against 1.15 without the nod (weights/README.md, "The nod").
NOD_FILTER = OneEuroParams(min_cutoff=1.0, beta=0.05)

# How much of the nod is added, by how far the photo's keypoint layout is from the driver's at the
# reference (:func:`layout_distance`): none below SAME_FACE, all of it above OTHER_FACE, linearly between.
# Why: for the driver's own face the keypoints carry the nod already (self-reenactment pitch gain 0.9–1.1
# on the clip that nods), and the mesh's nod on top of it doubled it: relative self-reenactment on three
# held-out clips lost PRMSE 3.59° → 3.99° and its expression features 0.042 → 0.047. Two frames of one
# clip lie 0.002–0.06 apart (one pair 0.125, of 17 held-out clips); a photo and another person's frame
# 0.06–0.43 (median 0.21; 6 photos × 17 clips).
SAME_FACE, OTHER_FACE = 0.06, 0.12

# The mesh profile's plane fit: the mesh points within this distance of a keypoint (keypoint units, the
# crop spans [-1, 1]; 0.12 is about 8 px of a 128-px crop, some 20 mesh points on the cheek), or, where
# fewer than MESH_MIN_POINTS lie so near (a keypoint off the face), the MESH_MIN_POINTS + 5 nearest.
MESH_RADIUS = 0.12
MESH_MIN_POINTS = 4


@dataclass(frozen=True)
class NodProfile:
    """A photo's face as depth over its keypoints, for the nod: ``z`` (K) how far each keypoint stands
    out, 1 at the face's most forward point, and ``grad`` (K×2) z's slope there per keypoint unit along
    x and y. The nod moves a keypoint by z and deforms its neighbourhood by grad (:func:`nod_keypoints`)."""

    z: torch.Tensor
    grad: torch.Tensor


def mesh_profile(landmarks: np.ndarray, size: int, kp_source: np.ndarray) -> NodProfile:
    """The depth profile of a photo from its face mesh (478×3 in pixels of the ``size``-px crop, z toward
    the scene as mediapipe gives it) at its keypoints ``kp_source`` (K×2, keypoint units): at each
    keypoint a plane fitted to the depth of the mesh points near it (:data:`MESH_RADIUS`), its value and
    slope, scaled so the 5th percentile of the mesh's depth (the face's rim) is 0 and its most forward
    point 1. Why a plane and not the nearest point: the mesh's depth is noisy point to point and the
    slope is what deforms the keypoint's neighbourhood."""
    pts = landmarks[:, :2].astype(np.float64) / (size / 2) - 1  # keypoint units
    depth = -landmarks[:, 2].astype(np.float64)  # toward the camera
    zs, grads = [], []
    for p in np.asarray(kp_source, dtype=np.float64):
        d = np.linalg.norm(pts - p, axis=1)
        near = d < MESH_RADIUS
        if near.sum() < MESH_MIN_POINTS:
            near = d <= np.sort(d)[MESH_MIN_POINTS + 4]
        a = np.c_[pts[near] - p, np.ones(int(near.sum()))]
        coef, *_ = np.linalg.lstsq(a, depth[near], rcond=None)
        grads.append(coef[:2])
        zs.append(coef[2])
    zs, grads = np.array(zs), np.array(grads)
    lo = float(np.percentile(depth, 5))
    scale = max(float(depth.max()) - lo, 1e-6)
    z = (zs - lo) / scale
    return NodProfile(torch.from_numpy(z).float(), torch.from_numpy(grads / scale).float())


def nod_keypoints(
    kp_source: Keypoints,
    kp: Keypoints,
    pitch: torch.Tensor,
    gain: float,
    profiles: Sequence[NodProfile | None] | None = None,
) -> Keypoints:
    """``kp`` (the transferred keypoints, B×K×2 values and B×K×2×2 Jacobians or None) nodded by ``pitch``
    (B, degrees, as :func:`dagan.head_pose.pitch_since` measures the driver: a positive pitch moves the
    keypoints down, and the avatar's mesh then reads a positive pitch too) over the bump of the photo's
    keypoints ``kp_source``, or over an item's own profile where ``profiles`` (B) gives one; ``gain`` the
    depth in keypoint spreads.

    An item whose pitch is 0 is returned exactly as it was."""
    src = kp_source.value
    centre = src.mean(dim=1, keepdim=True)  # B×1×2
    rel = src - centre
    spread = rel.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6).view(-1, 1, 1)  # B×1×1
    rho2 = (BUMP_RADIUS * spread) ** 2
    z = 1 - rel.pow(2).sum(-1, keepdim=True) / rho2  # B×K×1
    grad = -2 * rel / rho2  # B×K×2: dz/dx, dz/dy
    if profiles is not None and any(p is not None for p in profiles):
        z, grad = z.clone(), grad.clone()
        for i, prof in enumerate(profiles):
            if prof is not None:
                z[i, :, 0] = prof.z.to(z)
                grad[i] = prof.grad.to(grad)
    amp = gain * spread * torch.sin(torch.deg2rad(pitch.to(src.dtype))).view(-1, 1, 1)  # B×1×1
    dy = amp * z  # B×K×1
    value = kp.value + torch.cat([torch.zeros_like(dy), dy], dim=-1)
    jac = kp.jacobian
    if jac is not None:
        deform = torch.zeros_like(jac)
        deform[..., 1, :] = amp * grad  # d(dy)/dx, d(dy)/dy
        jac = jac + deform @ jac  # (I + ∇) J
    return Keypoints(value, jac)


def layout_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far apart two keypoint layouts are (B×K×2 each → B): each moved to its centroid and scaled to
    unit RMS radius (so where the face sits and its size do not count), the mean distance point by
    point. The engine's automatic neutral pose compares a frame with the photo the same way."""

    def layout(v: torch.Tensor) -> torch.Tensor:
        v = v.double() - v.double().mean(dim=1, keepdim=True)
        return v / v.square().sum(dim=-1).mean(dim=-1).sqrt().clamp_min(1e-9).view(-1, 1, 1)

    return (layout(a) - layout(b)).norm(dim=-1).mean(dim=-1)


def nod_weight(kp_source: torch.Tensor, kp_reference: torch.Tensor) -> torch.Tensor:
    """B weights in [0, 1]: how much of the driver's nod to add for a photo with keypoints ``kp_source``
    driven from reference keypoints ``kp_reference`` (B×K×2 each): 0 for the same face in the same
    pose, 1 for another face (:data:`SAME_FACE`, :data:`OTHER_FACE`)."""
    d = layout_distance(kp_source, kp_reference)
    return ((d - SAME_FACE) / (OTHER_FACE - SAME_FACE)).clamp(0, 1).float()


class NodState:
    """One stream's nod: the driver's head rotation at the stream's reference frame and the pitch filter.

    :meth:`pitch` is called once per animated frame with the driver's face mesh. The first frame after a
    new reference (the stream's first, a recalibration, an automatic neutral pose; noticed because the
    session's ``reference`` object changed) becomes the rotation the pitch is measured from. A frame
    without a face mesh keeps the last pitch, so the avatar holds its pose instead of snapping back.
    ``profile``: the photo's own depth profile where the engine chose it at upload, else None (the
    bump)."""

    def __init__(self, max_degrees: float = 30.0) -> None:
        self.max_degrees = float(max_degrees)
        self.profile: NodProfile | None = None
        self._reference: np.ndarray | None = None
        self._reference_of: object = None
        self._filter = OneEuroFilter(NOD_FILTER)
        self._last = 0.0

    def pitch(
        self,
        landmarks: np.ndarray | None,
        image_size: tuple[int, int],
        reference: object,
        t: float | None = None,
        smooth: bool = True,
    ) -> float:
        """Degrees the driver pitched since the reference (filtered with ``smooth``, clipped to
        ± ``max_degrees``). ``reference`` is the session's current reference keypoints (any object;
        only its identity is compared), ``t`` the frame's time in seconds."""
        if reference is not self._reference_of:
            self._reference, self._reference_of = None, reference
            self._filter.reset()
            self._last = 0.0
        rotation = None if landmarks is None else head_rotation(landmarks, image_size)
        if rotation is None:
            return self._last
        if self._reference is None:
            self._reference = rotation
        value = pitch_since(self._reference, rotation)
        if not math.isfinite(value):
            return self._last
        if smooth:
            value = float(self._filter(np.array([value]), t)[0])
        self._last = float(np.clip(value, -self.max_degrees, self.max_degrees))
        return self._last
