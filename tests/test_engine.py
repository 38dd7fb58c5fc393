"""The engine API on the PyTorch backend: caching, batching, relative motion, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model

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
    # The values of later frames (relative transfer with and without movement-scale adaptation) are
    # checked against the authors' own outputs in tests/test_golden.py; here: the reference is kept.
    reference_before = session.reference
    engine.animate(later)
    assert session.reference is reference_before
    engine.reset_reference()
    assert session.reference is None
    engine.animate(later)
    assert not torch.equal(session.reference.value, reference_before.value)


def test_relative_without_scale_adaptation(engine):
    """adapt_scale=False (the authors' --relative without --adapt_scale) moves the source by the raw
    displacement: the scale is 1, on set_source and new_session alike; with adaptation it is the
    hull-size ratio, so the two streams differ once the driver moves."""
    src, ref, later = _frames(3, seed=4)
    plain = engine.set_source(src, relative=True, adapt_scale=False)
    adapted = engine.new_session(src, relative=True)
    also_plain = engine.new_session(src, relative=True, adapt_scale=False)
    engine.animate_batch([plain, adapted, also_plain], [ref] * 3)
    assert float(plain.scale) == float(also_plain.scale) == 1.0
    assert float(adapted.scale) != 1.0
    outs = engine.animate_batch([plain, adapted, also_plain], [later] * 3)
    assert np.array_equal(outs[0].image, outs[2].image)
    assert not np.array_equal(outs[0].image, outs[1].image)
    plain.reset_reference()
    engine.animate(later)
    assert float(plain.scale) == 1.0 and plain.adapt_scale is False


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


def test_torch_engine_reuses_stacked_sources_and_supports_plain_relative(engine):
    """The eager path stacks the sessions' cached sources once per session list (like the graph
    engines), and relative motion without scale adaptation uses scale 1."""
    src_a, src_b, drv_a, drv_b = _frames(4, seed=8)
    a, b = engine.new_session(src_a), engine.new_session(src_b, relative=True, adapt_scale=False)
    first = engine.animate_batch([a, b], [drv_a, drv_b])
    version = engine._stack.version
    again = engine.animate_batch([a, b], [drv_a, drv_b])
    assert engine._stack.version == version  # not re-stacked
    assert all(np.array_equal(x.image, y.image) for x, y in zip(first, again, strict=True))
    assert float(b.scale.reshape(())) == 1.0
    adapted = engine.new_session(src_b, relative=True)
    engine.animate_batch([adapted], [drv_b])
    assert adapted.scale is not None and float(adapted.scale.reshape(())) != 1.0


def test_one_rounding_and_batched_upload():
    from dagan.helpers import images_to_tensor, tensor_to_uint8

    t = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0, 1.2, -0.1]).view(1, 1, 1, 7)
    got = tensor_to_uint8(t.expand(1, 3, 1, 7))[0, 0, :, 0].tolist()
    assert got == [0, 1, 2, 255, 255, 255, 0]  # half up, clamped
    imgs = [*_frames(2, seed=9), _frames(1, size=80, seed=10)[0]]
    batched = images_to_tensor(imgs, "x", torch.device("cpu"), torch.float32, 64)
    single = torch.cat([images_to_tensor([i], "x", torch.device("cpu"), torch.float32, 64) for i in imgs])
    assert batched.shape == (3, 3, 64, 64) and torch.equal(batched, single)
    assert torch.equal(batched[0], torch.from_numpy(imgs[0]).permute(2, 0, 1).float() / 255.0)


def test_cache_keys():
    from dagan.helpers import cache_key

    key = cache_key("abc", "NVIDIA L4", "10.7", True, 32, 8)
    assert key == cache_key("abc", "NVIDIA L4", "10.7", True, 32, 8) and len(key) == 16
    assert key != cache_key("abc", "NVIDIA L4", "10.7", False, 32, 8)
    labelled = cache_key("abc", label="weird/gpu name-trt10")
    assert labelled.startswith("weird_gpu_name-trt10-") and "/" not in labelled
