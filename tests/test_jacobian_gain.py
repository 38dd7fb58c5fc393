"""The Jacobian gain (``keypoints.jacobian_gain``, :func:`dagan.keypoint_ops.relative_keypoints`): it
scales the local motion the driver's Jacobians carry since the reference, only in relative motion, the
same in every backend and in the filtered path; a config can only ask for a sane one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.config import MAX_JACOBIAN_GAIN, ConfigError, config_from_dict, load_config, set_dotted, to_plain
from dagan.keypoint_ops import relative_keypoints
from dagan.nets.keypoints import Keypoints
from engine.hot_path import filtered_motion
from engine.torch_backend import TorchEngine


def _kp(batch: int, seed: int, turn: float = 0.0) -> Keypoints:
    """B×15 keypoints with Jacobians near the identity, each turned by ``turn`` radians."""
    g = torch.Generator().manual_seed(seed)
    value = torch.rand(batch, 15, 2, generator=g) - 0.5
    jac = torch.eye(2) + 0.1 * torch.randn(batch, 15, 2, 2, generator=g)
    c, s = math.cos(turn), math.sin(turn)
    return Keypoints(value, torch.tensor([[c, -s], [s, c]]) @ jac)


def _angle(jac: torch.Tensor) -> torch.Tensor:
    """The rotation part of 2×2 matrices (radians)."""
    return torch.atan2(jac[..., 1, 0] - jac[..., 0, 1], jac[..., 0, 0] + jac[..., 1, 1])


def test_the_gain_scales_the_local_motion_of_relative_items_only():
    src, ref = _kp(2, 0), _kp(2, 1)
    drv = Keypoints(ref.value + 0.05, torch.tensor([[1.0, -0.2], [0.2, 1.0]]) @ ref.jacobian)
    scale, rel = torch.ones(2, 1, 1), torch.tensor([1.0, 0.0]).view(2, 1, 1)
    plain = relative_keypoints(src, drv, ref, scale, rel)
    wide = relative_keypoints(src, drv, ref, scale, rel, jacobian_gain=1.3)
    # relative item: J_s + g (J_d J_ref⁻¹ J_s − J_s); the keypoints' positions are not touched
    expect = src.jacobian[0] + 1.3 * (plain.jacobian[0] - src.jacobian[0])
    assert torch.allclose(wide.jacobian[0], expect, atol=1e-6)
    assert torch.equal(wide.value, plain.value)
    # it turns each neighbourhood further than the driver's turn (about 0.2 rad here)
    turn = _angle(plain.jacobian[0]) - _angle(src.jacobian[0])
    assert torch.all((_angle(wide.jacobian[0]) - _angle(src.jacobian[0])).abs() > 1.2 * turn.abs())
    # absolute item: the driver's own Jacobians, as without a gain
    assert torch.equal(wide.jacobian[1], drv.jacobian[1])
    # a driver as at the reference leaves the photo's own Jacobians for any gain
    still = relative_keypoints(src, ref, ref, scale, torch.ones(2, 1, 1), jacobian_gain=1.8)
    assert torch.allclose(still.jacobian, src.jacobian, atol=1e-5)
    # gain 1 is the paper's transfer, exactly
    assert torch.equal(
        relative_keypoints(src, drv, ref, scale, rel, jacobian_gain=1.0).jacobian, plain.jacobian
    )


def test_filtered_motion_feeds_the_fused_graph_what_the_host_rendered():
    """The fused frame graph applies the gain again; the moved reference must undo it exactly once."""
    src, ref, det = _kp(2, 0), _kp(2, 1), _kp(2, 2, turn=0.15)
    filt = Keypoints(det.value * 0.9, det.jacobian @ torch.tensor([[1.0, 0.05], [-0.05, 1.0]]))
    ones = torch.ones(2, 1, 1)
    motion = {"kp_reference_value": ref.value, "kp_reference_jacobian": ref.jacobian}
    motion.update(motion_scale=ones, relative=ones)
    used = relative_keypoints(src, filt, ref, ones, ones, jacobian_gain=1.3)
    moved = filtered_motion(src, det, filt, used, motion, jacobian_gain=1.3)
    moved_ref = Keypoints(moved["kp_reference_value"], moved["kp_reference_jacobian"])
    again = relative_keypoints(
        src, det, moved_ref, moved["motion_scale"], moved["relative"], jacobian_gain=1.3
    )
    assert torch.allclose(again.value, used.value, atol=1e-6)
    assert torch.allclose(again.jacobian, used.jacobian, atol=1e-5)
    # without passing the gain the graph would apply it twice
    twice = filtered_motion(src, det, filt, used, motion)
    twice_ref = Keypoints(twice["kp_reference_value"], twice["kp_reference_jacobian"])
    doubled = relative_keypoints(src, det, twice_ref, ones, ones, jacobian_gain=1.3)
    assert not torch.allclose(doubled.jacobian, used.jacobian, atol=1e-3)


def _config(gain: float, preset: str = "tiny", **more):
    return config_from_dict(
        set_dotted(to_plain(load_config(preset)), {"keypoints.jacobian_gain": gain, **more})
    )


def test_config_checks_the_gain():
    assert load_config("live-128").keypoints.jacobian_gain == 1.0  # the preset: the paper's transfer
    assert _config(1.3).keypoints.jacobian_gain == 1.3
    for bad in (0.0, -1.0, MAX_JACOBIAN_GAIN + 0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"keypoints\.jacobian_gain"):
            _config(bad)
    with pytest.raises(ConfigError, match="estimate_jacobian"):
        _config(1.3, **{"keypoints.estimate_jacobian": False})
    _config(1.0, **{"keypoints.estimate_jacobian": False})  # no gain asked: fine without Jacobians


@pytest.fixture(scope="module")
def models():
    """The same random tensors under gain 1 and gain 2."""
    plain = make_model(load_config("tiny"), seed=5)
    with torch.no_grad():
        plain.generator.final.weight.mul_(10.0)  # spread the outputs so uint8 comparisons are meaningful
        # an untrained detector's Jacobian head starts at zero weights (identity everywhere): give it
        # some, so frames have local motion to scale
        plain.kp_detector.jacobian.weight.normal_(0.0, 0.2)
    wide = make_model(_config(2.0), seed=5)
    wide.load_state_dict(plain.state_dict())
    return plain, wide


def _frames(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo, reference, driving): random pixels, the driving frame the reference moved sideways (an
    untrained detector reads more local motion from that than from two unrelated noise frames)."""
    rng = np.random.default_rng(seed)
    size = load_config("tiny").image_size
    src, ref = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))
    return src, ref, np.roll(ref, size // 8, axis=1)


def _relative(engine, src, ref, drv) -> tuple[np.ndarray, np.ndarray]:
    s = engine.new_session(src, relative=True)
    at_ref = engine.animate_batch([s], [ref])[0].image
    return at_ref, engine.animate_batch([s], [drv])[0].image


def test_engine_frames_change_only_where_the_driver_moved(models):
    plain, wide = (TorchEngine(m, device="cpu") for m in models)
    assert (plain.jacobian_gain, wide.jacobian_gain) == (1.0, 2.0)
    src, ref, drv = _frames()
    p_ref, p_drv = _relative(plain, src, ref, drv)
    w_ref, w_drv = _relative(wide, src, ref, drv)
    assert np.abs(p_ref.astype(int) - w_ref.astype(int)).max() <= 1  # at the reference: the photo's own
    assert np.abs(p_drv.astype(int) - w_drv.astype(int)).max() > 2  # moved: further
    a, b = (e.animate_batch([e.new_session(src)], [drv])[0].image for e in (plain, wide))
    assert np.array_equal(a, b)  # absolute motion ignores the gain


def test_onnx_export_runs_the_gain_as_torch_does(models, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.onnx_backend import OnnxRuntimeEngine
    from export.onnx_export import export_model

    export_model(models[1], tmp_path / "onnx", progress=False)
    ort_e, torch_e = OnnxRuntimeEngine(tmp_path / "onnx", device="cpu"), TorchEngine(models[1], device="cpu")
    assert ort_e.jacobian_gain == 2.0
    src, ref, drv = _frames(1)
    a, b = _relative(ort_e, src, ref, drv)[1], _relative(torch_e, src, ref, drv)[1]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_bundled_file_turns_the_head_further():
    from dagan.checkpoint import load_model

    assert load_model("weights/dagan-default.safetensors").config.keypoints.jacobian_gain > 1.0
