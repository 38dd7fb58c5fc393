"""The lip-opening gain (``keypoints.mouth_keypoints`` / ``mouth_open_gain``,
:func:`dagan.keypoint_ops.open_mouth`): it scales only the driver's lip opening, in every backend and
in the filtered path, and a config can only ask for it where it names the lips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.config import MAX_MOUTH_GAIN, ConfigError, load_config
from dagan.graph_contract import motion_names
from dagan.keypoint_ops import open_mouth, relative_keypoints
from dagan.nets.keypoints import Keypoints
from engine.base import EngineError
from engine.hot_path import filtered_motion, motion_inputs
from engine.torch_backend import TorchEngine

UP, LOW = 7, 8


def _face(batch: int = 1, seed: int = 0) -> torch.Tensor:
    """B×15×2 keypoints with the inner lips at (0, 0.30) and (0, 0.34): the lower lip below the upper."""
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(batch, 15, 2, generator=g) - 0.5
    kp[:, UP] = torch.tensor([0.0, 0.30])
    kp[:, LOW] = torch.tensor([0.0, 0.34])
    return kp


def _gap(kp: torch.Tensor) -> torch.Tensor:
    return kp[:, LOW, 1] - kp[:, UP, 1]


def test_open_mouth_scales_only_the_opening():
    ref = _face()
    drv = ref.clone()
    drv[:, LOW, 1] += 0.05  # the driver opens by 0.05
    drv += torch.tensor([0.1, -0.2])  # and moves the whole head
    out = open_mouth(drv, ref, (UP, LOW), 2.5)
    assert torch.allclose(_gap(out) - _gap(ref), torch.tensor([0.125]), atol=1e-6)  # 2.5 × 0.05
    # the extra opening moves the lower lip alone (a dropping jaw), straight down the lip axis; the upper
    # lip and every other keypoint stay where the driver put them (so does the head's motion)
    assert torch.allclose(out[:, LOW] - drv[:, LOW], torch.tensor([[0.0, 0.075]]), atol=1e-6)
    others = [k for k in range(15) if k != LOW]
    assert torch.equal(out[:, others], drv[:, others])
    # gain 1 and a mouth that does not open are left as they are
    assert torch.allclose(open_mouth(drv, ref, (UP, LOW), 1.0), drv)
    still = ref + torch.tensor([0.1, -0.2])
    assert torch.allclose(open_mouth(still, ref, (UP, LOW), 3.0), still, atol=1e-6)


def test_open_mouth_leaves_a_closing_mouth_and_follows_the_face_axis():
    ref = _face()
    closing = ref.clone()
    closing[:, LOW, 1] -= 0.03  # tighter than at the reference: not amplified (no lips pushed through)
    assert torch.allclose(open_mouth(closing, ref, (UP, LOW), 3.0), closing)
    # a face rolled by 90°: the lips open along x, and the push follows that axis
    rolled = ref.flip(-1)
    drv = rolled.clone()
    drv[:, LOW, 0] += 0.05
    out = open_mouth(drv, rolled, (UP, LOW), 2.0)
    assert torch.allclose(out[:, LOW] - out[:, UP], rolled[:, LOW] - rolled[:, UP] + torch.tensor([0.1, 0.0]))
    assert torch.equal(out[:, UP], drv[:, UP])


def test_open_mouth_takes_a_gain_per_item():
    ref = _face(batch=2)
    drv = ref.clone()
    drv[:, LOW, 1] += 0.04
    out = open_mouth(drv, ref, (UP, LOW), torch.tensor([1.0, 3.0]).view(2, 1, 1))
    assert torch.allclose(_gap(out) - _gap(ref), torch.tensor([0.04, 0.12]), atol=1e-6)


def test_relative_keypoints_opens_only_relative_items():
    ref = _face(batch=2)
    src = _face(batch=2, seed=1)
    drv = ref.clone()
    drv[:, LOW, 1] += 0.04
    jac = torch.eye(2).expand(2, 15, 2, 2).clone()
    k = lambda v: Keypoints(v, jac)  # noqa: E731
    rel = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    out = relative_keypoints(k(src), k(drv), k(ref), 1.0, rel, (UP, LOW), 2.0)
    assert math.isclose(float(_gap(out.value)[0] - _gap(src)[0]), 0.08, abs_tol=1e-6)
    assert torch.equal(out.value[1], drv[1])  # an absolute item gets the driver's keypoints as they are
    plain = relative_keypoints(k(src), k(drv), k(ref), 1.0, rel)
    assert math.isclose(float(_gap(plain.value)[0] - _gap(src)[0]), 0.04, abs_tol=1e-6)


def test_config_names_the_lips_before_asking_for_a_gain():
    live = load_config("live-128")
    assert live.keypoints.mouth_keypoints == (UP, LOW) and live.keypoints.mouth_open_gain == 1.0
    assert "mouth_gain" in motion_names(live)
    vox = load_config("vox-256")  # the authors' model: no keypoint is known to be a lip
    assert vox.keypoints.mouth_keypoints == () and "mouth_gain" not in motion_names(vox)
    bad = [
        ({"mouth_open_gain": 2.0}, "needs keypoints.mouth_keypoints"),
        ({"mouth_keypoints": [7]}, "two different keypoint indices"),
        ({"mouth_keypoints": [7, 7]}, "two different keypoint indices"),
        ({"mouth_keypoints": [7, 15]}, "below num_kp"),
        ({"mouth_keypoints": [7, 8], "mouth_open_gain": MAX_MOUTH_GAIN + 1}, "mouth_open_gain"),
        ({"mouth_keypoints": [7, 8], "mouth_open_gain": 0.0}, "mouth_open_gain"),
    ]
    for kp, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config({"keypoints": {"num_kp": 15, **kp}})


def test_motion_inputs_and_filtered_motion_carry_the_gain():
    from engine.base import Session

    a, b = Session(source=None, relative=True), Session(source=None, relative=True, mouth_gain=1.5)
    for s in (a, b):
        s.reference, s.scale = Keypoints(_face(), None), 1.0
    m = motion_inputs([a, b], 15, False, torch.device("cpu"), torch.float32, mouth_gain=2.5)
    assert m["mouth_gain"].flatten().tolist() == [2.5, 1.5]  # the model's default, then the override
    assert "mouth_gain" not in motion_inputs([a], 15, False, torch.device("cpu"), torch.float32)
    b.mouth_gain = MAX_MOUTH_GAIN + 1  # a session asking for more than any config may is refused
    with pytest.raises(EngineError, match="mouth_gain"):
        motion_inputs([a, b], 15, False, torch.device("cpu"), torch.float32, mouth_gain=2.5)
    b.mouth_gain = 1.5
    # the fused graph fed by filtered_motion renders exactly the host's transfer (gain applied once)
    ref, src = Keypoints(_face(2), None), Keypoints(_face(2, seed=1), None)
    det = _face(2, seed=2)
    det[:, LOW, 1] += 0.05
    filt = det.clone()
    filt[:, LOW, 1] -= 0.01
    scale, rel = m["motion_scale"], m["relative"]
    used = relative_keypoints(src, Keypoints(filt, None), ref, scale, rel, (UP, LOW), 2.5)
    moved = filtered_motion(src, Keypoints(det, None), Keypoints(filt, None), used, dict(m))
    assert moved["mouth_gain"].flatten().tolist() == [1.0, 1.0]
    again = relative_keypoints(
        src,
        Keypoints(det, None),
        Keypoints(moved["kp_reference_value"], None),
        moved["motion_scale"],
        moved["relative"],
        (UP, LOW),
        moved["mouth_gain"],
    )
    assert torch.allclose(again.value, used.value, atol=1e-6)


@pytest.fixture(scope="module")
def live_model():
    m = make_model(load_config("live-128"), seed=3)
    with torch.no_grad():
        m.generator.final.weight.mul_(10.0)  # spread the outputs so uint8 comparisons are meaningful
    return m


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(n)]


def _opening_pair(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, reference, driving) frames whose driving lip keypoints open the most since the reference
    (of 12 random pairs), so a gain has something to scale (random weights put the "lips" anywhere)."""
    best, found = 0.0, None
    for seed in range(12):
        src, a, b = _frames(3, seed=seed)
        x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            kp = model.driving_keypoints(x)[0].value
        for ref, drv, r, d in ((a, b, 0, 1), (b, a, 1, 0)):
            wider = open_mouth(kp[d : d + 1], kp[r : r + 1], (UP, LOW), 2.0)
            push = float((wider - kp[d : d + 1]).abs().max())
            if push > best:
                best, found = push, (src, ref, drv)
    assert found is not None and best > 1e-3, "no frame pair opens the random model's lip keypoints"
    return found


