"""The engine API on the PyTorch backend: caching, batching, relative motion, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.keypoint_ops import relative_keypoints
from engine import EngineError, create_engine
from engine.torch_backend import TorchEngine


def _frames(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def engine(tiny_model):
    return TorchEngine(tiny_model, device="cpu")


def test_animate_matches_uncached_model(engine):
    src, drv = _frames(2)
    engine.set_source(src)
    out = engine.animate(drv, return_depth=True)
    assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
    assert out.driving_depth.shape == (64, 64) and out.driving_depth.dtype == np.uint8
    with torch.no_grad():
        ref = engine.model(engine._to_tensor([src], "s"), engine._to_tensor([drv], "d")).prediction
    ref_u8 = engine._to_images(ref)[0]
    assert np.abs(out.image.astype(int) - ref_u8.astype(int)).max() <= 1


def test_animate_batch_equals_separate_sessions(engine):
    src_a, src_b, drv_a, drv_b = _frames(4, seed=1)
    a = engine.new_session(src_a)
    b = engine.new_session(src_b)
    batch = engine.animate_batch([a, b], [drv_a, drv_b])
    single_a = engine.animate_batch([a], [drv_a])[0]
    single_b = engine.animate_batch([b], [drv_b])[0]
    assert np.abs(batch[0].image.astype(int) - single_a.image.astype(int)).max() <= 1
    assert np.abs(batch[1].image.astype(int) - single_b.image.astype(int)).max() <= 1
    # two different sources really give two different avatars
    assert np.abs(batch[0].image.astype(int) - batch[1].image.astype(int)).max() > 0
    with pytest.raises(EngineError, match="2 sessions but 1 frames"):
        engine.animate_batch([a, b], [drv_a])
    assert engine.animate_batch([], []) == []


def test_relative_motion_uses_first_frame_as_reference(engine):
    src, ref, later = _frames(3, seed=2)
    session = engine.set_source(src, relative=True)
    first = engine.animate(ref)
    assert session.reference is not None and session.scale is not None
    # at the reference pose the source keypoints are used unchanged: same as rendering kp_s
    with torch.no_grad():
        own = engine.model.render(session.source, session.source.kp).prediction
    assert np.abs(first.image.astype(int) - engine._to_images(own)[0].astype(int)).max() <= 1
    # a later frame is driven relative to that reference
    with torch.no_grad():
        kp_later, _ = engine.model.driving_keypoints(engine._to_tensor([later], "d"))
        expected_kp = relative_keypoints(session.source.kp, kp_later, session.reference, session.scale)
        expected = engine._to_images(engine.model.render(session.source, expected_kp).prediction)[0]
    got = engine.animate(later).image
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    reference_before = session.reference
    engine.reset_reference()
    assert session.reference is None
    engine.animate(later)
    assert not torch.equal(session.reference.value, reference_before.value)


def test_other_frame_sizes_are_resized(engine):
    src = _frames(1, size=100)[0]
    engine.set_source(src)
    assert engine.animate(_frames(1, size=80)[0]).image.shape == (64, 64, 3)


def test_bad_inputs(engine, tiny_model):
    with pytest.raises(EngineError, match="set_source"):
        engine.animate(_frames(1)[0])
    with pytest.raises(EngineError, match="H×W×3"):
        engine.set_source(np.zeros((64, 64), np.uint8))
    with pytest.raises(EngineError, match="uint8"):
        engine.set_source(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(EngineError, match="unknown backend"):
        create_engine("x.safetensors", backend="tensorrt-9000")
    with pytest.raises(EngineError, match="fp16 needs a CUDA"):
        TorchEngine(tiny_model, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            TorchEngine(tiny_model, device="cuda")


def test_create_engine_from_checkpoint(tmp_path, tiny_model):
    from dagan.checkpoint import save_checkpoint

    path = tmp_path / "t.safetensors"
    save_checkpoint(path, tiny_model.config, tiny_model)
    eng = create_engine(path, device="cpu")
    assert eng.backend == "torch" and eng.image_size == 64
    src, drv = _frames(2, seed=5)
    ref = TorchEngine(make_model(tiny_model.config), device="cpu")
    eng.set_source(src)
    ref.set_source(src)
    assert np.array_equal(eng.animate(drv).image, ref.animate(drv).image)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_close_to_fp32(tiny_model):
    src, drv = _frames(2, seed=7)
    a = TorchEngine(make_model(tiny_model.config), device="cuda", precision="fp32")
    b = TorchEngine(make_model(tiny_model.config), device="cuda", precision="fp16")
    a.set_source(src)
    b.set_source(src)
    diff = np.abs(a.animate(drv).image.astype(int) - b.animate(drv).image.astype(int))
    assert diff.mean() < 2.0
