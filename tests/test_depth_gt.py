"""Depth-vs-ground-truth evaluation on a clip folder in the `dagan synth` layout made here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from helpers import make_model

from commands.cli import main
from dagan.checkpoint import save_checkpoint
from dagan.config import load_config
from evaluation.depth_gt import evaluate_depth, si_log_error


def test_si_log_error_is_scale_free():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1.0, 3.0, 500)
    assert si_log_error(gt * 7.5, gt) == pytest.approx(0.0, abs=1e-6)
    assert si_log_error(np.full_like(gt, 2.0), gt) == pytest.approx(np.log(gt).std(), rel=1e-9)
    assert si_log_error(gt[::-1].copy(), gt) > 0.1


def test_evaluate_depth_on_a_clip(tmp_path, capsys):
    clip = tmp_path / "test" / "face-c0"
    clip.mkdir(parents=True)
    rng = np.random.default_rng(1)
    depth = np.full((3, 64, 64), np.nan, np.float16)
    yy, xx = np.mgrid[:64, :64]
    bump = 600 + 40 * np.hypot(xx - 32, yy - 32) / 32
    for i in range(3):
        cv2.imwrite(str(clip / f"{i:06d}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        depth[i, 16:48, 16:48] = bump[16:48, 16:48]
    np.savez(clip / "gt.npz", depth=depth)
    ckpt = tmp_path / "m.safetensors"
    model = make_model(load_config("tiny"))
    save_checkpoint(ckpt, model.config, model)
    result = evaluate_depth(ckpt, tmp_path / "test", frame_stride=1)
    assert result["frames"] == 3 and result["clips"] == 1
    assert np.isfinite(result["si_log"]) and -1 <= result["spearman"] <= 1
    face = bump[16:48, 16:48]
    assert result["constant_si_log"] == pytest.approx(np.log(face).std(), rel=1e-2)
    assert main(["eval-depth", "--checkpoint", str(ckpt), "--data", str(tmp_path / "test")]) == 0
    assert "constant (baseline)" in capsys.readouterr().out
    assert main(["eval-depth", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nothing")]) == 2
