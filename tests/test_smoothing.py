"""Steady motion and the neutral pose (issue 19): the One-Euro filter itself, on the tracker's crop box,
on the engine's driving keypoints (every path: split, fused fallback, onnxruntime), and the automatic
choice of the reference frame."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter, OneEuroParams


def _run(f: OneEuroFilter, xs: np.ndarray, rate: float = 30.0) -> np.ndarray:
    return np.stack([f(x, i / rate) for i, x in enumerate(xs)])


# ---------------------------------------------------------------------------------------------- filter


def test_first_sample_passes_and_a_constant_stays_constant():
    f = OneEuroFilter(DEFAULT_PARAMS)
    x = np.array([[0.25, -0.5], [1.0, 2.0]])
    assert np.array_equal(f(x, 0.0), x)
    for i in range(1, 20):
        assert np.allclose(f(x, i / 30), x)


def test_still_signal_is_steadied_and_motion_followed_with_little_lag():
    rng = np.random.default_rng(0)
    n = 300
    # A still face: keypoint noise of 0.003 (0.2 px of a 128-px crop; the bundled model's keypoints
    # shake by about a quarter of that on a still real face).
    noise = rng.normal(0, 0.003, (n, 4))
    still = _run(OneEuroFilter(DEFAULT_PARAMS), noise)
    assert still[30:].std() < 0.5 * noise[30:].std()
    shake = np.diff(still[30:], 2, axis=0).std() / np.diff(noise[30:], 2, axis=0).std()
    assert shake < 0.3  # the frame-to-frame shake (second difference) drops to under a third

    # A steady motion of 0.6 units per second (a head turn, in keypoint units): the lag in frames.
    t = np.arange(n) / 30.0
    ramp = 0.6 * t[:, None] * np.ones((1, 4))

    def lag(params: OneEuroParams) -> float:
        out = _run(OneEuroFilter(params), ramp)
        return float((ramp[100:] - out[100:]).mean() / (0.6 / 30.0))

    fixed = lag(OneEuroParams(DEFAULT_PARAMS.min_cutoff, beta=0.0))  # a plain low-pass filter
    adaptive = lag(DEFAULT_PARAMS)
    assert fixed > 3.0  # the plain filter trails by several frames ...
    assert adaptive < 1.0 < fixed  # ... the speed-adaptive one by less than a frame


def test_time_comes_from_the_caller_or_a_frame_clock():
    rng = np.random.default_rng(1)
    xs = rng.normal(0, 1, (40, 3))
    by_clock = _run(OneEuroFilter(DEFAULT_PARAMS, rate=30.0), xs)
    implicit = OneEuroFilter(DEFAULT_PARAMS, rate=30.0)
    assert np.allclose(np.stack([implicit(x) for x in xs]), by_clock)
    faster = _run(OneEuroFilter(DEFAULT_PARAMS), xs, rate=120.0)  # same samples 4x closer in time
    assert not np.allclose(faster, by_clock)
    f = OneEuroFilter(DEFAULT_PARAMS)
    f(xs[0], 1.0)
    assert np.isfinite(f(xs[1], 1.0)).all()  # a repeated timestamp does not divide by zero


@pytest.mark.parametrize(
    "kwargs", [{"min_cutoff": 0.0}, {"min_cutoff": -1.0}, {"beta": -0.1}, {"d_cutoff": 0.0}, {"beta": np.nan}]
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        OneEuroParams(**kwargs)


# ------------------------------------------------------------------------------------------- crop box


def _shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    import cv2

    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, m, (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)


def test_one_euro_box_follows_a_moving_head_closer_than_the_average(astronaut):
    """The same drifting head through the old tracker (fixed average) and the One-Euro one: the One-Euro
    box trails the moving head by less, and once the head stops its crop is still again."""
    from dagan.face import FaceDetector, FaceTracker, square_box

    with FaceDetector() as det:
        # 6 px a frame (a head turning at a natural speed, ~40 % of the face box a second)
        frames = [_shift(astronaut, 6.0 * i, 0.0) for i in range(16)]
        raw = [square_box(det.detect(f)[0], f.shape).cx for f in frames]
        lags = {}
        for name, params in (("average", None), ("one-euro", DEFAULT_PARAMS)):
            tracker = FaceTracker(out_size=64, detector=det, box_filter=params)
            boxes = [tracker.update(f, i / 30)[1].cx for i, f in enumerate(frames)]
            lags[name] = float(np.mean(np.array(raw[8:]) - np.array(boxes[8:])))
            if params is not None:  # the head stops: within 20 frames a bit-identical box again
                still = [tracker.update(frames[-1], (16 + i) / 30)[1] for i in range(25)]
                assert len(set(still[-5:])) == 1
        # both include the dead zone's fixed offset (1.2 % of the box, ~5 px here); the average adds
        # 1.5 frames of lag on top, the One-Euro filter a fraction of one
        assert lags["one-euro"] < 0.6 * lags["average"], lags


# ------------------------------------------------------------------------------------------- keypoints


@pytest.fixture(scope="module")
def model():
    from dagan.config import load_config

    m = make_model(load_config("tiny"), seed=3)
    with torch.no_grad():
        m.generator.final.weight.mul_(10.0)  # spread the outputs so comparisons are meaningful
    return m


@pytest.fixture
def engine(model):
    from engine.torch_backend import TorchEngine

    return TorchEngine(model, device="cpu")


def _frames(n: int, seed: int = 0, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


PASS_THROUGH = OneEuroParams(min_cutoff=1e9)  # α = 1: the filter changes nothing


@pytest.mark.parametrize("relative", [True, False])
def test_filtered_paths_render_what_the_fused_graph_renders(engine, relative):
    """A pass-through filter sends the stream through the split path (keypoints → host → generator) and
    the fused fallback (moved references); both must give the fused graph's pictures."""
    src, frames = _frames(1, 5)[0], _frames(4, 6)
    plain = engine.new_session(src, relative=relative)
    split = engine.new_session(src, relative=relative)
    fallback = engine.new_session(src, relative=relative)
    split.kp_filter = OneEuroFilter(PASS_THROUGH)
    fallback.kp_filter = OneEuroFilter(PASS_THROUGH)
    render = engine._render
    for f in frames:
        a, _ = engine.predict_batch([plain], [f])
        b, _ = engine.predict_batch([split], [f])
        engine._render = lambda feed: None  # a backend without a generator graph (TensorRT)
        try:
            c, _ = engine.predict_batch([fallback], [f])
        finally:
            engine._render = render
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    # and in one batch with an unfiltered stream
    both = engine.animate_batch([plain, split], [frames[0], frames[0]])
    assert np.abs(both[0].image.astype(int) - both[1].image.astype(int)).max() <= 1


