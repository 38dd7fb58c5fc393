"""The face-landmark position loss (``dagan.weights.face_landmarks``): where the generated face's mouth,
eyes and jaw are, against where the driving frame's are.

Why: the reconstruction and perceptual terms weigh every pixel alike, and a mouth that stays shut while
the driver's opens by 2–3 px of a 128-px frame costs them almost nothing, so the generator learns to
move heads long before it learns to open mouths (the bundled model's history, weights/README.md). This
term measures the opening itself. face-api's 68-point landmark net (:class:`dagan.face_api.LandmarkNet`,
frozen, differentiable) runs on the prediction and on the driving frame, both cropped by the driving
frame's face box, and the loss is the mean L1 distance between the two sets of points, the mouth and
eye points counting ``kp_landmark_focus_weight`` times. The box comes from the face-mesh landmarks the
keypoint prior already tracks (cheeks 234 and 454, forehead 10, chin 152, which must be among
``dagan.kp_landmark_points``): on such boxes the net lands 1.2 px from mediapipe's points at 128 px and
its mouth opening follows mediapipe's with r 0.96, where the loose 128-px crop gives 10–20 px.

Units: fractions of the face box (0.01 ≈ 1 px of a 100-px face), so the term is small; weights of the
order of 100 make it count beside the perceptual term. Frames whose box points are missing (no face
found when the tracks were made) are left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dagan.face_api import LANDMARK_SIZE, LandmarkNet, read_tfjs_weights

from .config import CROSS_MESH_POINTS, FACE_BOX_POINTS
from .losses import ycbcr
from .perceptual import find_landmark_manifest

__all__ = [
    "BOX_POINTS",
    "CROSS_MESH_POINTS",
    "CrossMotionLoss",
    "FaceLandmarkLoss",
    "crop_faces",
    "face_boxes",
    "load_landmark_net",
]

BOX_POINTS = FACE_BOX_POINTS
# iBUG-68 indices of the eyes (36–47) and the mouth (48–67): the points that carry expression.
FOCUS_68 = tuple(range(36, 68))


def load_landmark_net(path: str) -> LandmarkNet:
    """The frozen landmark net from a face-api weights folder or its manifest
    (``dagan.face_landmark_weights``)."""
    net = LandmarkNet().load_tfjs(read_tfjs_weights(find_landmark_manifest(path)))
    return net.eval().requires_grad_(False)


def face_boxes(marks: torch.Tensor, points: Sequence[int]) -> torch.Tensor:
    """B×K×2 face-mesh landmarks in the [−1, 1] frame (K = ``points``, the mesh indices) → B×3 square
    boxes (centre x, centre y, half side) in the same frame, from :data:`BOX_POINTS`."""
    idx = [list(points).index(p) for p in BOX_POINTS]
    left, right, top, chin = (marks[:, i] for i in idx)
    cx = (left[:, 0] + right[:, 0]) / 2
    cy = (top[:, 1] + chin[:, 1]) / 2
    half = torch.maximum(right[:, 0] - left[:, 0], chin[:, 1] - top[:, 1]).abs() / 2
    return torch.stack([cx, cy, half.clamp_min(1e-3)], dim=1)


def crop_faces(images: torch.Tensor, boxes: torch.Tensor, size: int = LANDMARK_SIZE) -> torch.Tensor:
    """B×3×H×W images, B×3 boxes (:func:`face_boxes`) → B×3×size×size crops, differentiable in the
    images (bilinear sampling; outside the frame the border pixels repeat)."""
    b = images.shape[0]
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = boxes[:, 2]
    theta[:, 1, 1] = boxes[:, 2]
    theta[:, 0, 2] = boxes[:, 0]
    theta[:, 1, 2] = boxes[:, 1]
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FaceLandmarkLoss(nn.Module):
    """prediction, target: B×3×H×W in [0, 1]; marks: B×K×2 face-mesh landmarks of the target in the
    [−1, 1] frame (NaN where none) → scalar: weighted mean |LM(pred crop) − LM(target crop)| over the 68
    points, in fractions of the box. The target's landmarks carry no gradient; computed in float32."""

    def __init__(self, net: LandmarkNet, points: Sequence[int], focus_weight: float) -> None:
        super().__init__()
        self.net = net
        self.points = tuple(points)
        self.box_index = [self.points.index(p) for p in BOX_POINTS]
        weights = torch.ones(68)
        weights[list(FOCUS_68)] = focus_weight
        self.register_buffer("weights", weights / weights.sum(), persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
        with torch.autocast(prediction.device.type, enabled=False):
            valid = torch.isfinite(marks[:, self.box_index]).all(dim=2).all(dim=1)
            if not bool(valid.any()):
                return prediction.float().sum() * 0.0
            boxes = face_boxes(marks[valid].float(), self.points)
            mine = self.net(crop_faces(prediction[valid].float(), boxes))
            with torch.no_grad():
                theirs = self.net(crop_faces(target[valid].float(), boxes))
            return ((mine - theirs).abs().sum(dim=2) * self.weights).sum(dim=1).mean()


def _openings_68(lm: torch.Tensor) -> torch.Tensor:
    """B×68×2 face-api landmarks → B×4: mouth opening (inner lips 66 − 62), eye opening (mean over both
    eyes of lower 40/41, 46/47 − upper 37/38, 43/44), nose tip (30) x and y."""
    y = lm[..., 1]
    mouth = y[:, 66] - y[:, 62]
    eyes = y[:, [40, 41, 46, 47]].mean(1) - y[:, [37, 38, 43, 44]].mean(1)
    return torch.stack([mouth, eyes, lm[:, 30, 0], lm[:, 30, 1]], dim=1)


def _openings_mesh(marks: torch.Tensor, points: Sequence[int]) -> torch.Tensor:
    """B×K×2 face-mesh landmarks (K = ``points``) → B×4, the same four signals as :func:`_openings_68`."""
    i = {p: list(points).index(p) for p in CROSS_MESH_POINTS}
    y = marks[..., 1]
    mouth = y[:, i[14]] - y[:, i[13]]
    eyes = (y[:, i[145]] - y[:, i[159]] + y[:, i[374]] - y[:, i[386]]) / 2
    return torch.stack([mouth, eyes, marks[:, i[1], 0], marks[:, i[1], 1]], dim=1)


class CrossMotionLoss(nn.Module):
    """The cross-identity term (``dagan.weights.cross_motion``): an avatar of one person driven by
    another must open its mouth, close its eyes and move its nose by what the driver did, in fractions
    of each one's own face box (what movement-scale adaptation promises and ``dagan eval-cross``
    measures as gain).

    Why: the paper trains self-reenactment only, where the source frame already holds the driver's face
    and a generator that damps motion loses little. Every user drives someone else's photo, and there
    the bundled model carried a third of the mouth's opening and almost no blink (weights/README.md).
    There is no ground-truth frame for another person, but face-api's landmark net (frozen,
    differentiable) can read the avatar's mouth and eyes, and the driver's face-mesh tracks say how far
    they should move.

    forward(avatar, photo: B×3×H×W in [0, 1]; photo_marks, driver_ref_marks, driver_marks: B×K×2
    face-mesh landmarks in the [−1, 1] frame, K = ``points``) → scalar: mean over the valid items of
    |Δ avatar − Δ driver|, averaged over the four signals (mouth, eyes, nose x, nose y) with the weights
    ``signals`` (``dagan.cross_motion_signals``). Δ avatar = LM(avatar) − LM(photo)
    in the photo's box; Δ driver = (mesh(driver) − mesh(reference)) / the reference's box side. Items
    with a missing landmark are left out. Computed in float32.

    ``gray``: face-api reads both crops as luminance (``dagan.cross_motion_gray``). A generator scored by
    this net alone learned to paint a purple blob where the mouth should open; in gray a blob has to be
    dark, as an open mouth is, to count.
    """

    def __init__(
        self,
        net: LandmarkNet,
        points: Sequence[int],
        signals: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        gray: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.points = tuple(points)
        self.gray = gray
        weights = torch.tensor([float(v) for v in signals])
        self.register_buffer("signals", weights / weights.sum(), persistent=False)

    def forward(
        self,
        avatar: torch.Tensor,
        photo: torch.Tensor,
        photo_marks: torch.Tensor,
        driver_ref_marks: torch.Tensor,
        driver_marks: torch.Tensor,
    ) -> torch.Tensor:
        with torch.autocast(avatar.device.type, enabled=False):
            marks = torch.stack([photo_marks, driver_ref_marks, driver_marks]).float()
            valid = torch.isfinite(marks).all(dim=3).all(dim=2).all(dim=0)
            if not bool(valid.any()):
                return avatar.float().sum() * 0.0
            photo_box = face_boxes(marks[0, valid], self.points)
            ref_box = face_boxes(marks[1, valid], self.points)
            mine = _openings_68(self.net(self._view(crop_faces(avatar[valid].float(), photo_box))))
            with torch.no_grad():
                rest = _openings_68(self.net(self._view(crop_faces(photo[valid].float(), photo_box))))
                side = (2 * ref_box[:, 2]).unsqueeze(1)
                want = (
                    _openings_mesh(marks[2, valid], self.points)
                    - _openings_mesh(marks[1, valid], self.points)
                ) / side
            return (((mine - rest) - want).abs().mean(dim=0) * self.signals).sum()

    def _view(self, crops: torch.Tensor) -> torch.Tensor:
        """B×3×h×w → what the net reads: the crops, or their luminance (ITU-R BT.601) in all channels."""
        if not self.gray:
            return crops
        return ycbcr(crops)[:, :1].expand_as(crops)
