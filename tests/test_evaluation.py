"""Evaluation metrics on inputs with known answers, and ``dagan eval`` end to end on a tiny test set."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from evaluation import metrics as M


@pytest.fixture(scope="module")
def face_crop():
    from dagan.face import crop_source
    from dagan.samples import astronaut

    crop, _ = crop_source(astronaut(), 256)
    return crop


@pytest.fixture(scope="module")
def face_landmarks_of(face_crop):
    from dagan.face import face_landmarks

    return face_landmarks(face_crop)


def test_pixel_metrics_known_values():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert M.psnr(img, img) == M.PSNR_CAP_DB
    assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-9)
    assert M.l1(img, img) == 0.0
    a = np.full((32, 32, 3), 0.25)
    b = np.full((32, 32, 3), 0.75)
    assert M.l1(a, b) == pytest.approx(0.5)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.25))  # MSE 0.25 -> 6.02 dB
    noisy = np.clip(img.astype(np.float64) / 255 + rng.normal(0, 0.1, img.shape), 0, 1)
    from skimage.metrics import structural_similarity

    reference = structural_similarity(
        noisy, img / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=2,
    )  # fmt: skip
    assert M.ssim(noisy, img) == pytest.approx(reference, abs=1e-6) and M.ssim(noisy, img) < 0.99
    assert M.psnr(noisy, img) == pytest.approx(20.0, abs=1.0)  # σ = 0.1 -> ~20 dB (a little less clipped)
    with pytest.raises(ValueError, match="same shape"):
        M.l1(img, img[:10])


def test_akd_of_shifted_face_is_the_shift(face_crop, face_landmarks_of):
    from dagan.face import face_landmarks

    assert M.akd(face_landmarks_of, face_landmarks_of) == 0.0
    shifted = cv2.warpAffine(
        face_crop, np.float32([[1, 0, 3], [0, 1, 4]]), (256, 256), borderMode=cv2.BORDER_REPLICATE
    )
    assert M.akd(face_landmarks(shifted), face_landmarks_of) == pytest.approx(5.0, abs=1.0)


def test_head_pose_roll_follows_image_rotation(face_crop, face_landmarks_of):
    from dagan.face import face_landmarks

    pose = M.head_pose(face_landmarks_of, face_crop.shape[:2])
    assert np.abs(M.angle_difference(pose, pose)).max() == 0.0
    assert abs(pose[1]) < 10 and abs(pose[2]) < 10  # a roughly frontal, upright portrait
    rotated = cv2.warpAffine(
        face_crop, cv2.getRotationMatrix2D((128, 128), -15, 1.0), (256, 256), borderMode=cv2.BORDER_REFLECT101
    )
    diff = M.angle_difference(M.head_pose(face_landmarks(rotated), (256, 256)), pose)
    assert abs(diff[2]) == pytest.approx(15.0, abs=3.0)  # roll
    prmse = math.sqrt(np.mean(diff**2))
    assert prmse > 5.0


def test_expression_features_see_an_open_mouth(face_landmarks_of):
    feats = M.expression_features(face_landmarks_of)
    assert feats.shape == (len(M.EXPRESSION_FEATURES),) and np.isfinite(feats).all()
    opened = face_landmarks_of.copy()
    opened[14, 1] += 20  # lower inner lip moves down 20 px
    assert M.expression_features(opened)[0] > feats[0] + 0.1
    np.testing.assert_allclose(M.expression_features(opened)[1:], feats[1:])
    # Scale-free: the same face twice as large gives the same features.
    np.testing.assert_allclose(M.expression_features(face_landmarks_of * 2), feats, rtol=1e-9)


@pytest.fixture(scope="module")
def tiny_eval_set(tmp_path_factory, face_crop):
    from helpers import make_model

    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config
    from dagan.media import write_video
    from dagan.samples import driving_frames, grace_hopper

    root = tmp_path_factory.mktemp("evalset")
    test = root / "test"
    cfg = load_config("tiny")
    ckpt = root / "tiny.safetensors"
    save_checkpoint(ckpt, cfg, make_model(cfg))
    clip = test / "astronaut"
    clip.mkdir(parents=True)
    for i, frame in enumerate(driving_frames(face_crop, 4, size=cfg.image_size, amplitude=0.5)):
        cv2.imwrite(str(clip / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    from dagan.face import crop_source

    write_video(test / "grace.mp4", driving_frames(crop_source(grace_hopper(), 256)[0], 3, size=96), fps=25)
    return ckpt, test


def test_eval_returns_every_metric_without_identity_assets(tiny_eval_set, tmp_path, monkeypatch):
    from evaluation.evaluate import METHODS, METRIC_KEYS, evaluate, markdown_table, write_report

    monkeypatch.setenv("DAGAN_EVAL_ASSETS", str(tmp_path / "no-assets"))
    ckpt, test = tiny_eval_set
    result = evaluate(ckpt, test, progress=False)
    # 4 + 3 frames, minus each clip's first frame (the source, which is not scored)
    assert result["videos"] == 2 and result["frames"] == 5
    assert result["metrics"]["source_copy"]["psnr"] < 100  # the source frame itself is not among them
    assert set(result["metrics"]) == set(METHODS)
    for method in METHODS:
        values = result["metrics"][method]
        assert set(values) == set(METRIC_KEYS)
        for key in ("aed", "csim", "expression_agreement"):  # documented null: no face-api assets
            assert values[key] is None
        for key in ("l1", "psnr", "ssim", "landmark_missing_rate"):
            assert math.isfinite(values[key])
    assert any("fetch-eval-assets" in note for note in result["notes"])
    src, drv, model = (result["metrics"][m] for m in ("source_copy", "driving_copy", "dagan"))
    # driving_copy is the ground truth itself: exact values; source_copy has real but imperfect motion error.
    assert drv["l1"] == 0 and drv["psnr"] == M.PSNR_CAP_DB and drv["ssim"] == pytest.approx(1.0)
    assert drv["akd"] == 0 and drv["prmse"] == 0 and drv["expression_feature_error"] == 0
    assert drv["landmark_missing_rate"] == 0
    for key in ("akd", "prmse", "expression_feature_error"):
        assert math.isfinite(src[key]) and src[key] > 0
    assert 0 < src["l1"] < 1 and src["ssim"] < 1
    # An untrained model: landmark metrics are finite where mediapipe finds a face, else documented null.
    if model["landmark_missing_rate"] < 1:
        assert all(math.isfinite(model[k]) for k in ("akd", "prmse", "expression_feature_error"))
    else:
        assert model["akd"] is None and any("dagan: akd" in note for note in result["notes"])
    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    write_report(result, json_path, md_path)
    assert json.loads(json_path.read_text())["metrics"]["driving_copy"]["ssim"] == pytest.approx(1.0)
    table = md_path.read_text()
    assert table == markdown_table(result) and "| source_copy |" in table and "n/a" in table


def test_eval_cli_and_errors(tiny_eval_set, tmp_path, monkeypatch, capsys):
    from commands.cli import main

    ckpt, test = tiny_eval_set
    code = main(
        ["eval", "--checkpoint", str(ckpt), "--data", str(test), "--out-dir", str(tmp_path), "--no-identity",
         "--max-videos", "1", "--max-frames", "2", "--quiet"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["videos"] == 1 and report["frames"] == 1
    assert "| dagan |" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # An explicit --assets folder that lacks the weights is an error, not a silent null.
    code = main(
        ["eval", "--checkpoint", str(ckpt), "--data", str(test), "--assets", str(tmp_path), "--quiet"]
    )
    assert code == 2 and "dagan fetch-eval-assets" in capsys.readouterr().err


def test_eval_with_identity_assets(tiny_eval_set, tmp_path):
    from evaluation.assets import find_eval_assets
    from evaluation.evaluate import evaluate

    assets = find_eval_assets(required=False)
    if assets is None:
        pytest.skip("face-api assets absent: run `dagan fetch-eval-assets` (or set DAGAN_EVAL_ASSETS)")
    ckpt, test = tiny_eval_set
    result = evaluate(ckpt, test, max_videos=1, progress=False)
    src, drv = result["metrics"]["source_copy"], result["metrics"]["driving_copy"]
    assert drv["aed"] == 0.0 and drv["expression_agreement"] == 1.0
    assert src["csim"] == pytest.approx(1.0, abs=1e-5)  # output = source: identical embeddings
    assert 0 < src["aed"] < 0.6  # the same person, moved: well under the 0.6 same-person threshold
    assert 0.8 < drv["csim"] <= 1.0
    for key in ("aed", "csim"):
        assert math.isfinite(result["metrics"]["dagan"][key])


def test_eval_scores_the_engine_output_in_both_modes(tiny_eval_set, monkeypatch, tmp_path):
    """The model rows are exactly the engine's uint8 frames (absolute, and relative to the source
    frame), recomputed here with the engine directly; the baselines do not depend on the mode."""
    from engine import create_engine
    from evaluation.evaluate import _read_frames, evaluate, find_videos, markdown_table

    monkeypatch.setenv("DAGAN_EVAL_ASSETS", str(tmp_path / "no-assets"))
    ckpt, test = tiny_eval_set
    both = evaluate(ckpt, test, use_identity=False, mode="both", batch_size=2, progress=False)
    absolute = evaluate(ckpt, test, use_identity=False, mode="absolute", progress=False)
    assert set(both["metrics"]) == {"dagan", "dagan_relative", "source_copy", "driving_copy"}
    assert set(absolute["metrics"]) == {"dagan", "source_copy", "driving_copy"}
    assert both["backend"] == "torch" and both["modes"] == ["absolute", "relative"]
    assert both["metrics"]["dagan"] == pytest.approx(absolute["metrics"]["dagan"])  # batch size 2 vs 8
    assert both["metrics"]["source_copy"] == absolute["metrics"]["source_copy"]

    engine = create_engine(ckpt, backend="torch", device="cpu")
    l1 = {"absolute": [], "relative": []}
    psnr_at_reference = []
    for video in find_videos(test):
        frames = _read_frames(video, engine.image_size, None, 1)
        for mode in l1:
            # as a call runs: the first driving frame becomes the relative reference
            session = engine.new_session(frames[0], relative=mode == "relative")
            outputs = [engine.animate_batch([session], [truth])[0].image for truth in frames[1:]]
            l1[mode] += [M.l1(out, truth) for out, truth in zip(outputs, frames[1:], strict=True)]
            if mode == "relative":
                psnr_at_reference.append(M.psnr(outputs[0], frames[0]))
    assert both["metrics"]["dagan"]["l1"] == pytest.approx(np.mean(l1["absolute"]), rel=1e-6)
    assert both["metrics"]["dagan_relative"]["l1"] == pytest.approx(np.mean(l1["relative"]), rel=1e-6)
    assert both["metrics"]["dagan"]["l1"] != both["metrics"]["dagan_relative"]["l1"]
    assert both["reference_pose"]["psnr"] == pytest.approx(np.mean(psnr_at_reference))
    assert "reference_pose" not in absolute
    assert "At the reference pose" in markdown_table(both) and "engine torch fp32" in markdown_table(both)
    with pytest.raises(Exception, match="--mode must be"):
        evaluate(ckpt, test, mode="sideways", progress=False)


def test_eval_cli_defaults_to_the_bundled_weights_and_takes_threads(tiny_eval_set, tmp_path, monkeypatch):
    import torch

    from commands.cli import main

    ckpt, test = tiny_eval_set
    monkeypatch.setenv("DAGAN_CHECKPOINT", str(ckpt))  # resolve_checkpoint: env, then the bundled file
    before = torch.get_num_threads()
    try:
        args = ["eval", "--data", str(test), "--out-dir", str(tmp_path), "--no-identity", "--quiet"]
        assert main([*args, "--max-videos", "1", "--max-frames", "2", "--relative", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["checkpoint"] == str(ckpt) and report["modes"] == ["relative"] and report["threads"] == 1
    assert set(report["metrics"]) == {"dagan_relative", "source_copy", "driving_copy"}
    assert main([*args, "--relative", "--mode", "absolute"]) == 2
    assert main([*args, "--threads", "0"]) == 2


def test_eval_through_onnxruntime_matches_torch(tiny_eval_set, tmp_path, monkeypatch):
    """--backend onnxruntime scores the exported graphs: the same protocol, values within rounding of
    the torch backend's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from evaluation.evaluate import evaluate

    monkeypatch.setenv("DAGAN_CACHE", str(tmp_path / "cache"))  # the export lands here, not in ~/.cache
    ckpt, test = tiny_eval_set
    kw = dict(use_identity=False, mode="both", max_videos=1, progress=False, device="cpu")
    ort = evaluate(ckpt, test, backend="onnxruntime", **kw)
    ref = evaluate(ckpt, test, backend="torch", **kw)
    assert ort["backend"] == "onnxruntime"
    for row in ("dagan", "dagan_relative"):
        assert ort["metrics"][row]["l1"] == pytest.approx(ref["metrics"][row]["l1"], abs=2e-3)
        assert ort["metrics"][row]["psnr"] == pytest.approx(ref["metrics"][row]["psnr"], abs=0.3)


