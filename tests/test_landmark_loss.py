"""The face-landmark position loss (training/landmark_loss.py) and face-api's 68-point landmark net."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dagan.config import ConfigError
from training.config import TrainConfig, load_train_config

POINTS = TrainConfig().dagan.kp_landmark_points
SHARED = Path(os.environ.get("DAGAN_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
PHOTO = SHARED / "data" / "real-faces" / "photos" / "s42.jpg"
# iBUG-68 point → the mediapipe mesh point at the same place: mouth corners, inner lips, outer eye
# corners, nose tip, chin.
SAME_PLACE = {48: 61, 54: 291, 62: 13, 66: 14, 36: 33, 45: 263, 30: 1, 8: 152}


def _assets():
    from evaluation.assets import find_eval_assets

    assets = find_eval_assets(required=False)
    if assets is None:
        pytest.skip("face-api assets absent: run `dagan fetch-eval-assets` (or set DAGAN_EVAL_ASSETS)")
    return assets


def _unit(mesh: np.ndarray, size: int) -> torch.Tensor:
    """Mesh pixels (mediapipe: pixel i spans [i, i+1)) → the [−1, 1] frame of training.data, K points."""
    pts = mesh[list(POINTS), :2].astype(np.float32)
    return torch.from_numpy(2.0 * (pts - 0.5) / (size - 1) - 1.0)[None]


@pytest.fixture(scope="module")
def face():
    """A real held-out photo cropped as the server crops it, with its mediapipe mesh."""
    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} is not there (the real-face material lives in ../shared)")
    from evaluation.cross import load_photo, measure_landmarks

    crop = load_photo(PHOTO, 128, None).crop
    mesh = measure_landmarks(crop)
    assert mesh is not None
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255, mesh


def test_landmark_net_lands_on_the_mesh_points_of_a_real_face(face):
    from training.landmark_loss import crop_faces, face_boxes, load_landmark_net

    net = load_landmark_net(str(_assets()))
    image, mesh = face
    boxes = face_boxes(_unit(mesh, 128), POINTS)
    with torch.no_grad():
        marks = net(crop_faces(image, boxes))[0]
    # crop fractions → [−1, 1] of the box → pixels of the 128 crop
    cx, cy, half = boxes[0].tolist()
    xy = torch.stack([cx + (2 * marks[:, 0] - 1) * half, cy + (2 * marks[:, 1] - 1) * half], 1)
    pixels = (xy.numpy() + 1) / 2 * 127 + 0.5
    errors = [np.linalg.norm(pixels[a] - mesh[b, :2]) for a, b in SAME_PLACE.items()]
    assert np.mean(errors) < 3.0 and max(errors) < 6.0, np.round(errors, 1)


def test_landmark_loss_is_zero_on_the_target_and_grows_with_a_moved_mouth(face):
    from training.landmark_loss import FaceLandmarkLoss, load_landmark_net

    image, mesh = face
    loss = FaceLandmarkLoss(load_landmark_net(str(_assets())), POINTS, focus_weight=4.0)
    marks = _unit(mesh, 128)
    assert loss(image, image, marks).item() == 0.0
    # the lower lip and chin 3 px lower: an opening mouth
    moved = image.clone()
    y0 = int(mesh[14, 1]) - 1
    moved[..., y0 + 3 :, 40:88] = image[..., y0 : 128 - 3, 40:88]
    pred = moved.clone().requires_grad_(True)
    value = loss(pred, image, marks)
    assert value.item() > 0.003  # fractions of the face box: a few tenths of a pixel per point at least
    value.backward()
    grad = pred.grad.abs().sum(dim=(0, 1))
    assert grad[y0 - 10 : y0 + 15, 40:88].sum() > grad[:30].sum()  # it looks at the mouth, not the hair
    assert not any(p.requires_grad for p in loss.net.parameters())
    # frames without a face box are left out; with none, the term is a zero that keeps the graph
    none = torch.full_like(marks, float("nan"))
    empty = loss(pred, image, none)
    assert empty.item() == 0.0 and empty.requires_grad


def test_cross_motion_loss_asks_the_avatar_to_move_as_the_driver_did(face):
    """An avatar that opens its mouth by 3 px when the driver opened theirs by as much (in face-box
    units) costs less than one that stays shut, and more than nothing when the driver held still."""
    from training.landmark_loss import CrossMotionLoss, load_landmark_net

    image, mesh = face
    loss = CrossMotionLoss(load_landmark_net(str(_assets())), POINTS)
    marks = _unit(mesh, 128)
    opened_marks = marks.clone()
    lower = list(POINTS).index(14)
    opened_marks[:, lower, 1] += 3 * 2 / 127  # the driver's lower inner lip 3 px lower
    y0 = int(mesh[14, 1]) - 1
    opened = image.clone()
    opened[..., y0 + 3 :, 40:88] = image[..., y0 : 128 - 3, 40:88]

    assert loss(image, image, marks, marks, marks).item() == 0.0  # nobody moved
    shut = loss(image, image, marks, marks, opened_marks).item()
    follows = loss(opened, image, marks, marks, opened_marks).item()
    moves_alone = loss(opened, image, marks, marks, marks).item()
    assert follows < shut and moves_alone > 0.0, (follows, shut, moves_alone)
    assert shut > 0.003  # the quarter of a 3-px opening in a ~75-px box (the four signals' mean)
    # dagan.cross_motion_signals: the mouth alone counts the whole opening, the nose alone hardly any
    mouth_only = CrossMotionLoss(loss.net, POINTS, (1.0, 0.0, 0.0, 0.0))
    nose_only = CrossMotionLoss(loss.net, POINTS, (0.0, 0.0, 1.0, 1.0))
    assert mouth_only(image, image, marks, marks, opened_marks).item() > 2 * shut
    assert nose_only(image, image, marks, marks, opened_marks).item() == 0.0  # the nose did not move

    avatar = opened.clone().requires_grad_(True)
    value = loss(avatar, image, marks, marks, marks)
    value.backward()
    grad = avatar.grad.abs().sum(dim=(0, 1))
    assert grad[y0 - 10 : y0 + 15, 40:88].sum() > grad[:30].sum()  # it looks at the mouth
    none = torch.full_like(marks, float("nan"))
    empty = loss(avatar, image, none, marks, marks)  # no face in the photo: left out
    assert empty.item() == 0.0 and empty.requires_grad


def test_cross_motion_gray_reads_luminance_only(face):
    """dagan.cross_motion_gray: a mouth tinted purple at the same luminance (what a generator painted to
    fool the colour net) reads as no motion at all, while a mouth that really opens still counts."""
    from training.landmark_loss import CrossMotionLoss, load_landmark_net

    image, mesh = face
    net = load_landmark_net(str(_assets()))
    gray, colour = CrossMotionLoss(net, POINTS, gray=True), CrossMotionLoss(net, POINTS)
    marks = _unit(mesh, 128)
    y0 = int(mesh[14, 1]) - 1
    tinted = image.clone()
    shift = torch.tensor([0.587, -0.299, 0.0]).view(1, 3, 1, 1) * 0.3  # BT.601 luminance unchanged
    tinted[..., y0 - 6 : y0 + 6, 48:80] += shift
    assert gray(tinted, image, marks, marks, marks).item() < 1e-5
    assert colour(tinted, image, marks, marks, marks).item() > 1e-5  # the colour net does see it
    opened_marks = marks.clone()
    opened_marks[:, list(POINTS).index(14), 1] += 3 * 2 / 127
    opened = image.clone()
    opened[..., y0 + 3 :, 40:88] = image[..., y0 : 128 - 3, 40:88]
    follows = gray(opened, image, marks, marks, opened_marks).item()
    shut = gray(image, image, marks, marks, opened_marks).item()
    assert follows < shut, (follows, shut)


@pytest.mark.parametrize(("term", "point"), [("face_landmarks", 152), ("cross_motion", 159)])
def test_face_api_terms_need_the_net_and_their_mesh_points(tmp_path, term, point):
    """Both terms read face-api's landmark net, boxed (and, for cross_motion, measured) by mesh points
    the keypoint prior must track: the box's chin 152, the cross term's upper lid 159."""
    with pytest.raises(ConfigError, match="face_landmark_weights"):
        load_train_config(None, {"model": "tiny", f"dagan.weights.{term}": 100.0})
    without = [p for p in POINTS if p != point] + [17]
    with pytest.raises(ConfigError, match=str(point)):
        load_train_config(
            None,
            {
                "model": "tiny",
                f"dagan.weights.{term}": 100.0,
                "dagan.face_landmark_weights": str(tmp_path),
                "dagan.kp_landmark_points": without,
            },
        )


def test_cross_motion_signals_are_four_weights():
    with pytest.raises(ConfigError, match=r"dagan\.cross_motion_signals"):
        load_train_config(None, {"model": "tiny", "dagan.cross_motion_signals": [1.0, 1.0, 0.0]})


@pytest.mark.slow
def test_dagan_stage_trains_with_the_landmark_and_cross_identity_losses(tmp_path):
    from training.pack import write_smoke_dataset
    from training.trainer import Trainer

    assets = _assets()
    root = write_smoke_dataset(tmp_path / "data", clips=2, frames=8, size=64)
    cfg = load_train_config(
        None,
        {
            "model": "tiny",
            "data.root": str(root),
            "data.workers": 0,
            "data.repeats": 2,
            "depth.steps": 1,
            "depth.batch_size": 2,
            "dagan.steps": 2,
            "dagan.batch_size": 2,
            "dagan.weights.face_landmarks": 100.0,
            "dagan.weights.cross_motion": 100.0,
            "dagan.weights.cross_chroma": 10.0,
            "dagan.face_landmark_weights": str(assets),
        },
    )
    depth = Trainer("depth", cfg, tmp_path / "depth", progress=False, tensorboard=False).run()
    trainer = Trainer(
        "dagan", cfg, tmp_path / "run", depth_checkpoint=str(depth.weights), progress=False, tensorboard=False
    )
    result = trainer.run()
    for name in ("face_landmarks", "cross_motion"):
        terms = [h[name] for h in result.history]
        assert len(terms) == 2 and all(np.isfinite(t) and t > 0 for t in terms), (name, terms)
    chroma = [h["cross_chroma"] for h in result.history]  # 0 where the avatar has no colour its photo lacks
    assert len(chroma) == 2 and all(np.isfinite(t) and t >= 0 for t in chroma), chroma
