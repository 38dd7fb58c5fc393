"""bench.hot_path: a user's frame through the engine the server builds, every host step included. Its
figures come from runs on a quiet machine (docs/benchmarks.md); these tests check what it runs and reports."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import make_model

from bench.hot_path import main, moved_photo, run
from dagan.checkpoint import save_checkpoint
from dagan.config import config_from_dict, load_config, set_dotted, to_plain


@pytest.fixture
def nodding_checkpoint(tmp_path):
    cfg = config_from_dict(set_dotted(to_plain(load_config("tiny")), {"nod.gain": 2.0}))
    path = tmp_path / "nod.safetensors"
    save_checkpoint(path, cfg, make_model(cfg), extra_metadata={"trained": "false"})
    return path


def test_the_moved_photo_turns_and_moves_a_face():
    crop = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    frames = moved_photo(crop, 30)
    assert len(frames) == 30 and all(f.shape == crop.shape for f in frames)
    assert np.array_equal(frames[0], crop)  # no turn and no shift at t = 0
    assert np.abs(frames[12].astype(int) - crop).mean() > 5  # a quarter period on: turned and moved


def test_it_times_every_frame_with_the_nod_and_the_keypoint_filter(nodding_checkpoint, astronaut):
    r = run(str(nodding_checkpoint), frames=3, warmup=1)
    assert r["frame"]["frames"] == 3 and r["frame"]["median_ms"] > 0
    assert r["host_steps"] == ["nod (face mesh)", "keypoint filter"]  # the tiny preset: no lids, no mouth
    assert r["engine"].startswith("torch fp32")  # untrained weights: no export is prepared for them
    assert r["upload_ms"] > 0 and r["driver"] == "the photo, moved"


def test_the_command_prints_and_writes_its_report(nodding_checkpoint, tmp_path, capsys, astronaut):
    out, table = tmp_path / "r.json", tmp_path / "r.md"
    args = ["--checkpoint", str(nodding_checkpoint), "--frames", "2", "--warmup", "0"]
    assert main([*args, "--json", str(out), "--markdown", str(table)]) == 0
    printed = capsys.readouterr().out
    assert "a frame at batch 1, every host step: p50" in printed and "nod (face mesh)" in printed
    assert json.loads(out.read_text())["frame"]["frames"] == 2
    assert "| scikit-image astronaut, the photo, moved |" in table.read_text()


def test_a_clip_without_a_face_and_a_missing_file_are_clear_errors(nodding_checkpoint, tmp_path):
    from dagan.media import write_video

    blank = tmp_path / "blank.mp4"
    write_video(blank, [np.full((96, 96, 3), 128, np.uint8)] * 4, fps=25)
    with pytest.raises(SystemExit, match="no face found in any frame"):
        main(["--checkpoint", str(nodding_checkpoint), "--clip", str(blank), "--frames", "1"])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(nodding_checkpoint), "--photo", str(tmp_path / "none.jpg")])
    faceless = tmp_path / "grey.png"
    cv2.imwrite(str(faceless), np.full((96, 96, 3), 128, np.uint8))
    with pytest.raises(SystemExit, match=r"bench\.hot_path: .*face"):
        main(["--checkpoint", str(nodding_checkpoint), "--photo", str(faceless), "--frames", "1"])
