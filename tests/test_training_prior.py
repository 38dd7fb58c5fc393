"""The keypoint landmark prior and the face-feature perceptual loss used to train the bundled live-128."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import LANDMARKS_FILE, SourceDrivingDataset
from training.landmarks import LANDMARK_INDICES, annotate_clip
from training.losses import build_perceptual_loss, landmark_prior_loss


def test_landmark_prior_ignores_frames_without_a_face():
    kp = torch.zeros(2, 3, 2, requires_grad=True)
    marks = torch.tensor([[[0.5, 0.5]] * 3, [[float("nan"), float("nan")]] * 3])
    loss = landmark_prior_loss(kp, marks)
    assert loss.item() == pytest.approx(0.5)  # only the first item counts
    loss.backward()
    assert kp.grad[1].abs().sum() == 0 and kp.grad[0].abs().sum() > 0
    none = landmark_prior_loss(kp, torch.full((2, 3, 2), float("nan")))
    assert none.item() == 0.0 and none.requires_grad


def _clip(tmp_path, frames: list[np.ndarray]):
    import cv2

    clip = tmp_path / "data" / "train" / "c0"
    clip.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(clip / f"{i:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return clip


def test_landmark_tracks_reach_the_dataset_in_keypoint_coordinates(tmp_path, astronaut):
    import cv2

    face = cv2.resize(astronaut, (128, 128), interpolation=cv2.INTER_AREA)
    blank = np.full_like(face, 127)
    clip = _clip(tmp_path, [face, blank])
    assert annotate_clip(clip) == (2, 1)  # the grey frame has no face
    assert annotate_clip(clip) is None  # present: not redone
    marks = np.load(clip / LANDMARKS_FILE)
    assert marks.shape == (2, len(LANDMARK_INDICES), 2)
    assert np.isfinite(marks[0]).all() and np.isnan(marks[1]).all()
    ds = SourceDrivingDataset(tmp_path / "data", "train", 128)
    item = ds[0]
    got = {0: None, 1: None}
    # the two frames are source/driving in some order: the one with a face has the pixel track mapped
    # to [-1, 1] with pixel centres at ±1 (x = 2 (px − 0.5) / (W − 1) − 1)
    for key in ("source_landmarks", "driving_landmarks"):
        v = item[key].numpy()
        got[int(np.isnan(v).all())] = v
    expected = 2.0 * (marks[0] - 0.5) / 127.0 - 1.0
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    # eyes above the mouth, left eye corner left of the right one: the tracks are the face's, not noise
    assert expected[0, 0] < expected[3, 0] and expected[0, 1] < expected[5, 1]


def test_face_feature_loss_prefers_the_sharp_image(astronaut):
    from evaluation.assets import find_eval_assets

    assets = find_eval_assets(required=False)
    if assets is None:
        pytest.skip("face-api assets absent: run `dagan fetch-eval-assets` (or set DAGAN_EVAL_ASSETS)")
    import cv2

    loss = build_perceptual_loss("", (1.0, 0.5, 0.25), str(assets))
    assert "face-landmark" in loss.name
    img = torch.from_numpy(cv2.resize(astronaut, (128, 128))).permute(2, 0, 1)[None].float() / 255
    blurred = torch.nn.functional.avg_pool2d(img, 5, 1, 2)
    assert loss(img, img).item() == 0.0
    # features add to the pixel terms: a blur costs more than under the pixel substitute alone
    assert loss(blurred, img).item() > loss.pixel(blurred, img).item() > 0
    pred = blurred.clone().requires_grad_(True)
    loss(pred, img).backward()
    assert pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.net.parameters())  # the landmark net only measures