def test_fallback_renders_filtered_keypoints_like_the_split_path(engine):
    """With a real filter the fused fallback must render the same filtered motion as the split path."""
    src, frames = _frames(1, 7)[0], _frames(6, 8)
    split, fallback = engine.new_session(src, relative=True), engine.new_session(src, relative=True)
    split.kp_filter, fallback.kp_filter = OneEuroFilter(DEFAULT_PARAMS), OneEuroFilter(DEFAULT_PARAMS)
    render = engine._render
    for f in frames:
        a, _ = engine.predict_batch([split], [f])
        engine._render = lambda feed: None
        try:
            b, _ = engine.predict_batch([fallback], [f])
        finally:
            engine._render = render
        assert torch.allclose(a, b, atol=1e-4)


def test_keypoint_filter_steadies_a_shaking_still_driver(engine):
    """The same driving picture with sensor noise: the filtered avatar changes less from frame to frame."""
    rng = np.random.default_rng(2)
    base = _frames(1, 9)[0].astype(np.float32)
    frames = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    src = _frames(1, 10)[0]

    def shake(kp_filter) -> float:
        s = engine.new_session(src, relative=True)
        s.kp_filter = kp_filter
        out = []
        for i, f in enumerate(frames):
            s.frame_time = i / 30
            out.append(engine.animate_batch([s], [f])[0].image.astype(np.float32))
        return float(np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(out[10:])]))

    raw, steady = shake(None), shake(OneEuroFilter(DEFAULT_PARAMS))
    assert steady < 0.6 * raw, (raw, steady)


