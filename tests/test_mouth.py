"""An open mouth: the photo's mouth, how far to open it, where the drawn lips part, the warp and its
shade, the config, and how the engines use them (dagan/mouth.py, engine/hot_path.py step 6)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.config import ConfigError, MouthConfig, config_from_dict, load_config, set_dotted, to_plain
from dagan.mouth import (
    JAW,
    MAX_OPENING,
    SEARCH_OFFSETS,
    extra_opening,
    find_gap,
    mouth_shape,
    open_mouths,
)

SIZE = 64
SKIN, LIP, GAP = (0.85, 0.7, 0.6), (0.75, 0.3, 0.3), (0.3, 0.1, 0.1)
# the mouth: corners at x 24 and 40 on row 41, the upper lip rows 38–40, the gap row 41, the lower lip
# rows 42–44, the chin at row 56
LEFT, RIGHT, ROW = 24, 40, 41
CFG = MouthConfig(warp=1.0, shade=1.5, open_photo=0.25)


def mouth_config(**changes):
    """The tiny preset with keypoints 7 and 8 named the lips and the mouth warp on."""
    base = {"keypoints.mouth_keypoints": [7, 8], "mouth.warp": 1.0}
    return config_from_dict(set_dotted(to_plain(load_config("tiny")), {**base, **changes}))


def synthetic_landmarks(gap: float = 1.0) -> np.ndarray:
    """478×2 landmarks holding only the mouth of :func:`mouth_image` (inner lips ``gap`` apart)."""
    from bench.model import mouth_landmarks

    return mouth_landmarks(LEFT, RIGHT, ROW, gap, lip_bottom=45, chin=56)


def mouth_image() -> torch.Tensor:
    """1×3×SIZE×SIZE: skin, with lips between the corners and a dark one-pixel gap between them."""
    img = torch.tensor(SKIN).view(1, 3, 1, 1).repeat(1, 1, SIZE, SIZE)
    cols = slice(LEFT + 1, RIGHT)
    img[0, :, 38:41, cols] = torch.tensor(LIP).view(3, 1, 1)
    img[0, :, 42:45, cols] = torch.tensor(LIP).view(3, 1, 1)
    img[0, :, ROW, cols] = torch.tensor(GAP).view(3, 1)
    return img


def dark_rows(img: torch.Tensor, col: int) -> int:
    """How many pixels of column ``col`` are darker than the lips (the mouth's inside)."""
    return int((img[0].mean(dim=0)[:, col] < 0.35).sum())


def lip_bottom(img: torch.Tensor, col: int = 32) -> int:
    """The lowest row of column ``col`` that is redder than the skin (the lower lip's edge)."""
    red = img[0, 0, :, col] - img[0, 1, :, col] > 0.3
    return int(np.nonzero(red.numpy())[0].max())


# ------------------------------------------------------------------------------------------ the photo


def test_mouth_shape_reads_the_photos_mouth():
    shape = mouth_shape(synthetic_landmarks())
    assert np.allclose(shape.centre, (32, ROW)) and shape.width == 16.0
    assert np.allclose(shape.axis, (1, 0)) and np.allclose(shape.normal, (0, 1))
    assert shape.gap == pytest.approx(1.0) and shape.lip == pytest.approx(3.5)
    assert shape.chin == pytest.approx(15.0)
    # the lips apart by more than open_photo × width: the photo's mouth is already open
    assert not shape.is_open(CFG) and mouth_shape(synthetic_landmarks(gap=6.0)).is_open(CFG)


# ------------------------------------------------------------------------------------- how far, where


def test_extra_opening_follows_the_rendered_lips_beyond_the_photos():
    shape = mouth_shape(synthetic_landmarks())
    source = np.zeros((15, 2))
    source[7], source[8] = (0.0, 0.28), (0.0, 0.31)
    opened = source.copy()
    opened[8, 1] += 0.05  # the lower lip 0.05 further down: 1.6 px of a 64-px frame
    assert extra_opening(shape, opened, source, (7, 8), SIZE, CFG) == pytest.approx(1.6)
    half = MouthConfig(warp=0.5)
    assert extra_opening(shape, opened, source, (7, 8), SIZE, half) == pytest.approx(0.8)
    moved = source + 0.2  # the head moved, the lips did not part: nothing
    assert extra_opening(shape, moved, source, (7, 8), SIZE, CFG) == 0.0
    closing = source.copy()
    closing[8, 1] -= 0.02  # closing further than the photo's lips: drawn as it is
    assert extra_opening(shape, closing, source, (7, 8), SIZE, CFG) == 0.0
    tiny = source.copy()
    tiny[8, 1] += 0.001  # 0.03 px: not drawn
    assert extra_opening(shape, tiny, source, (7, 8), SIZE, CFG) == 0.0
    wide = source.copy()
    wide[8, 1] += 1.0  # a huge opening is capped
    assert extra_opening(shape, wide, source, (7, 8), SIZE, CFG) == pytest.approx(MAX_OPENING * 16)


def test_find_gap_finds_the_dark_run_near_the_lips():
    profile = np.full(len(SEARCH_OFFSETS), 0.7)
    profile[(SEARCH_OFFSETS >= 1.0) & (SEARCH_OFFSETS <= 2.0)] = 0.2
    profile[SEARCH_OFFSETS == 1.5] = 0.1
    assert find_gap(profile) == pytest.approx((0.75, 2.25))
    # a darker patch beyond the search's reach (a beard, a collar) is not the gap
    profile[SEARCH_OFFSETS >= 5.0] = 0.0
    assert find_gap(profile) == pytest.approx((0.75, 2.25))


# ------------------------------------------------------------------------------------------ the warp


def test_no_extra_opening_returns_the_frame_untouched():
    img = mouth_image()
    out = open_mouths(img, [mouth_shape(synthetic_landmarks())], np.zeros(1), np.zeros((1, 2)), CFG)
    assert out is img


def test_opening_grows_the_gap_drops_the_lower_lip_and_leaves_the_rest():
    img = mouth_image()
    shape = mouth_shape(synthetic_landmarks())
    out = open_mouths(img, [shape], np.array([4.0]), np.zeros((1, 2)), CFG)
    assert dark_rows(img, 32) == 1 and dark_rows(out, 32) >= 4  # the mouth's inside grew
    assert lip_bottom(out) - lip_bottom(img) in (3, 4, 5)  # the lower lip dropped with it
    # most in the middle, nothing at the corners
    assert dark_rows(out, 32) > dark_rows(out, 37) and dark_rows(out, LEFT + 1) <= 1
    assert torch.equal(out[..., :37, :], img[..., :37, :])  # above the upper lip's inside
    reach = int(np.ceil(JAW * shape.width))
    assert torch.equal(out[..., : 32 - reach], img[..., : 32 - reach])
    assert torch.equal(out[..., 32 + reach + 1 :], img[..., 32 + reach + 1 :])
    assert torch.equal(out[..., 62:, :], img[..., 62:, :])  # past the chin's reach


def test_the_new_gap_is_shaded_dark():
    img = mouth_image()
    shape = mouth_shape(synthetic_landmarks())
    plain = open_mouths(img, [shape], np.array([4.0]), np.zeros((1, 2)), MouthConfig(warp=1.0, shade=0.0))
    shaded = open_mouths(img, [shape], np.array([4.0]), np.zeros((1, 2)), CFG)
    middle = (slice(None), slice(None), slice(ROW, ROW + 4), slice(30, 35))
    assert float(shaded[middle].mean()) < float(plain[middle].mean()) - 0.02
    assert float(shaded[middle].min()) >= 0.0
    # a strong shade darkens the opening like a mouth: dark across its middle, only inside the lips'
    # lens (past the corners and on the lips themselves nothing is shaded)
    strong = open_mouths(img, [shape], np.array([4.0]), np.zeros((1, 2)), MouthConfig(warp=1.0, shade=5.0))
    lum = strong[0].mean(dim=0)
    assert float(lum[ROW + 1, 29:36].max()) < 0.2
    assert torch.equal(strong[..., : LEFT - 1], plain[..., : LEFT - 1])
    assert torch.equal(strong[..., RIGHT + 2 :], plain[..., RIGHT + 2 :])
    assert torch.equal(strong[..., :ROW, :], plain[..., :ROW, :])  # the upper lip is not shaded


def test_the_mouth_is_found_where_it_moved_and_items_without_a_mouth_are_left_alone():
    img = torch.roll(mouth_image(), shifts=(3, 2), dims=(2, 3))  # the avatar's mouth 3 down, 2 right
    shape = mouth_shape(synthetic_landmarks())
    batch = torch.cat([img, img])
    out = open_mouths(batch, [shape, None], np.array([4.0, 4.0]), np.array([[2.0, 3.0], [0.0, 0.0]]), CFG)
    assert dark_rows(out[:1], 34) >= 4 and torch.equal(out[1], img[0])
    # the photo's own lips, 2 px above where the generator drew them this frame: the gap is searched
    searched = open_mouths(img, [shape], np.array([4.0]), np.array([[2.0, 1.0]]), CFG)
    assert dark_rows(searched, 34) >= 4


# ------------------------------------------------------------------------------------------ config


def test_mouth_config_is_checked():
    assert load_config("tiny").mouth.warp == 0.0  # off unless a model sets it
    assert mouth_config().mouth.warp == 1.0
    with pytest.raises(ConfigError, match=r"mouth\.warp: needs keypoints\.mouth_keypoints"):
        config_from_dict(set_dotted(to_plain(load_config("tiny")), {"mouth.warp": 1.0}))
    for key, bad in (
        ("mouth.warp", -1.0),
        ("mouth.warp", 6.0),
        ("mouth.shade", -0.1),
        ("mouth.open_photo", 0.0),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            mouth_config(**{key: bad})


def test_bundled_weights_open_the_mouth():
    from dagan.checkpoint import load_model

    cfg = load_model("weights/dagan-default.safetensors").config
    assert cfg.mouth.warp > 0 and cfg.keypoints.mouth_keypoints


# ------------------------------------------------------------------------------------------ engines


def _engine(monkeypatch, config=None, gap: float = 1.0):
    """A torch engine of a tiny model with lips, whose photo mesh is the synthetic mouth."""
    import dagan.face
    from engine.torch_backend import TorchEngine

    monkeypatch.setattr(
        dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: synthetic_landmarks(gap)
    )
    engine = TorchEngine(make_model(config or mouth_config()), device="cpu")
    rng = np.random.default_rng(0)
    src = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    return engine, src


def test_a_session_keeps_the_photos_mouth_unless_it_is_open_or_the_model_has_no_warp(monkeypatch):
    engine, src = _engine(monkeypatch)
    assert engine.mouth == mouth_config().mouth
    kept = engine.new_session(src, relative=True).mouth
    assert kept is not None and np.allclose(kept.centre, (32, ROW)) and kept.width == 16.0
    engine, src = _engine(monkeypatch, gap=6.0)
    assert engine.new_session(src, relative=True).mouth is None  # the photo's mouth is already open
    engine, src = _engine(monkeypatch, config=mouth_config(**{"mouth.warp": 0.0}))
    assert engine.mouth is None and engine.new_session(src, relative=True).mouth is None


def test_engine_opens_the_avatars_mouth_as_far_as_its_lips_were_rendered(monkeypatch):
    engine, src = _engine(monkeypatch)
    session = engine.new_session(src, relative=True)
    run_frame, rendered = engine._run_frame, engine._rendered

    def textured(feed):  # the random tiny generator draws a flat grey: show the synthetic mouth instead
        return {**run_frame(feed), "prediction": mouth_image().to(feed["driving"].dtype)}

    def lips_apart(feed, out):  # the lower lip rendered 0.1 below the photo's: 3.2 px at 64 px
        kp_s, _ = rendered(feed, out)
        kp = kp_s.value.clone()
        kp[:, 8, 1] += 0.1
        return kp_s, kp

    monkeypatch.setattr(engine, "_run_frame", textured)
    monkeypatch.setattr(engine, "_rendered", lips_apart)
    frame = (np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    image = engine.animate_batch([session], [frame])[0].image
    expected = open_mouths(mouth_image(), [session.mouth], np.array([3.2]), np.zeros((1, 2)), engine.mouth)
    expected = (expected[0].permute(1, 2, 0) * 255).round().numpy().astype(int)
    assert np.abs(image.astype(int) - expected).max() <= 1
    drawn = (mouth_image()[0].permute(1, 2, 0) * 255).round().numpy().astype(int)
    assert np.abs(image.astype(int) - drawn).max() > 50  # it did open


def test_export_carries_the_mouth_warp_to_the_onnx_engine(tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.onnx_backend import OnnxRuntimeEngine
    from export.onnx_export import export_model

    export_model(make_model(mouth_config()), tmp_path / "onnx", progress=False)
    assert OnnxRuntimeEngine(tmp_path / "onnx", device="cpu").mouth == mouth_config().mouth


def test_bench_times_the_mouth_step_of_a_model_with_the_warp():
    from bench.model import bench_mouth

    r = bench_mouth(make_model(mouth_config()), frames=3, warmup=1)
    assert r["warp"]["frames"] == 3 and r["warp"]["median_ms"] > 0
