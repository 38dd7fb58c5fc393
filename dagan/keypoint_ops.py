"""Relative motion transfer (FOMM's "relative" mode, with or without movement-scale adaptation).

Absolute mode puts the driver's keypoints on the source, which also transfers the driver's face shape
and position. Relative mode applies only the driver's *motion since a reference frame* to the source's
own keypoints, scaled by the ratio of the two faces' keypoint-hull sizes, so a small face in the photo
is not dragged by a large face in the webcam.
"""

from __future__ import annotations

import torch

from .nets.blocks import inverse_2x2
from .nets.keypoints import Keypoints


def convex_hull_area(points: torch.Tensor) -> torch.Tensor:
    """Area of the 2-D convex hull of each point set: B×K×2 → B (Andrew's monotone chain, on the CPU).

    Keypoint sets are tiny (K = 15), so a Python loop is cheaper than any dependency.
    """
    areas = []
    for pts in points.detach().double().cpu().tolist():
        pts = sorted(map(tuple, pts))
        if len(pts) < 3:
            areas.append(0.0)
            continue

        def cross(o, a, b):
            return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

        lower: list = []
        for p in pts:
            while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
                lower.pop()
            lower.append(p)
        upper: list = []
        for p in reversed(pts):
            while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
                upper.pop()
            upper.append(p)
        hull = lower[:-1] + upper[:-1]
        area = 0.0
        for i in range(len(hull)):
            x0, y0 = hull[i]
            x1, y1 = hull[(i + 1) % len(hull)]
            area += x0 * y1 - x1 * y0
        areas.append(abs(area) / 2.0)
    return torch.tensor(areas, dtype=points.dtype, device=points.device)


def movement_scale(kp_source: Keypoints, kp_reference: Keypoints) -> torch.Tensor:
    """sqrt(hull area of source kp / hull area of reference driving kp): B×1×1, 1 where degenerate."""
    a_s = convex_hull_area(kp_source.value)
    a_r = convex_hull_area(kp_reference.value)
    scale = torch.where(a_r > 0, torch.sqrt(a_s / a_r.clamp_min(1e-12)), torch.ones_like(a_r))
    return scale.view(-1, 1, 1)


def open_mouth(
    driving: torch.Tensor,
    reference: torch.Tensor,
    mouth: tuple[int, ...],
    gain: torch.Tensor | float,
) -> torch.Tensor:
    """Driving keypoint values (B×K×2) with the inner lips opened ``gain`` times as far as the driver
    opened them since ``reference`` (B×K×2); ``mouth`` = (upper lip, lower lip) keypoint indices,
    ``gain`` a float or B×1×1.

    Why: the models trained here carry the driver's lip motion to the keypoints (their gap follows the
    face mesh's at gain ~0.7), but the generator draws an open mouth only part of the way, so the avatar's
    mouth opened at a third of the driver's (weights/README.md, "Mouth gain"). Pushing the lip keypoints
    further apart compensates in the one place every backend shares. Only the *opening* is scaled: the
    change of the lip gap measured along the reference's upper→lower-lip axis, and only where it grew
    (``relu``), so the head's motion (both lips together) is untouched and a mouth that closes further
    than at the reference is never pushed through itself. The extra opening moves the lower lip alone,
    as a dropping jaw does: split between both lips it pulled the upper lip up towards the nose (a
    stretched red smear in the README strip). Gain 1 returns ``driving`` as it is.
    """
    upper, lower = mouth
    axis = reference[:, lower] - reference[:, upper]  # B×2
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    moved = driving - reference
    opening = ((moved[:, lower] - moved[:, upper]) * axis).sum(dim=-1, keepdim=True)  # B×1
    gain = torch.as_tensor(gain, dtype=driving.dtype, device=driving.device).reshape(-1, 1)
    push = (gain - 1) * torch.relu(opening) * axis  # B×2: all to the lower lip (the jaw drops)
    k = torch.arange(driving.shape[1], device=driving.device).view(1, -1, 1)
    lower_only = (k == lower).to(driving.dtype)  # 1×K×1
    return driving + lower_only * push.unsqueeze(1)


def relative_keypoints(
    kp_source: Keypoints,
    kp_driving: Keypoints,
    kp_reference: Keypoints,
    scale: torch.Tensor | float = 1.0,
    relative: torch.Tensor | None = None,
    mouth: tuple[int, ...] = (),
    mouth_gain: torch.Tensor | float = 1.0,
    jacobian_gain: float = 1.0,
) -> Keypoints:
    """Source keypoints moved by the driver's displacement since ``kp_reference`` — the one
    relative-motion implementation (the engine's eager path, its CUDA graphs and the exported graphs all
    run it through :func:`dagan.graph_contract.frame_step`).

    value = kp_s + scale · (kp_d − kp_ref); jacobian = (J_d J_ref⁻¹) J_s. All B×K×2 (×2). ``scale``
    comes from :func:`movement_scale`, computed once per (source, reference) pair, or is 1 for relative
    motion without movement-scale adaptation (the authors' ``--relative`` alone). The 2×2 inverse is the
    closed form (``torch.linalg.inv`` has no ONNX op). With ``relative`` (B×1×1, 1 = relative,
    0 = absolute) each item chooses between this and ``kp_driving`` with ``where`` rather than by
    blending, so an absolute item's placeholder reference can never leak a NaN into its output.
    With ``mouth`` (the model's ``keypoints.mouth_keypoints``) the driver's lip opening is first scaled
    by ``mouth_gain`` (:func:`open_mouth`; relative items only). ``jacobian_gain`` g (the model's
    ``keypoints.jacobian_gain``) scales the local motion the Jacobians carry: J = J_s + g · (J_d J_ref⁻¹
    J_s − J_s), so 1 is the transfer above and g > 1 turns and stretches each keypoint's neighbourhood
    further than the driver's. Why: the bundled model turns the head mostly through the Jacobians, and
    at two thirds of the driver's turn (weights/README.md, "Head turns"); scaling the keypoints'
    displacement instead hardly turned it.
    """
    driving = kp_driving.value
    if mouth:
        driving = open_mouth(driving, kp_reference.value, mouth, mouth_gain)
    value = kp_source.value + (driving - kp_reference.value) * scale
    jac = None
    if (
        kp_source.jacobian is not None
        and kp_driving.jacobian is not None
        and kp_reference.jacobian is not None
    ):
        ref_jac = kp_reference.jacobian
        if ref_jac.dtype in (torch.float16, torch.bfloat16):
            # the determinant cancels catastrophically at 8–11 mantissa bits: invert in fp32
            inv = inverse_2x2(ref_jac.float()).to(ref_jac.dtype)
        else:
            inv = inverse_2x2(ref_jac)
        jac = kp_driving.jacobian @ inv @ kp_source.jacobian
        if jacobian_gain != 1.0:
            jac = kp_source.jacobian + jacobian_gain * (jac - kp_source.jacobian)
    if relative is None:
        return Keypoints(value, jac)
    use = relative > 0.5  # B×1×1
    value = torch.where(use, value, kp_driving.value)
    if jac is not None:
        jac = torch.where(use.unsqueeze(-1), jac, kp_driving.jacobian)
    return Keypoints(value, jac)
