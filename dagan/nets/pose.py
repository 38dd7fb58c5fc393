"""Pose network F_p and the view-synthesis geometry for self-supervised face depth (paper §3.2, eq. 2–4).

DaGAN trains the depth net by reconstructing frame I_i from frame I_{i+1}: the depth of I_i lifts its
pixels to 3D, a relative camera motion [R | t] moves them into I_{i+1}'s camera, and the intrinsics K
project them back to pixels where I_{i+1} is sampled bilinearly. Face videos come from unknown
cameras, so (unlike SfM-Learner) K is *predicted* per frame pair by the pose network together with
the motion.

Pixel convention used throughout this module (and matched to ``grid_sample(align_corners=False)``):
pixel coordinates are continuous, the image covers [0, W]×[0, H], and the centre of the pixel in row
i, column j is (u, v) = (j + 0.5, i + 0.5). K maps camera points to these coordinates, so a principal
point of (W/2, H/2) is the exact image centre, and the grid_sample coordinate is x_n = 2u/W − 1,
y_n = 2v/H − 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dagan.nets.depth import ResNetEncoder, normalize_image

# Keeps predicted focal lengths strictly positive (in units of image size) even if softplus underflows.
_FOCAL_EPS = 1e-3
# Points closer than this to the camera plane are clamped before the perspective division so the
# projection never divides by zero; such points land far outside the image and read the border.
_PROJ_EPS = 1e-6


class PoseOutput(NamedTuple):
    """What :class:`PoseNet` predicts for a pair (frame_a, frame_b).

    axisangle: B×3 rotation (axis · angle in radians), translation: B×3, together the motion
    T_a→b = transformation_matrix(axisangle, translation) taking points from frame_a's camera into
    frame_b's camera. intrinsics: B×3×3 K in pixels (see the module docstring for the convention).
    """

    axisangle: torch.Tensor
    translation: torch.Tensor
    intrinsics: torch.Tensor


class PoseHead(nn.Module):
    """Deepest encoder map B×C×h×w → 6 motion numbers B×6 (axis-angle then translation).

    1×1 squeeze, two 3×3 convs with ReLU, a 1×1 conv to 6 channels, then a spatial mean so the output
    does not depend on resolution. The final ×0.01 keeps the initial motion near identity, which the
    photometric loss needs to start from a sensible reconstruction.
    """

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.conv1 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(hidden, 6, kernel_size=1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.squeeze(x))
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return 0.01 * self.out(x).mean(dim=(2, 3))


class IntrinsicsHead(nn.Module):
    """Deepest encoder map B×C×h×w → raw intrinsics B×4 (fx, fy, cx, cy before activation).

    Global average pooling then a two-layer MLP: the camera is a property of the whole clip, not of a
    location, so no spatial structure is kept. The last layer starts with tiny weights and biases
    chosen so that, after :class:`PoseNet`'s activations, fx ≈ W, fy ≈ H (≈53° field of view) and the
    principal point ≈ image centre: a plausible camera from the first step.
    """

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(hidden, 4)
        nn.init.normal_(self.fc2.weight, std=1e-3)
        focal_bias = math.log(math.expm1(1.0 - _FOCAL_EPS))  # softplus⁻¹(1 − eps)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([focal_bias, focal_bias, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3)))))


class PoseNet(nn.Module):
    """Pose network F_p (paper eq. 2): two frames → relative motion and camera intrinsics.

    The frames are normalised and stacked along channels (3·num_input_frames channels) into one ResNet18
    encoder, so motion is inferred from joint low-level evidence of both frames. The pose head and the
    intrinsics head both read the deepest (stride-32) features.

    Args:
        width: encoder stem width (64 = standard ResNet18). The pose head is 4·width wide (256 at 64).
        num_input_frames: frames stacked at the input; ``forward`` takes exactly this many.
    """

    def __init__(self, width: int = 64, num_input_frames: int = 2) -> None:
        super().__init__()
        if num_input_frames < 2:
            raise ValueError("PoseNet needs at least two frames")
        self.num_input_frames = num_input_frames
        self.encoder = ResNetEncoder(in_channels=3 * num_input_frames, width=width)
        deepest = self.encoder.num_ch_enc[-1]
        self.pose_head = PoseHead(deepest, 4 * width)
        self.intrinsics_head = IntrinsicsHead(deepest, 4 * width)

    def forward(self, frame_a: torch.Tensor, frame_b: torch.Tensor, *more_frames: torch.Tensor) -> PoseOutput:
        """frame_a, frame_b (and any extra frames): B×3×H×W in [0, 1].

        Returns :class:`PoseOutput` with axisangle B×3, translation B×3 (motion from frame_a's camera
        to frame_b's camera as used by :func:`inverse_warp` to rebuild frame_a from frame_b), and
        intrinsics B×3×3 in pixels of an H×W image.
        """
        frames = (frame_a, frame_b, *more_frames)
        if len(frames) != self.num_input_frames:
            raise ValueError(f"expected {self.num_input_frames} frames, got {len(frames)}")
        height, width = frame_a.shape[-2:]
        x = normalize_image(torch.cat(frames, dim=1))
        deepest = self.encoder(x)[-1]

        motion = self.pose_head(deepest)
        axisangle, translation = motion[:, :3], motion[:, 3:]

        raw = self.intrinsics_head(deepest)
        fx = (F.softplus(raw[:, 0]) + _FOCAL_EPS) * width
        fy = (F.softplus(raw[:, 1]) + _FOCAL_EPS) * height
        cx = torch.sigmoid(raw[:, 2]) * width
        cy = torch.sigmoid(raw[:, 3]) * height
        return PoseOutput(axisangle, translation, intrinsics_matrix(fx, fy, cx, cy))


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------


def intrinsics_matrix(fx: torch.Tensor, fy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Build K (B×3×3) from four B-vectors; built by stacking so gradients reach every entry."""
    zero = torch.zeros_like(fx)
    one = torch.ones_like(fx)
    rows = [
        torch.stack([fx, zero, cx], dim=-1),
        torch.stack([zero, fy, cy], dim=-1),
        torch.stack([zero, zero, one], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix [v]_× (B×3×3) of v (B×3), so that [v]_× w = v × w."""
    x, y, z = v.unbind(dim=-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [
            torch.stack([zero, -z, y], dim=-1),
            torch.stack([z, zero, -x], dim=-1),
            torch.stack([-y, x, zero], dim=-1),
        ],
        dim=-2,
    )


def axisangle_to_matrix(axisangle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: rotation vectors B×3 (axis · angle, radians) → rotation matrices B×3×3.

    Written as R = I + a(θ)·[v]_× + b(θ)·[v]_×² with the *unnormalised* vector v, a = sin θ/θ and
    b = (1 − cos θ)/θ² = 2 sin²(θ/2)/θ², so no axis has to be normalised. Near θ = 0 (where the pose
    net starts) both coefficients switch to their Taylor series, which keeps the values and the
    gradients finite and exact instead of 0/0.
    """
    theta2 = (axisangle * axisangle).sum(dim=-1)
    small = theta2 < 1e-6
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(theta2_safe)
    half_sin = torch.sin(0.5 * theta)
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, 2.0 * half_sin * half_sin / theta2_safe)
    k = _skew(axisangle)
    eye = torch.eye(3, dtype=axisangle.dtype, device=axisangle.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def transformation_matrix(
    axisangle: torch.Tensor, translation: torch.Tensor, invert: bool = False
) -> torch.Tensor:
    """Rigid motion B×4×4 from axis-angle B×3 and translation B×3.

    Without ``invert``: x ↦ R x + t. With ``invert``: the exact inverse x ↦ Rᵀ(x − t), used when the
    pose net was run on the frames in the opposite order to the warp being built.
    """
    rot = axisangle_to_matrix(axisangle)
    t = translation[..., :, None]
    if invert:
        rot = rot.transpose(-1, -2)
        t = -(rot @ t)
    bottom = torch.zeros_like(rot[..., :1, :])
    bottom_row = torch.cat([bottom, torch.ones_like(bottom[..., :1])], dim=-1)
    top = torch.cat([rot, t], dim=-1)
    return torch.cat([top, bottom_row], dim=-2)


def pixel_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Homogeneous pixel-centre coordinates 3×(H·W), row-major: (j + 0.5, i + 0.5, 1) for row i, col j."""
    v = torch.arange(height, dtype=like.dtype, device=like.device) + 0.5
    u = torch.arange(width, dtype=like.dtype, device=like.device) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu.reshape(-1), vv.reshape(-1), torch.ones_like(uu).reshape(-1)], dim=0)


def backproject(depth: torch.Tensor, inv_K: torch.Tensor) -> torch.Tensor:
    """Lift every pixel to 3D: depth B×1×H×W, inv_K B×3×3 → homogeneous camera points B×4×(H·W).

    Point n (row-major over pixels) is depth · K⁻¹ (u, v, 1)ᵀ with pixel-centre coordinates, so z
    equals the given depth; the trailing 1 lets a 4×4 motion be applied with one matmul.
    """
    b, _, h, w = depth.shape
    pix = pixel_grid(h, w, depth)  # 3×N
    rays = inv_K @ pix  # B×3×N
    cam = rays * depth.reshape(b, 1, h * w)
    return torch.cat([cam, torch.ones_like(cam[:, :1])], dim=1)


def project(points: torch.Tensor, K: torch.Tensor, T: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move points B×4×N by T (B×4×4), project with K (B×3×3) → grid_sample grid B×H×W×2 (N = H·W).

    The grid is in [-1, 1] for the ``align_corners=False`` convention (x_n = 2u/W − 1, y_n = 2v/H − 1,
    with pixel centres at j + 0.5), matching :func:`backproject`, so an identity motion samples every
    pixel exactly at its own centre. Points behind the camera (z ≤ 0) are clamped to a tiny positive z
    and thus fall far outside [-1, 1].
    """
    cam = (T @ points)[:, :3]  # B×3×N
    pix = K @ cam
    z = pix[:, 2:3].clamp(min=_PROJ_EPS)
    uv = pix[:, :2] / z  # B×2×N, pixels
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=uv.dtype, device=uv.device).view(1, 2, 1)
    grid = uv * scale - 1.0
    return grid.permute(0, 2, 1).reshape(points.shape[0], height, width, 2)


def inverse_warp(
    image_src: torch.Tensor, depth_tgt: torch.Tensor, T_tgt_to_src: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """Reconstruct the target view from the source image (paper eq. 3–4).

    image_src: B×C×H×W source frame (I_{i+1}); depth_tgt: B×1×H×W depth of the target frame (I_i);
    T_tgt_to_src: B×4×4 motion from target camera to source camera; K: B×3×3 intrinsics in pixels of
    an H×W image. Returns B×C×H×W: for each target pixel, the source image bilinearly sampled where
    that pixel's 3D point lands in the source view; outside the source image the border is repeated
    so the photometric loss sees no artificial black.

    Geometry runs in at least float32 even under mixed precision, because sub-pixel coordinates need
    it (float32 still leaves ~1e-5 px of rounding in the sampling positions; float64 inputs are kept
    in float64).
    """
    if image_src.shape[-2:] != depth_tgt.shape[-2:]:
        raise ValueError(f"image {tuple(image_src.shape)} and depth {tuple(depth_tgt.shape)} sizes differ")
    h, w = depth_tgt.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(depth_tgt.dtype, K.dtype), torch.float32)
    K_ = K.to(dtype)
    points = backproject(depth_tgt.to(dtype), torch.linalg.inv(K_))
    grid = project(points, K_, T_tgt_to_src.to(dtype), h, w)
    return F.grid_sample(
        image_src, grid.to(image_src.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