def _relative_frames(engine, src, ref, drv, gain: float | None) -> np.ndarray:
    s = engine.new_session(src, relative=True)
    s.mouth_gain = gain
    engine.animate_batch([s], [ref])  # the reference frame
    return engine.animate_batch([s], [drv])[0].image


def test_engine_session_gain_changes_only_relative_frames(live_model):
    engine = TorchEngine(live_model, device="cpu")
    src, ref, drv = _opening_pair(live_model)
    plain, wide = _relative_frames(engine, src, ref, drv, None), _relative_frames(engine, src, ref, drv, 4.0)
    assert np.array_equal(plain, _relative_frames(engine, src, ref, drv, 1.0))  # the preset's gain is 1
    assert np.abs(plain.astype(int) - wide.astype(int)).max() > 2
    outs = []
    for gain in (1.0, 3.0):  # absolute motion ignores the gain
        s = engine.new_session(src)
        s.mouth_gain = gain
        outs.append(engine.animate_batch([s], [drv])[0].image)
    assert np.array_equal(outs[0], outs[1])


def test_onnx_export_runs_the_gain_as_torch_does(live_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.onnx_backend import OnnxRuntimeEngine
    from export.onnx_export import export_model

    export_model(live_model, tmp_path / "onnx", progress=False)
    ort_e, torch_e = OnnxRuntimeEngine(tmp_path / "onnx", device="cpu"), TorchEngine(live_model, device="cpu")
    assert ort_e.mouth_keypoints == (UP, LOW)
    src, ref, drv = _opening_pair(live_model)
    for gain in (1.0, 4.0):
        a = _relative_frames(ort_e, src, ref, drv, gain)
        b = _relative_frames(torch_e, src, ref, drv, gain)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(a.astype(int) - _relative_frames(ort_e, src, ref, drv, 1.0).astype(int)).max() > 2


def test_training_config_checks_the_lip_keypoints_against_their_anchors():
    from training.config import INNER_LIPS, load_train_config

    cfg = load_train_config(None, {"model": "live-128", "dagan.weights.kp_landmarks": 1.0})
    points = cfg.dagan.kp_landmark_points
    assert tuple(points[k] for k in cfg.model.keypoints.mouth_keypoints) == INNER_LIPS
    swapped = list(points)
    swapped[UP], swapped[LOW] = swapped[LOW], swapped[UP]  # the "upper lip" keypoint on the lower lip
    with pytest.raises(ConfigError, match="mouth_keypoints"):
        load_train_config(
            None,
            {"model": "live-128", "dagan.weights.kp_landmarks": 1.0, "dagan.kp_landmark_points": swapped},
        )
