"""Blinks: the lid reader, the blink state, the lid warp, and how the engine and training use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.blink import LidState, close_lids, eye_shapes
from dagan.config import BlinkConfig, ConfigError, config_from_dict, load_config, set_dotted, to_plain
from dagan.nets.lid_reader import PATCH_COLS, PATCH_ROWS, LidReader, eye_patches

SIZE = 64
SKIN, EYE = 0.8, 0.1
# (left corner x, right corner x, y, half-height) of the image-left and image-right eye
EYE_BOXES = ((14.0, 26.0, 28.0, 3.0), (38.0, 50.0, 28.0, 3.0))


def blink_config(**changes):
    """The tiny preset with keypoints 0–3 named the lids, so it carries a lid reader."""
    return config_from_dict(
        set_dotted(to_plain(load_config("tiny")), {"blink.keypoints": [0, 1, 2, 3], **changes})
    )


def synthetic_landmarks() -> np.ndarray:
    """478×2 landmarks whose eyes are the almond shapes of EYE_BOXES (everything else at 0)."""
    from bench.model import almond_eyes

    return almond_eyes(EYE_BOXES)


def eye_image() -> torch.Tensor:
    """1×3×SIZE×SIZE: skin, with the inside of each eye dark."""
    img = torch.full((1, 3, SIZE, SIZE), SKIN)
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    for x0, x1, y, h in EYE_BOXES:
        u = ((xs - x0) / (x1 - x0)).clamp(0, 1)
        inside = (xs > x0) & (xs < x1) & ((ys - y).abs() < h * torch.sin(np.pi * u) - 0.5)
        img[0, :, inside] = EYE
    return img


def eye_mask() -> torch.Tensor:
    return eye_image()[0, 0] == EYE


# ------------------------------------------------------------------------------------------ the warp


def test_eye_shapes_reads_corners_and_lid_profiles():
    shapes = eye_shapes(synthetic_landmarks())
    assert torch.allclose(shapes.corner, torch.tensor([[14.0, 28.0], [38.0, 28.0]]))
    assert torch.allclose(shapes.width, torch.tensor([12.0, 12.0]))
    assert torch.allclose(shapes.axis, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    mid = shapes.upper.shape[1] // 2
    # the lids at the eye's middle: 3 px above and below the axis, widened by GROW × width
    assert shapes.upper[:, mid].max() < -3.0 and shapes.lower[:, mid].min() > 3.0
    assert torch.all(shapes.upper[:, 0] == 0) and torch.all(shapes.lower[:, -1] == 0)


def test_closure_zero_returns_the_frame_untouched():
    img = eye_image()
    shapes = [eye_shapes(synthetic_landmarks())]
    out = close_lids(img, shapes, torch.zeros(1, 2), torch.zeros(1, 2, 2))
    assert out is img


def test_closing_covers_the_eye_with_skin_and_leaves_the_rest():
    img, mask = eye_image(), eye_mask()
    shapes = [eye_shapes(synthetic_landmarks())]
    half = close_lids(img, shapes, torch.full((1, 2), 0.5), torch.zeros(1, 2, 2))
    shut = close_lids(img, shapes, torch.ones(1, 2), torch.zeros(1, 2, 2))
    dark = [float((o[0, 0][mask] < 0.45).float().mean()) for o in (img, half, shut)]
    assert dark[0] == 1.0 and 0.2 < dark[1] < 0.8 and dark[2] < 0.1
    # rows well above and below the eyes' bands, and the columns between the eyes, do not move
    for o in (half, shut):
        assert torch.equal(o[..., :18, :], img[..., :18, :]) and torch.equal(o[..., 36:, :], img[..., 36:, :])
        assert torch.equal(o[..., 27:37], img[..., 27:37])


def test_a_blink_is_the_upper_lids():
    # the upper lid comes all the way down to the lower one, which stays: nothing below the eyes' lower
    # lids (y 31, grown by 0.7 px) moves, half shut the eyes' upper half is covered and their lower half
    # is not (the lower lid rising to meet the upper left two lash lines the face mesh read as open)
    img, mask = eye_image(), eye_mask()
    shapes = [eye_shapes(synthetic_landmarks())]
    shut = close_lids(img, shapes, torch.ones(1, 2), torch.zeros(1, 2, 2))
    half = close_lids(img, shapes, torch.full((1, 2), 0.5), torch.zeros(1, 2, 2))
    for o in (shut, half):
        assert torch.equal(o[..., 32:, :], img[..., 32:, :])
    dark = half[0, 0] < 0.45
    assert float(dark[:27][mask[:27]].float().mean()) < 0.2
    assert float(dark[29:][mask[29:]].float().mean()) == 1.0


def test_each_eye_closes_on_its_own_and_where_it_moved():
    img, mask = eye_image(), eye_mask()
    shapes = [eye_shapes(synthetic_landmarks())]
    left_only = close_lids(img, shapes, torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2, 2))
    assert float((left_only[0, 0][:, :32][mask[:, :32]] < 0.45).float().mean()) < 0.1
    assert torch.equal(left_only[..., 32:], img[..., 32:])
    # the photo's eyes where they were, the avatar's drawn 4 px lower: the warp follows the shift
    moved = torch.roll(img, 4, dims=2)
    shift = torch.tensor([[[0.0, 4.0], [0.0, 4.0]]])
    shut = close_lids(moved, shapes, torch.ones(1, 2), shift)
    moved_mask = torch.roll(mask, 4, dims=0)
    assert float((shut[0, 0][moved_mask] < 0.45).float().mean()) < 0.1


def test_widening_opens_the_lids_apart_and_leaves_the_rest():
    img, mask = eye_image(), eye_mask()
    shapes = [eye_shapes(synthetic_landmarks())]
    wide = close_lids(img, shapes, torch.full((1, 2), -0.5), torch.zeros(1, 2, 2))
    dark = (wide[0, 0] < 0.45).float()
    # the eye grows across (its dark area by about half the gap), stays dark inside, moves nowhere else
    assert 1.2 < float(dark.sum()) / float(mask.float().sum()) < 1.8
    assert float(dark[mask].mean()) == 1.0
    assert torch.equal(wide[..., :18, :], img[..., :18, :]) and torch.equal(
        wide[..., 36:, :], img[..., 36:, :]
    )
    assert torch.equal(wide[..., 27:37], img[..., 27:37])


def test_items_without_a_face_mesh_are_left_alone():
    img = eye_image().repeat(2, 1, 1, 1)
    out = close_lids(img, [None, eye_shapes(synthetic_landmarks())], torch.ones(2, 2), torch.zeros(2, 2, 2))
    assert torch.equal(out[0], img[0]) and not torch.equal(out[1], img[1])


# ------------------------------------------------------------------------------------ blink state


def test_closure_follows_the_drop_from_the_drivers_open_eyes():
    state = LidState(eye_shapes(synthetic_landmarks()))
    cfg = BlinkConfig(gain=2.0, dead_zone=0.1, open_seconds=3.0, reference_seconds=0.1, widen=0.0)
    assert state.closure(np.array([0.3, 0.3]), 0.0, cfg) == 0.0  # the first reading is open
    assert state.closure(np.array([0.15, 0.15]), 0.04, cfg) == pytest.approx((0.5 - 0.1) * 2, abs=0.02)
    assert state.closure(np.array([0.0, 0.0]), 0.08, cfg) == 1.0
    assert state.closure(np.array([0.28, 0.28]), 0.12, cfg) == 0.0  # inside the dead zone
    # wider than at the reference: no blink, and the eyes as at the reference are still open after it
    assert state.closure(np.array([0.4, 0.4]), 0.16, cfg) == 0.0  # widen 0: the warp only closes
    assert state.open_reading == pytest.approx([0.3, 0.3])
    assert state.closure(np.array([0.3, 0.3]), 0.20, cfg) == 0.0
    assert state.closure(np.array([0.2, 0.2]), 0.24, cfg) > 0.2
    # a lower reading held long (a change of gaze, the reader's drift) becomes the open eyes
    t = 0.24
    for _ in range(200):
        t += 0.1
        c = state.closure(np.array([0.2, 0.2]), t, cfg)
    assert c == 0.0


def test_the_reference_is_the_widest_reading_of_its_first_moments():
    state = LidState(eye_shapes(synthetic_landmarks()))
    cfg = BlinkConfig(gain=2.0, dead_zone=0.0, open_seconds=3.0, reference_seconds=0.5, widen=0.4)
    state.closure(np.array([0.1, 0.1]), 0.0, cfg)  # the stream starts mid-blink
    assert state.closure(np.array([0.3, 0.3]), 0.2, cfg) == 0.0  # inside the window: the new reference
    assert state.reference == pytest.approx([0.3, 0.3])
    assert state.closure(np.array([0.1, 0.1]), 0.3, cfg) == 1.0  # a blink, against 0.3
    # a change too small to move a lid by a tenth of a pixel is not drawn (the frame skips the warp)
    assert state.closure(np.array([0.3015, 0.3015]), 0.9, cfg) == 0.0  # −0.01
    # after the window a wider reading widens the avatar's eyes, by at most blink.widen
    assert state.closure(np.array([0.33, 0.33]), 1.0, cfg) == pytest.approx(-0.2)
    assert state.closure(np.array([0.6, 0.6]), 1.1, cfg) == pytest.approx(-0.4)
    assert state.reference == pytest.approx([0.3, 0.3])
    # a recalibration learns the driver's eyes anew from the next reading
    state.reset()
    assert state.closure(np.array([0.6, 0.6]), 2.0, cfg) == 0.0
    assert state.closure(np.array([0.1, 0.1]), 2.1, cfg) == 1.0  # a blink, against 0.6


def test_recalibrating_a_stream_learns_the_drivers_eyes_anew():
    from engine.base import Session

    session = Session(source=None, relative=True, lids=LidState(eye_shapes(synthetic_landmarks())))
    session.lids.closure(np.array([0.3, 0.3]), 0.0, BlinkConfig())
    session.reset_reference()
    assert session.lids.reference is None and session.lids.open_reading is None


def test_both_eyes_count_together():
    state = LidState(eye_shapes(synthetic_landmarks()))
    cfg = BlinkConfig(gain=2.0, dead_zone=0.0, open_seconds=3.0)
    state.closure(np.array([0.3, 0.3]), 0.0, cfg)
    assert state.closure(np.array([0.15, 0.3]), 0.04, cfg) == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------------ the reader


def test_eye_patches_are_centred_on_the_eyes_and_the_right_one_mirrored():
    img = torch.zeros(1, 3, SIZE, SIZE)
    kp = torch.zeros(1, 15, 2)
    kp[0, 0:2] = torch.tensor([-0.4, 0.0])  # image-left eye at x = -0.4, y = 0
    kp[0, 2:4] = torch.tensor([0.4, 0.0])
    col = round((0.4 + 1) / 2 * SIZE - 0.5)  # the image-right eye's centre column
    img[0, :, 31:33, col + 2 : col + 4] = 1.0  # a bright spot just right of (outside) the right eye's centre
    img[0, :, 31:33, round((1 - 0.4) / 2 * SIZE - 0.5) + 2 : round((1 - 0.4) / 2 * SIZE - 0.5) + 4] = 1.0
    p = eye_patches(img, kp, (0, 1, 2, 3))
    assert p.shape == (1, 2, 3, PATCH_ROWS, PATCH_COLS)
    rows = slice(PATCH_ROWS // 2 - 2, PATCH_ROWS // 2 + 2)
    left_half, right_half = slice(0, PATCH_COLS // 2), slice(PATCH_COLS // 2, PATCH_COLS)
    # on the image-left eye the spot is right of centre; mirrored on the image-right eye, left of it
    assert p[0, 0, 0, rows, right_half].max() > 0.5 and p[0, 0, 0, rows, left_half].max() == 0
    assert p[0, 1, 0, rows, left_half].max() > 0.5 and p[0, 1, 0, rows, right_half].max() == 0


def test_lid_reader_reads_two_eyes_per_item():
    reader = LidReader((0, 1, 2, 3)).eval()
    out = reader(torch.rand(3, 3, SIZE, SIZE), torch.rand(3, 15, 2) - 0.5)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="four"):
        LidReader((0, 1))


def test_blink_config_is_checked():
    cfg = blink_config()
    assert cfg.blink.keypoints == (0, 1, 2, 3)
    for bad, key in (
        ({"blink.keypoints": [0, 1, 2]}, "blink.keypoints"),
        ({"blink.keypoints": [0, 1, 1, 2]}, "blink.keypoints"),
        ({"blink.keypoints": [0, 1, 2, 15]}, "blink.keypoints"),
        ({"blink.gain": 0}, "blink.gain"),
        ({"blink.dead_zone": 1.0}, "blink.dead_zone"),
        ({"blink.open_seconds": 0}, "blink.open_seconds"),
        ({"blink.widen": 1.5}, "blink.widen"),
        ({"blink.reference_seconds": -1}, "blink.reference_seconds"),
    ):
        with pytest.raises(ConfigError, match=key):
            blink_config(**bad)


def test_only_a_model_that_names_its_lids_has_a_reader():
    assert make_model(load_config("tiny")).lid_reader is None
    assert not any(k.startswith("lid_reader.") for k in make_model(load_config("tiny")).state_dict())
    model = make_model(blink_config())
    assert model.lid_reader is not None and model.lid_reader.lids == (0, 1, 2, 3)


# ------------------------------------------------------------------------------------ the engine


class ScriptedReader(torch.nn.Module):
    """A lid reader that reads the next of ``readings`` each call (B = 1)."""

    lids = (0, 1, 2, 3)

    def __init__(self, readings: list[float]) -> None:
        super().__init__()
        self.readings = list(readings)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        r = self.readings.pop(0)
        return torch.full((images.shape[0], 2), r)


def _engine_pair(monkeypatch):
    """A torch engine of a blinking tiny model whose photo mesh is the synthetic one."""
    import dagan.face
    from engine.torch_backend import TorchEngine

    monkeypatch.setattr(
        dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: synthetic_landmarks()
    )
    engine = TorchEngine(make_model(blink_config()), device="cpu")
    rng = np.random.default_rng(0)
    src = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    frames = [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(3)]
    return engine, src, frames


def test_engine_closes_the_avatars_lids_when_the_driver_blinks(monkeypatch):
    engine, src, frames = _engine_pair(monkeypatch)
    engine.lid_reader = ScriptedReader([0.3, 0.3, 0.05])
    run_frame = engine._run_frame

    def textured(feed):  # the random tiny generator draws a flat grey: show the driving frame instead
        return {**run_frame(feed), "prediction": feed["driving"].clone()}

    monkeypatch.setattr(engine, "_run_frame", textured)
    blinking, plain = engine.new_session(src, relative=True), engine.new_session(src, relative=True)
    assert isinstance(blinking.lids, LidState)
    plain.lids = None
    outs = []
    for t in range(3):  # one driving frame three times: the keypoints stay, only the reading changes
        blinking.frame_time = plain.frame_time = t / 25
        a = engine.animate_batch([blinking], [frames[0]])[0].image
        outs.append((a, engine.animate_batch([plain], [frames[0]])[0].image))
    assert np.array_equal(*outs[0]) and np.array_equal(*outs[1])  # open eyes: not one pixel changed
    shut, drawn = outs[2]
    # reading 0.05 against 0.3 open: closure (1 − 0.05 / 0.3) × 2 > 1, so shut, the eyes unmoved
    as_tensor = torch.from_numpy(drawn).permute(2, 0, 1)[None].float() / 255
    expected = close_lids(as_tensor, [blinking.lids.shapes], torch.ones(1, 2), torch.zeros(1, 2, 2))
    expected = (expected[0].permute(1, 2, 0) * 255).round().numpy().astype(int)
    assert np.abs(shut.astype(int) - expected).max() <= 1
    differs = np.abs(shut.astype(int) - drawn.astype(int)).max(axis=2) > 0
    rows = np.nonzero(differs.any(axis=1))[0]
    assert len(rows) and rows.min() >= 15 and rows.max() <= 40  # only around the eyes (y 28 ± the bands)


def test_engine_without_a_face_mesh_on_the_photo_draws_no_blinks(monkeypatch):
    import dagan.face

    engine, src, _ = _engine_pair(monkeypatch)
    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: None)
    assert engine.new_session(src, relative=True).lids is None


def test_export_carries_the_lid_reader_to_every_derived_engine(tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.onnx_backend import OnnxRuntimeEngine
    from export.onnx_export import export_model
    from export.optimize import optimize_export

    model = make_model(blink_config())
    manifest = export_model(model, tmp_path / "onnx", progress=False)
    assert manifest["lid_reader"] == "lid_reader.safetensors"
    optimize_export(tmp_path / "onnx", tmp_path / "cpu")
    for folder in ("onnx", "cpu"):
        engine = OnnxRuntimeEngine(tmp_path / folder, device="cpu")
        assert engine.blink is not None and engine.blink.keypoints == (0, 1, 2, 3)
        for k, v in model.lid_reader.state_dict().items():
            assert torch.equal(engine.lid_reader.state_dict()[k], v)
    plain = export_model(make_model(load_config("tiny")), tmp_path / "plain", progress=False)
    assert (
        "lid_reader" not in plain and OnnxRuntimeEngine(tmp_path / "plain", device="cpu").lid_reader is None
    )


# ------------------------------------------------------------------------------------ training


def test_mesh_openings_put_the_image_left_eye_first():
    from training.lid_reader import mesh_openings

    lm = synthetic_landmarks()[None]
    open_ = mesh_openings(lm)[0]
    assert open_ == pytest.approx([0.5, 0.5], abs=1e-6)  # gap 6 over width 12
    lm2 = lm.copy()
    lm2[0, 386, 1] += 3  # the image-right eye's upper lid halfway down
    assert mesh_openings(lm2)[0] == pytest.approx([0.5, 0.25], abs=1e-6)


def test_train_lids_adds_a_reader_and_keeps_every_other_tensor(tmp_path):
    import imageio.v3 as iio

    from dagan.checkpoint import load_model, read_checkpoint, save_checkpoint
    from training.lid_reader import LidDataError, train_lids

    config = load_config("tiny")
    save_checkpoint(tmp_path / "init.safetensors", config, make_model(config))
    clip = tmp_path / "data" / "train" / "clip_000"
    clip.mkdir(parents=True)
    rng = np.random.default_rng(1)
    tracks = np.repeat(synthetic_landmarks()[None], 6, axis=0)
    tracks[:, [159, 386], 1] += rng.uniform(0, 3, (6, 2))  # blinks of different depth
    np.save(clip / "landmarks478.npy", tracks.astype(np.float16))
    for i in range(6):
        iio.imwrite(clip / f"{i:05d}.png", (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    result = train_lids(
        tmp_path / "init.safetensors", tmp_path / "data" / "train", tmp_path / "out.safetensors",
        (0, 1, 2, 3), test=tmp_path / "data" / "train", steps=3, progress=False,
    )  # fmt: skip
    assert set(result) == {"clip_r", "clip_gain", "mae", "eyes_scored"}
    model = load_model(tmp_path / "out.safetensors")
    assert model.config.blink.keypoints == (0, 1, 2, 3) and model.lid_reader is not None
    _, before, _ = read_checkpoint(tmp_path / "init.safetensors")
    _, after, _ = read_checkpoint(tmp_path / "out.safetensors")
    assert {k for k in after if not k.startswith("lid_reader.")} == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(LidDataError, match="no prepared clip"):
        train_lids(
            tmp_path / "init.safetensors", tmp_path / "nothing", tmp_path / "x.safetensors", (0, 1, 2, 3)
        )


def test_bench_times_the_lid_step_of_a_blinking_model():
    from bench.model import bench_lids

    r = bench_lids(make_model(blink_config()), frames=3, warmup=1)
    assert r["reader"]["frames"] == 3 and r["reader"]["median_ms"] > 0
    assert r["reader_and_warp"]["median_ms"] > 0
    assert 1.0 < r["reader_mflops"] < 20.0  # two 16×24 patches through four small convolutions


def test_engine_without_mediapipe_animates_without_blinks(monkeypatch):
    import dagan.face

    engine, src, frames = _engine_pair(monkeypatch)

    def missing(image, min_size=256):
        raise ImportError("No module named 'mediapipe'")

    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", missing)
    from engine.hot_path import FramePathEngine

    monkeypatch.setattr(FramePathEngine, "_warned_no_mesh", False)
    with pytest.warns(UserWarning, match="will not blink"):
        session = engine.new_session(src, relative=True)
    assert session.lids is None
    assert engine.animate_batch([session], [frames[0]])[0].image.shape == (SIZE, SIZE, 3)


def test_the_upload_says_whether_the_avatar_will_blink(astronaut_jpeg):
    from fastapi.testclient import TestClient

    from engine.torch_backend import TorchEngine
    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(max_sessions=1, sessions_per_minute=1e6, ice_host_addresses=("127.0.0.1",))
    engine = TorchEngine(make_model(blink_config()), device="cpu")
    with TestClient(create_app(settings, engine), base_url="http://127.0.0.1:8000") as client:
        sid = client.post("/api/sessions").json()["id"]
        r = client.put(f"/api/sessions/{sid}/source", files={"file": ("p.jpg", astronaut_jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["blinks"] is True  # a model with a lid reader, a photo whose face mesh is found
        assert client.get("/api/config").json()["blinks"] is True


def test_dagan_train_lids_refuses_bad_input_in_one_line(tmp_path, capsys):
    from commands.cli import main
    from dagan.checkpoint import save_checkpoint

    config = load_config("tiny")
    save_checkpoint(tmp_path / "init.safetensors", config, make_model(config))
    (tmp_path / "empty").mkdir()
    base = [
        "train",
        "lids",
        "--init",
        str(tmp_path / "init.safetensors"),
        "--out",
        str(tmp_path / "o.safetensors"),
    ]
    assert main([*base, "--data", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "dagan: error: no prepared clip" in capsys.readouterr().err
    assert (
        main([*base, "--data", str(tmp_path / "empty"), "--keypoints", "0", "1", "2", "99", "--quiet"]) == 2
    )
    assert "blink.keypoints" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
