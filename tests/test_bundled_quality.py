"""Regression guard for the bundled weights on a real talking-head clip they were never trained on.

``../shared/data/real-faces/clips/d20.mp4`` is one of the clips held out of the bundled model's training
(weights/README.md), so this is a person the model has not seen. The clip is cropped with the project's
own tracker exactly as ``dagan prepare`` does, then scored through the engine in both motion modes: the
avatar must be closer to the real frames than "output = the source photo" (L1), and mediapipe must find
a face in at least 90 % of the outputs. A model that blurs, breaks or stops moving fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("DAGAN_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
CLIP = SHARED / "data" / "real-faces" / "clips" / "d20.mp4"
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "dagan-default.safetensors"


@pytest.fixture(scope="module")
def held_out_clip(tmp_path_factory) -> Path:
    if not CLIP.is_file():
        pytest.skip(f"{CLIP} is not there (the real-face material lives in ../shared)")
    from dagan.checkpoint import read_checkpoint
    from training.prepare import prepare_dataset

    size = read_checkpoint(WEIGHTS)[0].image_size
    raw = tmp_path_factory.mktemp("raw")
    (raw / "test").mkdir()
    (raw / "test" / CLIP.name).symlink_to(CLIP)
    root = tmp_path_factory.mktemp("prepared")
    report = prepare_dataset(raw, root, size=size, progress=False)
    assert report.clips >= 1 and not report.broken
    return root / "test"


@pytest.mark.slow
def test_bundled_weights_beat_the_source_copy_on_a_held_out_real_clip(held_out_clip):
    from evaluation.evaluate import evaluate

    result = evaluate(
        WEIGHTS, held_out_clip, use_identity=False, frame_stride=4, mode="both", threads=2, progress=False
    )
    m = result["metrics"]
    assert result["frames"] >= 30
    for method in ("dagan", "dagan_relative"):
        assert m[method]["l1"] < m["source_copy"]["l1"], (method, m[method]["l1"], m["source_copy"]["l1"])
        assert m[method]["landmark_missing_rate"] <= 0.10, (method, m[method]["landmark_missing_rate"])
