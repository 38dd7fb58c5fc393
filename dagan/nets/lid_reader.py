"""The lid reader: how open the driver's eyes are, read from the driving crop around the lid keypoints.

Why a network of its own: the keypoint detector sees the crop blurred to 32×32, where a blink moves a
lid by under a pixel; its lid keypoints follow the face mesh's eye opening with a median per-clip r of
0.32 on held-out people, and drift with gaze and pose as far as a blink moves them. Read from two small
patches of the full-resolution crop, a blink is plain (the iris and the white go, skin comes): this net
follows the mesh's eye opening at r 0.75 on the same clips (weights/README.md, "Blinks").

It only reads; :mod:`dagan.blink` turns the reading into how far to close the avatar's lids and draws
that. The patches are placed by the lid keypoints the model already detects (their midpoints are the
eyes' centres, their distance the patches' scale), so the reader costs 3.5 M multiply-adds per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PATCH_ROWS, PATCH_COLS = 16, 24
# Patch size in units of the distance between the two eyes' centres (~22 px in a 128-px crop).
PATCH_WIDTH, PATCH_HEIGHT = 0.8, 0.5


def eye_patches(images: torch.Tensor, kp: torch.Tensor, lids: tuple[int, int, int, int]) -> torch.Tensor:
    """The two eyes of B×3×H×W ``images`` (in [0, 1]) as B×2×3×PATCH_ROWS×PATCH_COLS patches.

    ``kp`` B×K×2 in the keypoint frame ([-1, 1], x then y); ``lids`` the (upper, lower) lid keypoints of
    the image-left eye, then of the image-right eye. Each patch is centred on its eye's lid midpoint and
    aligned with the line through both eyes (so a rolled head gives the same patch); the image-right eye
    is mirrored, so both patches show the nose on the same side and one set of weights reads both.
    """
    a_up, a_lo, b_up, b_lo = lids
    left = 0.5 * (kp[:, a_up] + kp[:, a_lo])  # B×2
    right = 0.5 * (kp[:, b_up] + kp[:, b_lo])
    dist = (right - left).norm(dim=-1, keepdim=True).clamp_min(1e-3)  # B×1
    axis = (right - left) / dist
    normal = torch.stack([-axis[:, 1], axis[:, 0]], dim=-1)
    u = torch.linspace(-0.5, 0.5, PATCH_COLS, device=kp.device, dtype=kp.dtype) * PATCH_WIDTH
    v = torch.linspace(-0.5, 0.5, PATCH_ROWS, device=kp.device, dtype=kp.dtype) * PATCH_HEIGHT
    along = dist[:, :, None, None] * axis[:, None, None, :]  # B×1×1×2
    across = dist[:, :, None, None] * normal[:, None, None, :]
    patches = []
    for centre, side in ((left, 1.0), (right, -1.0)):
        grid = (
            centre[:, None, None, :]
            + (side * u)[None, None, :, None] * along
            + v[None, :, None, None] * across
        )  # B×rows×cols×2
        patches.append(
            F.grid_sample(
                images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
            )
        )
    return torch.stack(patches, dim=1)


class LidReader(nn.Module):
    """B×3×H×W driving crops + B×K×2 keypoints → B×2 eye opening (lid gap over eye width, as the face
    mesh measures it: ~0.3 open, ~0.05 closed) of the image-left and image-right eye.

    Each patch is normalised to zero mean and unit contrast first, so skin tone and lighting do not
    read as openness.
    """

    def __init__(self, lids: tuple[int, ...]) -> None:
        super().__init__()
        if len(lids) != 4:
            raise ValueError(f"LidReader needs four lid keypoints, got {list(lids)}")
        self.lids: tuple[int, int, int, int] = (int(lids[0]), int(lids[1]), int(lids[2]), int(lids[3]))
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Dropout(0.3),
            nn.Linear(32 * (PATCH_ROWS // 4) * (PATCH_COLS // 4), 32),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(32, 1),
        )

    def read_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """N×3×PATCH_ROWS×PATCH_COLS → N openness values."""
        mean = patches.mean(dim=(1, 2, 3), keepdim=True)
        spread = patches.std(dim=(1, 2, 3), keepdim=True).clamp_min(0.02)
        return self.head(self.features((patches - mean) / spread)).squeeze(1)

    def forward(self, images: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        patches = eye_patches(images, kp, self.lids)  # B×2×3×r×c
        return self.read_patches(patches.flatten(0, 1)).view(-1, 2)
