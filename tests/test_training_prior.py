"""The keypoint landmark prior and the face-feature perceptual loss used to train the bundled live-128."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dagan.config import ConfigError
from training.config import TrainConfig, load_train_config
from training.data import LANDMARKS_FILE, SourceDrivingDataset
from training.landmarks import MESH_POINTS, annotate_clip
from training.losses import (
    chroma_range_loss,
    keypoint_distance_loss,
    landmark_flow_loss,
    landmark_mask_loss,
    landmark_motion_loss,
    landmark_prior_loss,
    landmark_region_mask,
    region_l1_loss,
)
from training.perceptual import build_perceptual_loss

POINTS = TrainConfig().dagan.kp_landmark_points  # the default anchors: eyelids, nose, mouth, jaw, brows


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
    mesh = np.load(clip / LANDMARKS_FILE)
    assert mesh.shape == (2, MESH_POINTS, 2) and mesh.dtype == np.float16
    assert np.isfinite(mesh[0]).all() and np.isnan(mesh[1]).all()
    marks = mesh[:, list(POINTS)].astype(np.float32)
    assert "source_landmarks" not in SourceDrivingDataset(tmp_path / "data", "train", 128)[0]
    ds = SourceDrivingDataset(tmp_path / "data", "train", 128, landmark_points=POINTS)
    item = ds[0]
    got = {0: None, 1: None}
    # the two frames are source/driving in some order: the one with a face has the pixel track mapped
    # to [-1, 1] with pixel centres at ±1 (x = 2 (px − 0.5) / (W − 1) − 1)
    for key in ("source_landmarks", "driving_landmarks"):
        v = item[key].numpy()
        got[int(np.isnan(v).all())] = v
    expected = 2.0 * (marks[0] - 0.5) / 127.0 - 1.0
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    # the tracks are the face's, not noise: upper lids above lower lids, eyes above the mouth, the two
    # eyes on either side of the nose tip, the upper lip above the lower
    assert expected[0, 1] < expected[1, 1] and expected[2, 1] < expected[3, 1]
    assert expected[1, 1] < expected[5, 1] and expected[0, 0] < expected[4, 0] < expected[2, 0]
    assert expected[7, 1] <= expected[8, 1]


def test_clips_without_tracks_share_a_batch_as_nan(tmp_path, astronaut):
    import cv2

    face = cv2.resize(astronaut, (64, 64), interpolation=cv2.INTER_AREA)
    _clip(tmp_path, [face, face])  # no landmarks478.npy
    item = SourceDrivingDataset(tmp_path / "data", "train", 64, landmark_points=POINTS)[0]
    assert item["source_landmarks"].shape == (len(POINTS), 2)
    assert torch.isnan(item["driving_landmarks"]).all()


def test_a_track_file_of_another_shape_is_refused(tmp_path, astronaut):
    import cv2

    from training.data import DatasetError

    clip = _clip(tmp_path, [cv2.resize(astronaut, (64, 64))] * 2)
    np.save(clip / LANDMARKS_FILE, np.zeros((2, 15, 2), np.float16))  # an old 15-point file
    ds = SourceDrivingDataset(tmp_path / "data", "train", 64, landmark_points=POINTS)
    with pytest.raises(DatasetError, match="mesh point"):
        ds[0]
    np.save(clip / LANDMARKS_FILE, np.zeros((3, MESH_POINTS, 2), np.float16))  # a row per frame needed
    with pytest.raises(DatasetError, match="expected 2"):
        SourceDrivingDataset(tmp_path / "data", "train", 64, landmark_points=POINTS)[0]


def test_motion_prior_charges_displacements_not_offsets():
    lm_s = torch.rand(2, 4, 2) * 2 - 1
    lm_d = lm_s + 0.1 * torch.randn(2, 4, 2)
    offset = torch.tensor([0.3, -0.2])
    # keypoints a constant offset away from their landmarks in both frames: motion is exact, cost 0
    zero = landmark_motion_loss(lm_s + offset, lm_d + offset, lm_s, lm_d)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    assert landmark_prior_loss(lm_s + offset, lm_s).item() > 0.2  # the position prior does see it
    # a keypoint that does not move while its landmark (a lip) does: charged, more with a focus weight
    still = landmark_motion_loss(lm_s, lm_s, lm_s, lm_d)
    assert still.item() == pytest.approx((lm_d - lm_s).abs().mean().item(), rel=1e-5)
    w = torch.tensor([4.0, 1.0, 1.0, 1.0])
    kp_d = lm_d.clone()
    kp_d[:, 0] = lm_s[:, 0]  # only point 0 misses its motion
    plain = landmark_motion_loss(lm_s, kp_d, lm_s, lm_d)
    weighted = landmark_motion_loss(lm_s, kp_d, lm_s, lm_d, w)
    assert weighted.item() > plain.item() > 0
    # frames without a face are skipped
    nan = torch.full_like(lm_d, float("nan"))
    assert landmark_motion_loss(lm_s, kp_d, lm_s, nan).item() == 0.0


def test_flow_loss_asks_the_warp_to_fetch_each_landmark_from_its_source_position():
    from dagan.nets.blocks import make_coordinate_grid

    shift = torch.tensor([0.1, -0.05])
    # a rigid backward flow: every output pixel z is fetched from z + shift
    flow = (make_coordinate_grid(32, 32) + shift).expand(2, 32, 32, 2).clone().requires_grad_(True)
    lm_d = torch.tensor([[[0.0, 0.4], [0.0, 0.5], [-0.3, -0.2]]]).expand(2, 3, 2)  # two lips, an eye
    lm_s = lm_d + shift  # the head moved rigidly: the flow is exact, at any grid position
    assert landmark_flow_loss(flow, lm_s, lm_d).item() == pytest.approx(0.0, abs=1e-5)
    # the mouth opened in the driving frame (lower lip 0.1 lower): a rigid flow fetches the lower lip
    # from under the source's lip, 0.1 off in y for one of the three points
    opened = lm_d.clone()
    opened[:, 1, 1] += 0.1
    miss = landmark_flow_loss(flow, lm_s, opened)
    assert miss.item() == pytest.approx(0.1 / 6, rel=1e-3)
    weighted = landmark_flow_loss(flow, lm_s, opened, torch.tensor([4.0, 4.0, 1.0]))
    assert weighted.item() == pytest.approx(4 * 0.1 / 18, rel=1e-3)  # the lips count 4 times
    miss.backward()
    assert flow.grad.abs().sum() > 0  # the flow (the motion masks behind it) is what it trains
    # frames without a face are skipped
    nan = torch.full_like(lm_d, float("nan"))
    assert landmark_flow_loss(flow, lm_s, nan).item() == 0.0


def test_mask_loss_asks_each_focus_landmark_to_take_its_own_keypoints_motion():
    h = w = 9
    lm = torch.tensor([[[-0.5, 0.0], [0.5, 0.0], [0.0, 0.75]]])  # anchors of keypoints 0, 1, 2
    big = 30.0  # logits: a softmax of all but one-hot
    own = torch.zeros(1, 4, h, w)  # channel 0 the background, channel k + 1 keypoint k
    own[:, 1, :, : w // 2] = big  # keypoint 0 carries the left half, keypoint 1 the right
    own[:, 2, :, w // 2 :] = big
    own[:, :, 6:] = 0.0
    own[:, 3, 6:] = big  # keypoint 2 the bottom rows
    assert landmark_mask_loss(own, lm, [0, 1, 2]).item() == pytest.approx(0.0, abs=1e-5)
    swapped = own[:, [0, 2, 1, 3]]  # the two keypoints carry each other's half
    assert landmark_mask_loss(swapped, lm, [0, 1]).item() == pytest.approx(big, rel=1e-3)
    # only the given points count: the background taking point 2's rows costs 0 for points 0 and 1
    lower = own.clone()
    lower[:, :, 6:] = 0.0
    lower[:, 0, 6:] = big
    assert landmark_mask_loss(lower, lm, [0, 1]).item() == pytest.approx(0.0, abs=1e-5)
    assert landmark_mask_loss(lower, lm, [0, 1, 2]).item() == pytest.approx(big / 3, rel=1e-3)
    # a channel the softmax has all but switched off still gets a full gradient (why logits, not the mask)
    dead = swapped.clone().requires_grad_(True)
    landmark_mask_loss(dead, lm, [0]).backward()
    assert dead.grad[0, 1].sum().item() < -0.5  # raise keypoint 0's logit where its landmark is
    even = torch.zeros(1, 4, h, w)
    assert landmark_mask_loss(even, lm, [0, 1, 2]).item() == pytest.approx(np.log(4.0), rel=1e-5)
    nan = lm.clone()
    nan[0, 0] = float("nan")  # no face for point 0: only point 1 counts
    assert landmark_mask_loss(swapped, nan, [0, 1]).item() == pytest.approx(big, rel=1e-3)
    assert landmark_mask_loss(own, torch.full_like(lm, float("nan")), [0, 1]).item() == 0.0


def test_distance_loss_exempts_only_the_given_pairs():
    kp = torch.tensor([[[0.0, 0.0], [0.0, 0.05], [0.9, 0.9]]], requires_grad=True)  # lips 0 and 1 close
    full, eq13 = keypoint_distance_loss(kp, 0.2)
    exempt = torch.zeros(1, 3, 3, dtype=torch.bool)
    exempt[0, 0, 1] = exempt[0, 1, 0] = True
    kept, eq13_kept = keypoint_distance_loss(kp, 0.2, exempt)
    assert full.item() > 0 and kept.item() == pytest.approx(0.0)
    assert eq13_kept.item() == eq13.item()  # eq. 13 itself is logged unchanged
    # without an exemption the result is the paper's hinge mean over all ordered pairs
    assert full.item() == pytest.approx(2 * 2 * (1 - 0.05 / 0.2) / 6)


def test_region_loss_looks_at_the_mouth():
    mark = torch.tensor([[[0.0, 0.5]]])  # one focus point, below the centre
    mask = landmark_region_mask(mark, (32, 32), 0.1)
    assert mask.shape == (1, 1, 32, 32) and mask.max() <= 1.0
    y, x = np.unravel_index(int(mask.flatten().argmax()), (32, 32))
    assert abs(y - 23.5) <= 1 and abs(x - 15.5) <= 1
    target = torch.zeros(1, 3, 32, 32)
    far = target.clone()
    far[..., :8, :] = 1.0  # wrong only at the top, far from the point
    near = target.clone()
    near[..., 20:27, 12:20] = 1.0  # wrong at the point
    assert region_l1_loss(near, target, mask) > 10 * region_l1_loss(far, target, mask)
    empty = landmark_region_mask(torch.full((1, 1, 2), float("nan")), (8, 8), 0.1)
    assert empty.sum() == 0 and region_l1_loss(near[..., :8, :8], target[..., :8, :8], empty) == 0


def test_chroma_range_charges_colours_the_photo_does_not_have_near_the_mouth():
    """dagan.weights.cross_chroma: a magenta or hot-pink mouth costs; a dark mouth, white teeth and the
    photo's own lip red do not; a photo that is magenta there itself lets magenta through; the gradient
    takes the blue and the red out of a magenta mouth."""
    photo = torch.tensor([0.80, 0.60, 0.50]).view(1, 3, 1, 1).expand(1, 3, 64, 64).clone()  # skin
    photo[..., 40:43, 26:38] = torch.tensor([0.75, 0.25, 0.25]).view(1, 3, 1, 1)  # red lips

    def mouth(rgb: tuple[float, float, float], base: torch.Tensor = photo) -> torch.Tensor:
        image = base.clone()
        image[..., 40:46, 28:36] = torch.tensor(rgb).view(1, 3, 1, 1)  # the mouth opens below the lip
        return image

    assert chroma_range_loss(photo, photo) == 0
    for natural in [(0.08, 0.04, 0.04), (0.9, 0.9, 0.9), (0.75, 0.25, 0.25)]:  # dark, teeth, lip red
        assert chroma_range_loss(mouth(natural), photo) == 0
    assert chroma_range_loss(mouth((0.9, 0.2, 0.45)), photo) > 1e-4  # hot pink: Cr beyond the lips'
    magenta = mouth((0.70, 0.20, 0.60)).requires_grad_(True)
    cost = chroma_range_loss(magenta, photo)
    assert cost > 1e-4
    cost.backward()
    assert magenta.grad[0, 2, 44, 32] > 0 and magenta.grad[0, 1, 44, 32] < 0  # less blue, more green
    assert magenta.grad[0, 0, 5, 5] == 0  # the untouched skin far away has no say
    magenta_photo = mouth((0.70, 0.20, 0.60))  # the photo itself has that colour there
    assert chroma_range_loss(mouth((0.70, 0.20, 0.60)), magenta_photo) == 0


@pytest.mark.parametrize("term", ["kp_landmarks", "landmark_flow"])
def test_landmark_points_must_match_the_keypoints(term):
    with pytest.raises(ConfigError, match="kp_landmark_points"):
        load_train_config(
            None, {"model": "tiny", f"dagan.weights.{term}": 1.0, "dagan.kp_landmark_points": [1, 2, 3]}
        )
    with pytest.raises(ConfigError, match=r"0\.\.477"):
        load_train_config(
            None, {"model": "tiny", "dagan.weights.kp_landmarks": 1.0, "dagan.kp_landmark_points": [500] * 15}
        )
    # without the prior any list is fine (it is not used)
    load_train_config(None, {"model": "tiny", "dagan.kp_landmark_points": [1, 2, 3]})


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


def test_flow_points_reach_the_flow_loss_and_only_it(tmp_path, astronaut):
    """dagan.flow_points: the stage's dataset reads the anchors then those points, and the generator
    objective charges the warp at both while every other landmark term still sees the anchors alone."""
    from training.config import EXPRESSION_MESH_POINTS
    from training.distributed import DistInfo
    from training.stage_dagan import DaganStage, GeneratorObjective

    k = load_train_config(None, {"model": "tiny"}).model.keypoints.num_kp
    anchors = list(POINTS[:k])
    extra = [13, 14, 78, 308]
    cfg = load_train_config(
        None,
        {
            "model": "tiny",
            "data.workers": 0,
            "dagan.kp_landmark_points": anchors,
            "dagan.kp_landmark_focus": [0, 1],
            "dagan.flow_points": extra,
            "dagan.weights.landmark_flow": 1.0,
            "dagan.weights.kp_landmarks": 1.0,
            "dagan.weights.landmark_mask": 1.0,
        },
    )
    bad = {"model": "tiny", "dagan.weights.landmark_flow": 1.0, "dagan.kp_landmark_points": anchors}
    with pytest.raises(ConfigError, match=r"dagan\.flow_points"):
        load_train_config(None, {**bad, "dagan.flow_points": [478]})
    assert set(extra) <= set(EXPRESSION_MESH_POINTS)  # `dagan pack-data` keeps these by default
    # the recipe lists its points in YAML: they must stay among those a default pack keeps
    recipe_path = Path(__file__).resolve().parent.parent / "training" / "recipes" / "live-128.yaml"
    recipe = load_train_config(recipe_path).dagan
    assert recipe.flow_points and set(recipe.flow_points) <= set(EXPRESSION_MESH_POINTS)
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    _clip(tmp_path, [astronaut, astronaut])  # tmp_path/data/train/c0
    root = str(tmp_path / "data")
    assert stage.dataset(root).landmark_points == (*anchors, *extra)
    off = load_train_config(
        None,
        {
            "model": "tiny",
            "dagan.flow_points": extra,
            "dagan.weights.kp_landmarks": 1.0,
            "dagan.kp_landmark_points": anchors,
        },
    )
    assert DaganStage(off, torch.device("cpu"), DistInfo(), None).dataset(root).landmark_points == tuple(
        anchors
    )  # no flow term: the extra tracks are not read

    objective = GeneratorObjective(stage.model, stage.discriminator, stage.perceptual, cfg)
    torch.manual_seed(0)
    size = cfg.model.image_size
    source, driving = torch.rand(2, 3, size, size), torch.rand(2, 3, size, size)
    marks = torch.rand(2, 2, k + len(extra), 2) * 1.2 - 0.6  # (source, driving) × B × points × 2
    marks[0, :, k:] = 3.0  # the flow points' source positions, far outside what any warp reads

    with torch.no_grad():
        _, logs, _ = objective(source, driving, 0, (marks[0], marks[1]))
        kp_s, depth_s = objective._keypoints(source)
        kp_d, _ = objective._keypoints(driving)
        deformation = stage.model.generator(source, depth_s, kp_s, kp_d).deformation
    weights = torch.ones(k + len(extra))
    weights[[0, 1]] = cfg.dagan.kp_landmark_focus_weight
    both = landmark_flow_loss(deformation, marks[0], marks[1], weights).item()
    anchors_only = landmark_flow_loss(deformation, marks[0, :, :k], marks[1, :, :k], weights[:k]).item()
    assert logs["landmark_flow"] == pytest.approx(both, rel=1e-4)
    assert both > anchors_only + 0.3  # the flow points count
    # the keypoint prior still pairs keypoint j with anchor j: the flow points do not shift it
    prior = landmark_prior_loss(kp_s.value, marks[0, :, :k]) + landmark_prior_loss(
        kp_d.value, marks[1, :, :k]
    )
    assert logs["kp_landmarks"] == pytest.approx(prior.item(), rel=1e-5)
    # the mask term reads the mask logits of the generator's forward (kept by the hook): their softmax
    # is the generator's mask
    with torch.no_grad():
        out = stage.model.generator(source, depth_s, kp_s, kp_d)
    logits = objective._mask_logits
    assert torch.allclose(torch.softmax(logits, 1), out.mask, atol=1e-6)
    assert logs["landmark_mask"] == pytest.approx(
        landmark_mask_loss(logits, marks[1, :, :k], cfg.dagan.kp_landmark_focus).item(), rel=1e-5
    )
