"""The reshaped-pair training term (``dagan.weights.reshaped_pair``): a face of another shape driven by
this face's motion, scored against the same warp of the driving frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dagan.config import ConfigError
from dagan.head_pose import _OBJECT_POINTS, POSE_POINTS, euler_angles
from dagan.nod import nod_keypoints
from training.config import load_train_config
from training.distributed import DistInfo
from training.stage_dagan import DaganStage, GeneratorObjective, head_pitches


def _objective(**overrides: object) -> tuple[GeneratorObjective, int]:
    cfg = load_train_config(
        None,
        {
            "model": "tiny",
            "data.workers": 0,
            "dagan.weights.gan": 0.0,
            "dagan.weights.feature_matching": 0.0,
            "dagan.weights.reshaped_pair": 2.0,
            **overrides,
        },
    )
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    objective = GeneratorObjective(stage.model, stage.discriminator, stage.perceptual, cfg)
    return objective.eval(), cfg.model.image_size


def _frames(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # smooth images, so a warp of a few pixels changes them by a little, not by everything
    low = torch.rand(2, 2, 3, 8, 8)
    source, driving = (torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear") for x in low)
    return source, driving


def test_without_a_warp_the_reshaped_pair_is_the_frame_itself():
    """T = identity: T(source) is the source, its keypoints are the source's, the movement scale is 1
    and the relative transfer hands the generator the driving keypoints, so the term is the perceptual
    loss of the plain prediction, times its own weight."""
    objective, size = _objective(**{"dagan.reshape.sigma_affine": 0.0, "dagan.reshape.sigma_tps": 0.0})
    source, driving = _frames(size)
    with torch.no_grad():
        _, logs, _ = objective(source, driving, 3)
    per_weight = logs["perceptual"] / objective.cfg.weights.perceptual
    assert logs["reshaped_pair"] == pytest.approx(2.0 * per_weight, rel=1e-4)


def test_a_warp_changes_the_pair_and_the_seed_picks_the_warp():
    objective, size = _objective()
    source, driving = _frames(size)
    with torch.no_grad():
        _, a, _ = objective(source, driving, 3)
        _, b, _ = objective(source, driving, 3)
        _, c, _ = objective(source, driving, 4)
    plain = 2.0 * a["perceptual"] / objective.cfg.weights.perceptual
    assert a["reshaped_pair"] == b["reshaped_pair"]  # reproducible on resume
    assert a["reshaped_pair"] != pytest.approx(plain, rel=1e-3)  # another face shape, another avatar
    assert c["reshaped_pair"] != a["reshaped_pair"]


def test_the_term_trains_the_generator():
    objective, size = _objective(**{"dagan.weights.perceptual": 0.0})
    source, driving = _frames(size)
    loss, logs, _ = objective(source, driving, 3)
    assert set(logs) >= {"reshaped_pair"} and logs["perceptual"] == 0.0
    loss.backward()
    grads = [p.grad for p in objective.model.generator.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_the_warp_is_checked():
    with pytest.raises(ConfigError, match=r"dagan\.reshape"):
        load_train_config(None, {"model": "tiny", "dagan.reshape.sigma_affine": -0.1})
    with pytest.raises(ConfigError, match=r"dagan\.reshape\.points_tps"):
        load_train_config(None, {"model": "tiny", "dagan.reshape.points_tps": 1})


def test_the_frame_edge_a_warp_mirrors_is_not_charged():
    """RandomTransform.inside: a shift by half the frame's width shows the mirror on a quarter of it;
    there the reshaped pair replaces the avatar by the target, so no loss comes from it."""
    from training.losses import RandomTransform

    shift = RandomTransform(1, 0.0, 0.0)
    shift.affine[0, 0, 2] = 0.5  # I_T(x, y) = I(x + 0.5, y): x > 0.5 reads past the right edge
    inside = shift.inside(8, 9)
    assert inside.shape == (1, 1, 8, 9)
    assert inside[0, 0, :, :7].eq(1).all() and inside[0, 0, :, 7:].eq(0).all()  # x = 0.75 and 1.0 leave
    assert RandomTransform(2, 0.0, 0.0).inside(5, 5).eq(1).all()  # no warp: the frame itself, corners too


# ------------------------------------------------------------------------- the nod in the pair


def _pose_tracks(pitches: list[float], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """B×9×2 tracks of dagan.head_pose.POSE_POINTS in the keypoints' [−1, 1] frame (training.data's
    mapping of pixel centres) of the canonical face pitched by each angle (degrees, about the camera's
    x axis) and seen by the head-pose camera from 45 units away; and the rotations (B×3×3)."""
    cam = np.array([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
    tracks, rots = [], []
    for p in np.radians(pitches):
        rot = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
        pts, _ = cv2.projectPoints(
            _OBJECT_POINTS, cv2.Rodrigues(rot)[0], np.array([0.0, 0.0, 45.0]), cam, None
        )
        tracks.append(2.0 * (pts.reshape(-1, 2) - 0.5) / (size - 1) - 1.0)
        rots.append(rot)
    return torch.tensor(np.stack(tracks), dtype=torch.float32), np.stack(rots)


def test_head_pitches_reads_the_nod_between_two_frames():
    size = 128
    source, r_s = _pose_tracks([0.0, 5.0, 0.0], size)
    driving, r_d = _pose_tracks([12.0, -3.0, 45.0], size)
    driving[2, 4] = float("nan")  # a frame without a face: no nod
    got = head_pitches(source, driving, (size, size), 30.0)
    want = [euler_angles(a.T @ b)[0] for a, b in zip(r_s, r_d, strict=True)]
    assert got[0] == pytest.approx(want[0], abs=0.5) and abs(want[0]) == pytest.approx(12.0, abs=0.01)
    assert got[1] == pytest.approx(want[1], abs=0.5) and abs(want[1]) == pytest.approx(8.0, abs=0.01)
    assert got[2] == 0.0
    unclipped = head_pitches(_pose_tracks([0.0], size)[0], _pose_tracks([45.0], size)[0], (size, size), 30.0)
    assert abs(float(unclipped[0])) == pytest.approx(30.0)  # clipped as the engine clips a driver


def _nod_objective(gain: float) -> tuple[GeneratorObjective, int]:
    return _objective(
        **{
            "dagan.reshape.sigma_affine": 0.0,
            "dagan.reshape.sigma_tps": 0.0,
            "dagan.reshape_nod": gain,
            "data.augment.flip": False,
        }
    )


def test_the_nod_moves_the_reshaped_pair_only_where_the_head_pitched():
    """The pose tracks come last in an item's landmarks; with no other term reading tracks they are all
    there is. Equal poses: no nod, the same term as without the option. A nod: T(source)'s keypoints
    are nodded as the engine nods a photo (dagan.nod.nod_keypoints, the read pitch, the option's gain)."""
    objective, size = _nod_objective(2.0)
    plain, _ = _nod_objective(0.0)
    plain.load_state_dict(objective.state_dict())
    source, driving = _frames(size)
    still, _ = _pose_tracks([0.0, 0.0], size)
    nod, _ = _pose_tracks([10.0, -10.0], size)
    calls: list[tuple] = []
    generator = objective.model.generator
    forward = generator.forward
    generator.forward = lambda *args: calls.append(args) or forward(*args)
    with torch.no_grad():
        _, off, _ = plain(source, driving, 3)
        _, same, _ = objective(source, driving, 3, (still, still))
        _, nodded, _ = objective(source, driving, 3, (still, nod))
    assert same["reshaped_pair"] == pytest.approx(off["reshaped_pair"], rel=1e-6)
    assert nodded["perceptual"] == pytest.approx(off["perceptual"], rel=1e-6)  # only the pair is nodded
    (_, _, kp_t, moved_still), (_, _, _, moved_nod) = calls[1], calls[3]  # each forward: frame, then pair
    pitch = head_pitches(still, nod, (size, size), objective.model.config.nod.max_degrees)
    assert pitch.abs().min() > 9.0
    want = nod_keypoints(kp_t, moved_still, pitch, 2.0)
    assert torch.allclose(moved_nod.value, want.value, atol=1e-6)
    assert torch.allclose(moved_nod.jacobian, want.jacobian, atol=1e-6)
    assert (moved_nod.value - moved_still.value).abs().max() > 0.01


def test_the_nod_asks_for_the_pose_tracks_last(monkeypatch):
    cfg = load_train_config(
        None,
        {
            "model": "tiny",
            "data.workers": 0,
            "data.augment.flip": False,
            "dagan.weights.reshaped_pair": 2.0,
            "dagan.reshape_nod": 2.0,
        },
    )
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    seen: dict = {}
    monkeypatch.setattr(stage, "_video_dataset", lambda cls, root, **extra: seen.update(extra))
    stage.dataset("unused")
    points = tuple(seen["landmark_points"])
    assert points[-len(POSE_POINTS) :] == POSE_POINTS
    assert points[: -len(POSE_POINTS)] == (
        cfg.dagan.kp_landmark_points if cfg.dagan.weights.reads_landmarks else ()
    )


def test_the_nod_option_is_checked():
    base = {"model": "tiny", "data.augment.flip": False}
    with pytest.raises(ConfigError, match=r"dagan\.reshape_nod.*reshaped_pair"):
        load_train_config(None, {**base, "dagan.reshape_nod": 2.0})
    with pytest.raises(ConfigError, match=r"dagan\.reshape_nod.*flip"):
        load_train_config(
            None,
            {**base, "data.augment.flip": True, "dagan.weights.reshaped_pair": 1.0, "dagan.reshape_nod": 2.0},
        )
    with pytest.raises(ConfigError, match=r"dagan\.reshape_nod"):
        load_train_config(None, {**base, "dagan.reshape_nod": -1.0})