def _noisy_lips(n: int, seed: int = 3) -> torch.Tensor:
    """n frames of 1×15×2 keypoints of a still head with sensor noise whose inner lips (7, 8) open and
    close three times a second (a talking mouth), at 15 fps like a CPU stream."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.5, 0.5, (15, 2))
    base[7], base[8] = (0.0, 0.30), (0.0, 0.34)
    kp = np.repeat(base[None], n, axis=0) + rng.normal(0, 0.003, (n, 15, 2))
    kp[:, 8, 1] += 0.03 * np.clip(np.sin(2 * np.pi * 3.0 * np.arange(n) / 15.0), 0, None)
    return torch.from_numpy(kp).float().unsqueeze(1)


def test_lip_gap_passes_the_keypoint_filter_as_detected():
    """With the model's lip keypoints named, every frame's filtered lips keep the detected upper→lower
    vector exactly, centred on a midpoint that is steadied like the rest of the face; the other keypoints
    are filtered exactly as without the rule; a stream without a filter is left alone."""
    from dagan.nets.keypoints import Keypoints
    from engine.base import Session
    from engine.hot_path import filter_keypoints

    track = _noisy_lips(60)
    plain, lips = Session(source=None), Session(source=None)
    plain.kp_filter, lips.kp_filter = OneEuroFilter(DEFAULT_PARAMS), OneEuroFilter(DEFAULT_PARAMS)
    bare = Session(source=None)
    mids, raw_mids, plain_gaps = [], [], []
    for i, kp in enumerate(track):
        plain.frame_time = lips.frame_time = i / 15.0
        a = filter_keypoints([plain], Keypoints(kp, None)).value
        b = filter_keypoints([lips], Keypoints(kp, None), mouth=(7, 8)).value
        assert torch.allclose(b[0, 8] - b[0, 7], kp[0, 8] - kp[0, 7], atol=1e-6)  # the gap as detected
        others = [k for k in range(15) if k not in (7, 8)]
        assert torch.allclose(a[0, others], b[0, others], atol=1e-6)
        assert torch.equal(filter_keypoints([bare], Keypoints(kp, None), mouth=(7, 8)).value, kp)
        mids.append(0.5 * (b[0, 7] + b[0, 8]))
        raw_mids.append(0.5 * (kp[0, 7] + kp[0, 8]))
        plain_gaps.append(float(a[0, 8, 1] - a[0, 7, 1]))
    # without the rule the filter shrinks each syllable's opening; with it the opening is the detected one
    opening = (track[:, 0, 8, 1] - track[:, 0, 7, 1]).numpy()
    assert np.ptp(plain_gaps[15:]) < 0.8 * np.ptp(opening[15:])
    shake = np.diff(torch.stack(mids).numpy(), 2, axis=0).std()
    assert shake < 0.5 * np.diff(torch.stack(raw_mids).numpy(), 2, axis=0).std()  # the midpoint steadied


def test_engine_filters_the_lips_by_the_rule(engine, monkeypatch):
    """The engine's filtered path hands the model's lip keypoints to the rule: a stream of a model that
    names its lips renders the keypoints filter_keypoints gives with them."""
    import engine.hot_path as hp

    seen = []
    real = hp.filter_keypoints
    monkeypatch.setattr(
        hp, "filter_keypoints", lambda s, kp, mouth=(): seen.append(mouth) or real(s, kp, mouth)
    )
    monkeypatch.setattr(engine, "mouth_keypoints", (7, 8))
    s = engine.new_session(_frames(1, 15)[0], relative=True)
    s.kp_filter = OneEuroFilter(DEFAULT_PARAMS)
    engine.animate_batch([s], _frames(1, 16))
    assert seen == [(7, 8)]


def test_onnxruntime_filtered_stream_matches_torch(model, engine, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.onnx_backend import OnnxRuntimeEngine
    from export.onnx_export import export_model

    export_model(model, tmp_path / "onnx", progress=False)
    ort = OnnxRuntimeEngine(tmp_path / "onnx", device="cpu")
    src, frames = _frames(1, 11)[0], _frames(5, 12)
    a, b = engine.new_session(src, relative=True), ort.new_session(src, relative=True)
    a.kp_filter, b.kp_filter = OneEuroFilter(DEFAULT_PARAMS), OneEuroFilter(DEFAULT_PARAMS)
    for i, f in enumerate(frames):
        a.frame_time = b.frame_time = i / 30
        x, y = engine.animate_batch([a], [f])[0], ort.animate_batch([b], [f])[0]
        assert np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 2
    assert "generator" in ort.runner.sessions  # it ran the split path, not the fused fallback


# -------------------------------------------------------------------------------------- neutral pose


def test_auto_neutral_picks_the_frame_closest_to_the_photo(engine):
    """Driving frames of other faces, then the photo itself, then others again: within the window the
    reference becomes the photo's frame (distance 0), and after the window it no longer changes."""
    from engine.hot_path import neutral_distance

    src = _frames(1, 13)[0]
    others = _frames(6, 14)
    session = engine.new_session(src, relative=True)
    session.choose_neutral_automatically(seconds=1.0)
    sequence = [others[0], others[1], src, others[2]]
    for i, f in enumerate(sequence):
        session.frame_time = i * 0.1
        engine.animate_batch([session], [f])
    kp_src = session.source.kp.value[0]
    assert neutral_distance(session.reference.value[0], kp_src) < 1e-6
    # the window (1 s) is over: a frame as close as the photo's does not move the reference any more
    chosen = session.reference
    session.frame_time = 2.0
    engine.animate_batch([session], [others[3]])
    session.frame_time = 2.1
    engine.animate_batch([session], [src])
    assert session.auto_neutral.done and session.reference is chosen


def test_recalibrate_ends_the_automatic_choice_unless_asked_again(engine):
    src = _frames(1, 15)[0]
    others = _frames(3, 16)
    session = engine.new_session(src, relative=True)
    session.choose_neutral_automatically(seconds=5.0)
    session.frame_time = 0.0
    engine.animate_batch([session], [others[0]])
    session.reset_reference()  # the person chose: the next frame is the neutral pose, and stays it
    session.frame_time = 0.1
    engine.animate_batch([session], [others[1]])
    manual = session.reference
    session.frame_time = 0.2
    engine.animate_batch([session], [src])  # the photo itself, inside the old window: ignored
    assert session.reference is manual and session.auto_neutral.done
    session.reset_reference(auto=True)
    for i, f in enumerate([others[2], src]):
        session.frame_time = 0.3 + 0.1 * i
        engine.animate_batch([session], [f])
    assert neutral_distance_is_zero(session)
    with pytest.raises(ValueError):
        session.choose_neutral_automatically(0)


def neutral_distance_is_zero(session) -> bool:
    from engine.hot_path import neutral_distance

    return neutral_distance(session.reference.value[0], session.source.kp.value[0]) < 1e-6