def test_eval_through_the_served_engine(tiny_eval_set, tmp_path, monkeypatch):
    """--backend served scores the engine `dagan serve` picks (engine.select.default_engine, prepared in
    the cache on first use), reports which, and scores close to torch fp32; a precision is the server's
    to pick."""
    import engine.select as select
    from evaluation.evaluate import EvalDataError, evaluate

    monkeypatch.setenv("DAGAN_CACHE", str(tmp_path / "cache"))  # its exports land here, not in ~/.cache
    choices = []
    real = select.default_engine

    def spy(*args, **kwargs):
        engine, choice = real(*args, **kwargs)
        choices.append((kwargs, choice))
        return engine, choice

    monkeypatch.setattr(select, "default_engine", spy)
    ckpt, test = tiny_eval_set
    kw = dict(use_identity=False, mode="both", max_videos=1, progress=False, device="cpu", threads=1)
    served = evaluate(ckpt, test, backend="served", **kw)
    ref = evaluate(ckpt, test, backend="torch", **kw)
    ((options, choice),) = choices
    assert options["threads"] == 1 and options["device"] == "cpu"
    assert (served["backend"], served["precision"]) == (choice.backend, choice.precision)
    for row in ("dagan", "dagan_relative"):
        assert served["metrics"][row]["l1"] == pytest.approx(ref["metrics"][row]["l1"], abs=5e-3)
    with pytest.raises(EvalDataError, match="picks the precision itself"):
        evaluate(ckpt, test, backend="served", precision="int8", **kw)
