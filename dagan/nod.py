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

import cv2
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
# at that gain and 1.2 at gain 2, against 1.15 without the nod (weights/README.md, "The nod"). Since every
# other person's photo gets the whole nod (:data:`SAME_SHOT`), the filter is slower at rest and quicker
# in a nod: 1 Hz with beta 0.05 shook 1.69 times as much as the driver on 48 held-out pairs, 0.3 Hz with
# beta 0.3 1.55, for a pitch r of 0.71 and 0.73 (weights/README.md, "The same shot").
NOD_FILTER = OneEuroParams(min_cutoff=0.3, beta=0.3)

# How much of the nod is added, by how far the photo is from being a frame of the driver's own video at the
# reference (:func:`shot_distance`): none below SAME_SHOT, all of it above OTHER_SHOT, linearly between.
# Why: where the photo *is* such a frame (self-reenactment; a snapshot of the camera taken as the avatar)
# the keypoints carry the nod already (self-reenactment pitch gain 0.9–1.1 on the clip that nods), and
# the mesh's nod on top of it doubled it: relative self-reenactment on three held-out clips lost PRMSE
# 3.59° → 3.99° and its expression features 0.042 → 0.047. Two frames of one clip two frames apart lie
# 0.007–0.20 apart (17 held-out clips, tracked or prepared crops), a photo and another person's frame
# 0.64–1.44 (median 0.97; 6 photos × 17 clips), first frames of one actor's clips from one studio
# from 0.27. (Until 2026-12-07 the weight compared the keypoint layouts instead, which cannot tell these
# apart: a photo and another person lay 0.06–0.43 apart, and 15 of 48 held-out pairs got a partial nod
# or none, weights/README.md, "The same shot".)
SAME_SHOT, OTHER_SHOT = 0.25, 0.45

# The shot's signature: the face's mesh box widened by SHOT_MARGIN of its size on each side (hair,
# collar and background count), area-sampled to SHOT_SIZE² colour pixels, normalised to zero mean and
# unit variance (so exposure and white balance count less than content).
SHOT_SIZE = 16
SHOT_MARGIN = 0.25

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


def shot_signature(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The face's shot as SHOT_SIZE×SHOT_SIZE×3 numbers (float64, zero mean, unit variance): ``image``
    (H×W×3) sampled over its face mesh's box (``landmarks`` 478×2+, pixels) widened by
    :data:`SHOT_MARGIN`. Why the mesh's box and not the image: a photo and a camera frame are cropped by
    different code, and the same shot must read the same however it was cropped."""
    pts = np.asarray(landmarks, dtype=np.float64)[:, :2]
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    half = max(x1 - x0, y1 - y0, 1.0) * (0.5 + SHOT_MARGIN)
    scale = SHOT_SIZE / (2 * half)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    warp = np.array([[scale, 0, SHOT_SIZE / 2 - cx * scale], [0, scale, SHOT_SIZE / 2 - cy * scale]])
    k = max(1, round(1 / scale))  # box-blur to the sample spacing first: an area average
    src = np.asarray(image)
    src = cv2.blur(src, (k, k)) if k > 1 else src
    out = cv2.warpAffine(
        src, warp, (SHOT_SIZE, SHOT_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    out = out.astype(np.float64)
    return (out - out.mean()) / (out.std() + 1e-6)


def shot_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two shots are (:func:`shot_signature` each): the mean absolute difference."""
    return float(np.abs(a - b).mean())


def shot_weight(photo: np.ndarray | None, frame: np.ndarray | None) -> float:
    """How much of the driver's nod to add (0–1) for a photo whose shot is ``photo`` driven from a
    reference frame whose shot is ``frame``: 0 for a frame of the same shot, 1 for another
    (:data:`SAME_SHOT`, :data:`OTHER_SHOT`); 1 where either is unknown (a photo without a face mesh
    cannot be a frame of a driver whose mesh was read)."""
    if photo is None or frame is None:
        return 1.0
    d = shot_distance(photo, frame)
    return float(np.clip((d - SAME_SHOT) / (OTHER_SHOT - SAME_SHOT), 0.0, 1.0))


class NodState:
    """One stream's nod: the driver's head rotation at the stream's reference frame, how much of the nod
    that reference calls for, and the pitch filter.

    :meth:`pitch` is called once per animated frame with the driver's face mesh. The first frame with a
    face after a new reference (the stream's first, a recalibration, an automatic neutral pose; noticed
    because the session's ``reference`` object changed) becomes the rotation the pitch is measured from,
    and its shot against the photo's sets :attr:`weight` (:func:`shot_weight`). A frame without a face
    mesh keeps the last pitch, so the avatar holds its pose instead of snapping back.
    ``profile``: the photo's own depth profile where the engine chose it at upload, else None (the
    bump). ``photo``: the photo's shot (:func:`shot_signature`), set at upload where its mesh is found.
    ``weight``: 0–1, 1 until a reference frame has been weighed."""

    def __init__(self, max_degrees: float = 30.0) -> None:
        self.max_degrees = float(max_degrees)
        self.profile: NodProfile | None = None
        self.photo: np.ndarray | None = None
        self.weight = 1.0
        self._reference: np.ndarray | None = None
        self._reference_of: object = None
        self._filter = OneEuroFilter(NOD_FILTER)
        self._last = 0.0

    def pitch(
        self,
        landmarks: np.ndarray | None,
        frame: np.ndarray,
        reference: object,
        t: float | None = None,
        smooth: bool = True,
    ) -> float:
        """Degrees the driver pitched since the reference (filtered with ``smooth``, clipped to
        ± ``max_degrees``). ``landmarks``: the mesh of the driving ``frame`` (H×W×3, the size the mesh
        was read at); ``reference`` is the session's current reference keypoints (any object; only its
        identity is compared), ``t`` the frame's time in seconds."""
        if reference is not self._reference_of:
            self._reference, self._reference_of = None, reference
            self._filter.reset()
            self._last = 0.0
        rotation = None if landmarks is None else head_rotation(landmarks, frame.shape[:2])
        if rotation is None:
            return self._last
        if self._reference is None:
            self._reference = rotation
            self.weight = shot_weight(self.photo, shot_signature(frame, landmarks))
        value = pitch_since(self._reference, rotation)
        if not math.isfinite(value):
            return self._last
        if smooth:
            value = float(self._filter(np.array([value]), t)[0])
        self._last = float(np.clip(value, -self.max_degrees, self.max_degrees))
        return self._last
