"""`dagan kp-follow`: keypoints scored against the face-mesh points the landmark prior anchors them to."""

from __future__ import annotations

import json

import numpy as np
import pytest

from commands.cli import main
from dagan.errors import UserError
from training.config import TrainConfig
from training.data import Video
from training.kp_follow import keypoint_follow, markdown
from training.landmarks import clip_folders
from training.pack import write_smoke_dataset

POINTS = list(TrainConfig().dagan.kp_landmark_points)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two drawn-face clips whose mouths open and eyes blink, with mesh tracks, at 64 px."""
    return write_smoke_dataset(tmp_path_factory.mktemp("kpf"), clips=2, frames=16, size=64)


def _replay(root, scale: float):
    """A keypoint function returning each clip's anchor tracks × ``scale`` (clips come in order)."""
    tracks = iter([Video(c).landmarks(POINTS) for c in clip_folders(root)])
    return lambda frames: scale * next(tracks)[: len(frames)]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_keypoints_on_their_anchors_follow_with_the_gain_they_move_by(smoke, scale):
    result = keypoint_follow(_replay(smoke, scale), smoke, POINTS, 64, frame_stride=1)
    assert result["frames"] == 32 and len(result["clips"]) == 2
    for name in ("mouth", "left eye", "right eye", "motion"):
        assert result["median"][name]["r"] == pytest.approx(1.0, abs=1e-3), name
        assert result["median"][name]["gain"] == pytest.approx(scale, abs=1e-3), name
    table = markdown(result)
    assert "| **median** |" in table and f"1.00 / {scale:.2f}" in table


def test_keypoints_that_stay_put_have_zero_gain(smoke):
    frozen = lambda frames: np.zeros((len(frames), len(POINTS), 2), np.float32)  # noqa: E731
    result = keypoint_follow(frozen, smoke, POINTS, 64, frame_stride=1)
    for name in ("mouth", "left eye", "right eye", "motion"):
        assert result["median"][name]["gain"] == 0.0, name


def _fetch_from_source(frames, pts):
    """A perfect warp: every driving point fetched from where it was in the first (source) frame, each
    carried by its own keypoint's mask channel."""
    return np.repeat(pts[:1], len(pts), axis=0), np.tile(np.arange(1, pts.shape[1] + 1), (len(pts), 1))


def _rigid(frames, pts):
    """A warp that fetches every point from where it is (no stretch), all carried by one channel."""
    return pts.copy(), np.zeros(pts.shape[:2], np.int64)


@pytest.mark.parametrize(("warp", "gain"), [(_fetch_from_source, 1.0), (_rigid, 0.0)])
def test_warp_gaps_say_whether_the_flow_opens_the_mouth(smoke, warp, gain):
    result = keypoint_follow(_replay(smoke, 1.0), smoke, POINTS, 64, frame_stride=1, warp=warp)
    assert set(result["warp"]) == {"smoke0", "smoke1"}
    for name in ("mouth", "left eye", "right eye"):
        assert result["warp_median"][name]["gain"] == pytest.approx(gain, abs=1e-3), name
        assert result["warp_median"][name]["apart"] == gain, name  # one carrier for all: never apart
    if gain:
        assert result["warp_median"]["mouth"]["r"] == pytest.approx(1.0, abs=1e-3)
        assert result["carriers"]["13"] == {"kp 13": 1.0}  # the upper lip by the upper-lip keypoint
    else:
        assert result["carriers"]["13"] == {"background": 1.0}
    assert set(result["carriers"]) == {"13", "14", "159", "145", "386", "374"}
    table = markdown(result)
    assert "| clip (warp) |" in table and "- mesh point 14 is carried by" in table
    assert "warp" not in keypoint_follow(_replay(smoke, 1.0), smoke, POINTS, 64, frame_stride=1)


def test_command_scores_a_checkpoint_and_refuses_frames_of_another_size(smoke, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    assert main(["init-checkpoint", "--config", "tiny", "--out", str(ckpt)]) == 0
    out = tmp_path / "kpf.json"
    assert main(["kp-follow", "--checkpoint", str(ckpt), "--data", str(smoke), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["points"] == POINTS
    result = report["checkpoints"][str(ckpt)]
    assert result["frames"] == 16 and set(result["clips"]) == {"smoke0", "smoke1"}
    assert {"mouth", "motion"} <= set(result["median"])
    assert set(result["warp"]) == {"smoke0", "smoke1"}  # the command scores the generator's warp too
    assert all(0 <= v["apart"] <= 1 for v in result["warp_median"].values())
    assert all(sum(shares.values()) == pytest.approx(1.0, abs=0.01) for shares in result["carriers"].values())

    with pytest.raises(UserError, match="15 keypoints; 3 anchor points"):
        keypoint_follow(_replay(smoke, 1.0), smoke, POINTS[:3], 64)

    bigger = write_smoke_dataset(tmp_path / "big", clips=1, frames=4, size=96)
    with pytest.raises(UserError, match="model takes 64 px"):
        keypoint_follow(lambda f: f, bigger, POINTS, 64)


def test_data_without_tracks_is_a_clear_error(tmp_path):
    (tmp_path / "test" / "c0").mkdir(parents=True)
    with pytest.raises(UserError, match="dagan landmarks"):
        keypoint_follow(lambda f: f, tmp_path, POINTS, 64)
    with pytest.raises(UserError, match="frame-stride"):
        keypoint_follow(lambda f: f, tmp_path, POINTS, 64, frame_stride=0)
