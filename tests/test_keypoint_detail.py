"""The keypoint detector's full-resolution detail branch (``keypoints.detail_channels``) and
scripts/fit_detail.py, which widens a trained detector with it and trains the detector alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dagan.checkpoint import read_checkpoint, save_checkpoint
from dagan.config import ConfigError, load_config
from dagan.model import DaGAN

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def _model(config, seed: int = 0) -> DaGAN:
    torch.manual_seed(seed)
    return DaGAN(config).eval()


def test_detail_channels_are_validated():
    tiny = load_config("tiny")
    with pytest.raises(ConfigError, match=r"keypoints\.detail_channels: must be >= 0"):
        tiny.replace(**{"keypoints.detail_channels": -1})
    # 1/scale_factor = 3 does not tile a 64-px image
    with pytest.raises(ConfigError, match=r"keypoints\.detail_channels: needs image_size divisible"):
        tiny.replace(**{"keypoints.detail_channels": 4, "keypoints.scale_factor": 1 / 3})
    assert tiny.keypoints.detail_channels == 0 and load_config("vox-256").keypoints.detail_channels == 0


def test_detail_branch_feeds_the_hourglass_full_resolution_blocks():
    """E more hourglass input channels at its resolution; they change the keypoints once their weights
    are not zero, and pixels the blurred subsample barely sees reach them."""
    cfg = load_config("tiny").replace(**{"keypoints.detail_channels": 4})
    det = _model(cfg).kp_detector
    step = round(1 / cfg.keypoints.scale_factor)
    assert det.detail.in_channels == 4 * step**2 and det.detail.out_channels == 4
    assert det.predictor.encoder.down_blocks[0].conv.in_channels == 4 + 4
    x = torch.rand(2, 4, 64, 64)
    x2 = x.clone()
    x2[:, :, 1::step, 1::step] += 0.5  # only pixels between the subsample positions
    with torch.no_grad():
        blur_gap = (det.down(x2) - det.down(x)).abs().mean() / 0.5
        detail_gap = (det.detail(torch.nn.functional.pixel_unshuffle(x2 - x, step))).abs().mean()
        moved = (det(x2).value - det(x).value).abs().max()
    assert detail_gap > 0 and moved > 0
    assert blur_gap < 0.5  # the blurred input sees a fraction of the change


def test_widen_keeps_the_keypoints_exactly_and_every_other_tensor():
    from fit_detail import widen

    tiny = load_config("tiny")
    model = _model(tiny)
    state = model.state_dict()
    wide_cfg, wide = widen(tiny, state, 6)
    assert wide_cfg.keypoints.detail_channels == 6
    widened = _model(wide_cfg, seed=1)
    widened.load_state_dict(wide)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        depth = model.estimate_depth(x)
        a, b = model.detect_keypoints(x, depth), widened.detect_keypoints(x, depth)
    torch.testing.assert_close(b.value, a.value, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.jacobian, a.jacobian, rtol=0, atol=1e-6)
    grown = {k for k, v in wide.items() if k in state and v.shape != state[k].shape}
    assert grown == {
        "kp_detector.predictor.encoder.down_blocks.0.conv.weight",
        "kp_detector.kp.weight",
        "kp_detector.jacobian.weight",
    }
    for k, v in state.items():
        if k not in grown:
            assert torch.equal(wide[k], v), k
    with pytest.raises(SystemExit, match="already have a detail branch"):
        widen(wide_cfg, wide, 2)


def test_fit_detail_writes_a_loadable_widened_checkpoint(tmp_path):
    """Three steps on generated clips with made-up face-mesh tracks: the output loads with its detail
    branch, says what was done, its detector moved and its generator is the input's."""
    import cv2
    import numpy as np
    from fit_detail import fit_detail

    from dagan.checkpoint import load_model
    from dagan.samples import astronaut, driving_frames, grace_hopper

    for name, photo in (("a", astronaut()), ("b", grace_hopper())):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i, frame in enumerate(driving_frames(photo, 6, size=64)):
            cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        tracks = np.random.default_rng(len(name)).uniform(10, 54, (6, 478, 2)).astype(np.float32)
        np.save(folder / "landmarks478.npy", tracks)
    teacher = _model(load_config("tiny"))
    save_checkpoint(tmp_path / "t.safetensors", teacher.config, teacher, {"trained": "true"})
    out = tmp_path / "d.safetensors"
    lines: list[str] = []
    fit_detail(
        tmp_path / "t.safetensors", tmp_path / "data", out, ROOT / "training" / "recipes" / "live-128.yaml",
        channels=4, steps=3, batch=2, log=lines.append,
    )  # fmt: skip
    cfg, tensors, meta = read_checkpoint(out)
    assert cfg.keypoints.detail_channels == 4 and "kp_detector.detail.weight" in tensors
    assert "4 full-resolution detail channels" in meta["detail"] and meta["trained"] == "true"
    assert lines and lines[-1].startswith("step 3/3")
    for k, v in teacher.state_dict().items():
        if k.startswith("generator."):
            assert torch.equal(tensors[k], v), k
    old = teacher.state_dict()["kp_detector.kp.weight"]
    assert not torch.equal(tensors["kp_detector.kp.weight"][:, : old.shape[1]], old)
    load_model(out)  # the file is a complete model


def test_detail_branch_exports_to_onnx_and_matches_torch(tmp_path):
    """The branch (pixel_unshuffle + 1×1 conv) runs in every backend's graphs: ONNX Runtime gives the
    PyTorch keypoints and frames, with the branch's weights non-zero so it counts."""
    pytest.importorskip("onnxruntime")
    from commands.cli import main
    from export.onnx_export import check_parity

    model = _model(load_config("tiny").replace(**{"keypoints.detail_channels": 4}))
    with torch.no_grad():
        model.kp_detector.predictor.encoder.down_blocks[0].conv.weight[:, 4:].normal_(0, 0.5)
        model.kp_detector.kp.weight[:, -4:].normal_(0, 0.5)
        model.generator.final.weight.mul_(10.0)
    ckpt = tmp_path / "detail.safetensors"
    save_checkpoint(ckpt, model.config, model)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]) == 0
    errors = check_parity(model, out, batch=2)
    assert errors and max(errors.values()) <= 1e-3, errors
