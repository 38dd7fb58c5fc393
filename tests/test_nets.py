"""Shapes, invariants and the cached == uncached guarantee of the DaGAN networks."""

from __future__ import annotations

import pytest
import torch
from helpers import make_model

from dagan.config import load_config
from dagan.keypoint_ops import convex_hull_area, movement_scale, relative_keypoints
from dagan.model import DaGAN
from dagan.nets.attention import CrossModalAttention, attention_fused, attention_math
from dagan.nets.blocks import AntiAliasInterpolation2d, Hourglass, inverse_2x2, make_coordinate_grid
from dagan.nets.dense_motion import DenseMotionNetwork
from dagan.nets.discriminator import discriminator_from_config
from dagan.nets.keypoints import Keypoints


def _inputs(size: int, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 3, size, size, generator=g)


@pytest.mark.parametrize("preset", ["tiny", "live-128", "vox-256"])
def test_every_net_shape(preset):
    cfg = load_config(preset)
    model = make_model(cfg)
    s, k = cfg.image_size, cfg.keypoints.num_kp
    src, drv = _inputs(s)
    with torch.no_grad():
        depth = model.estimate_depth(src)
        assert depth.shape == (1, 1, s, s)
        assert depth.min() > 0 and depth.max() < 1
        kp = model.detect_keypoints(src, depth)
        assert kp.value.shape == (1, k, 2) and kp.jacobian.shape == (1, k, 2, 2)
        assert kp.value.abs().max() <= 1.0
        state = model.encode_source(src)
        feat = cfg.generator.block_expansion * 2**cfg.generator.num_down_blocks
        fs = s // 2**cfg.generator.num_down_blocks
        assert state.features.features.shape == (1, min(feat, cfg.generator.max_features), fs, fs)
        assert state.features.query.shape == (1, fs * fs, cfg.generator.attention.qk_channels)
        out = model(src, drv)
        assert out.prediction.shape == (1, 3, s, s)
        assert out.prediction.min() >= 0 and out.prediction.max() <= 1
        assert out.generator.deformation.shape == (1, fs, fs, 2)
        assert out.generator.occlusion.shape == (1, 1, fs, fs)
        ms = int(s * cfg.generator.dense_motion.scale_factor)
        assert out.generator.mask.shape == (1, k + 1, ms, ms)
        disc = discriminator_from_config(cfg.discriminator).eval()
        feats, scores = disc(out.prediction)[1.0]
        assert len(feats) == cfg.discriminator.num_blocks and scores.shape[1] == 1
        if preset == "vox-256":
            assert scores.shape == (1, 1, 26, 26)  # paper Fig. 11h


@pytest.mark.parametrize("preset", ["tiny", "live-128", "vox-256"])
def test_cached_path_equals_uncached_forward(preset):
    cfg = load_config(preset)
    model = make_model(cfg)
    src, drv = _inputs(cfg.image_size, batch=2 if preset == "tiny" else 1)
    with torch.no_grad():
        full = model(src, drv)
        state = model.encode_source(src)
        cached = model.animate(state, drv)
        cached_again = model.animate(state, drv)  # the cache must not be consumed or mutated
    err = (full.prediction - cached.prediction).abs().max().item()
    assert err <= 1e-5, err
    assert torch.equal(cached.prediction, cached_again.prediction)
    assert torch.allclose(full.kp_driving.value, cached.kp_driving.value, atol=1e-6)


def test_warped_skips_carry_the_photo_through_the_motion():
    """live-128's skip maps: one per encoder level, each reaching the output, each warped by the motion."""
    cfg = load_config("live-128")
    model = make_model(cfg)
    src, _ = _inputs(cfg.image_size)
    with torch.no_grad():
        state = model.encode_source(src)
        skips = state.features.skips
        assert [tuple(t.shape) for t in skips] == [(1, 16, 128, 128), (1, 32, 64, 64)]
        base = model.render(state, state.kp).prediction
        for level in range(len(skips)):
            poked = list(skips)
            poked[level] = poked[level] + 1.0
            feats = state.features._replace(skips=tuple(poked))
            out = model.generator.decode(feats, state.kp, state.kp).prediction
            assert (out - base).abs().max() > 1e-4, f"skip level {level} does not reach the output"
        # a pure shift of every keypoint shifts the full-resolution skip by the same flow
        moved = Keypoints(state.kp.value + 0.25, state.kp.jacobian)
        motion = model.generator.dense_motion_network(state.features.motion, moved, state.kp)
        warped = model.generator._warp(skips[0], motion.deformation, None)
        flow = torch.nn.functional.interpolate(
            motion.deformation.permute(0, 3, 1, 2), size=(128, 128), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
        ref = torch.nn.functional.grid_sample(skips[0], flow, align_corners=True)
        assert torch.allclose(warped, ref, atol=1e-6)
        assert (warped - skips[0]).abs().mean() > 1e-3
    assert not load_config("vox-256").generator.warped_skips  # the published layout stays


def test_output_follows_driving_keypoints(tiny_model):
    """Moving the driving keypoints must move the output: the generator is not a copy of the source."""
    src, _ = _inputs(64)
    with torch.no_grad():
        state = tiny_model.encode_source(src)
        still = tiny_model.render(state, state.kp).prediction
        moved_kp = Keypoints(state.kp.value + 0.3, state.kp.jacobian)
        moved = tiny_model.render(state, moved_kp)
    assert (still - moved.prediction).abs().max() > 1e-3
    # the dense flow near the image centre now points 0.3 away (source sampled at z - 0.3)
    flow = moved.deformation[0] - make_coordinate_grid(16, 16)
    assert flow.mean().item() == pytest.approx(-0.3, abs=0.05)


@pytest.mark.parametrize("n", [256, 4096])
def test_fused_attention_equals_softmax_formula(n):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, n, 32, generator=g)
    k = torch.randn(2, n, 32, generator=g)
    v = torch.randn(2, n, 256 if n == 256 else 64, generator=g)
    ref = attention_math(q, k, v)
    assert torch.allclose(attention_fused(q, k, v), ref, atol=2e-5, rtol=1e-4)
    # and the reference really is softmax(QK^T)V (no 1/sqrt(d) scaling: eq. 9 has none)
    manual = torch.softmax(q[0] @ k[0].T, dim=-1) @ v[0]
    assert torch.allclose(ref[0], manual, atol=1e-5)


def test_attention_module_implementations_agree_and_gate_starts_closed():
    torch.manual_seed(0)
    fused = CrossModalAttention(32, 8, "auto")
    math = CrossModalAttention(32, 8, "math")
    math.load_state_dict(fused.state_dict())
    depth_f, warped = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    assert torch.equal(fused(depth_f, warped), warped)  # gamma = 0 at init: F_g == F_w
    with torch.no_grad():
        fused.gamma.fill_(1.0)
        math.gamma.fill_(1.0)
    a, b = fused(depth_f, warped), math(depth_f, warped)
    assert not torch.allclose(a, warped)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        CrossModalAttention(32, 8, "flash")


@pytest.mark.parametrize("pool", [2, 4])
def test_pooled_keys_are_eq9_over_the_pooled_warped_map(pool):
    """kv_pool: every query attends over the average-pooled F_w (eq. 9 with N/pool² keys), the result
    keeps F_w's size, and with no activation it equals pooling the projected keys and values."""
    torch.manual_seed(0)
    full = CrossModalAttention(32, 8, "math")
    pooled = CrossModalAttention(32, 8, "auto", kv_pool=pool)
    pooled.load_state_dict(full.state_dict())
    with torch.no_grad():
        full.gamma.fill_(1.0)
        pooled.gamma.fill_(1.0)
    depth_f, warped = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    out = pooled(depth_f, warped)
    assert out.shape == warped.shape
    q = full.project_query(depth_f)
    small = torch.nn.functional.avg_pool2d(warped, pool)
    k = full.key_conv(small).flatten(2).transpose(1, 2)
    v = full.value_conv(small).flatten(2).transpose(1, 2)
    ref = warped + attention_math(q, k, v).transpose(1, 2).reshape(warped.shape)
    assert torch.allclose(out, ref, atol=1e-5)
    k_after = torch.nn.functional.avg_pool2d(full.key_conv(warped), pool).flatten(2).transpose(1, 2)
    assert torch.allclose(k, k_after, atol=1e-5)  # linear projection: pooling commutes with it
    assert not torch.allclose(out, full(depth_f, warped), atol=1e-3)  # it is a different attention
    with pytest.raises(ValueError, match="kv_pool"):
        CrossModalAttention(32, 8, kv_pool=0)


def test_attention_config_switch_selects_implementation(tiny_config):
    cfg = tiny_config.replace(**{"generator.attention.implementation": "math"})
    a, b = make_model(tiny_config), make_model(cfg)
    assert b.generator.attention.implementation == "math"
    src, drv = _inputs(64)
    with torch.no_grad():
        assert torch.allclose(a(src, drv).prediction, b(src, drv).prediction, atol=1e-5)


def test_ablation_switches(tiny_config):
    src, drv = _inputs(64)
    no_kp_depth = make_model(tiny_config.replace(**{"keypoints.use_depth": False}))
    assert no_kp_depth.kp_detector.predictor.encoder.down_blocks[0].conv.in_channels == 3
    assert no_kp_depth.depth_net is not None  # attention still needs depth
    no_attn = make_model(tiny_config.replace(**{"generator.attention.enabled": False}))
    assert no_attn.generator.attention is None and no_attn.generator.depth_encoder is None
    fomm = make_model(
        tiny_config.replace(**{"generator.attention.enabled": False, "keypoints.use_depth": False})
    )
    assert fomm.depth_net is None and not fomm.needs_depth
    full = make_model(tiny_config)
    n = {m: sum(p.numel() for p in x.parameters()) for m, x in [("full", full), ("fomm", fomm)]}
    assert n["fomm"] < n["full"]
    for model in (no_kp_depth, no_attn, fomm):
        with torch.no_grad():
            state = model.encode_source(src)
            err = (model(src, drv).prediction - model.animate(state, drv).prediction).abs().max()
        assert err <= 1e-5


def test_keypoint_jacobians_start_at_identity(tiny_model):
    with torch.no_grad():
        kp = tiny_model.detect_keypoints(*(lambda s: (s, tiny_model.estimate_depth(s)))(_inputs(64)[0]))
    eye = torch.eye(2).expand_as(kp.jacobian)
    assert torch.allclose(kp.jacobian, eye, atol=1e-6)
    no_jac = DaGAN(load_config("tiny").replace(**{"keypoints.estimate_jacobian": False})).eval()
    with torch.no_grad():
        src = _inputs(64)[0]
        assert no_jac.detect_keypoints(src, no_jac.estimate_depth(src)).jacobian is None
        assert no_jac(src, src).prediction.shape == (1, 3, 64, 64)


def test_identical_keypoints_give_identity_flow():
    """kp_d == kp_s with equal Jacobians: every candidate motion is the identity, whatever the mask."""
    torch.manual_seed(0)
    net = DenseMotionNetwork(
        num_kp=5, block_expansion=8, max_features=32, num_blocks=2, scale_factor=0.5
    ).eval()
    img = torch.rand(2, 3, 32, 32)
    jac = torch.eye(2).repeat(2, 5, 1, 1) + 0.1 * torch.randn(2, 5, 2, 2)
    kp = Keypoints(torch.rand(2, 5, 2) * 2 - 1, jac)
    with torch.no_grad():
        out = net(net.prepare_source(img, kp), kp, kp)
    grid = make_coordinate_grid(16, 16)
    assert torch.allclose(out.deformation, grid.expand(2, 16, 16, 2), atol=1e-5)
    assert torch.allclose(out.mask.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    # a translated driving keypoint moves the flow near it by the opposite offset
    shifted = Keypoints(kp.value + 0.2, jac)
    with torch.no_grad():
        motions = net.sparse_motions(16, 16, shifted, kp)
    assert torch.allclose(motions[:, 1:] - grid, torch.full_like(motions[:, 1:], -0.2), atol=1e-5)


def test_blocks():
    x = torch.rand(2, 3, 64, 64)
    down = AntiAliasInterpolation2d(3, 0.25)
    y = down(x)
    assert y.shape == (2, 3, 16, 16)
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(down(flat)[:, :, 2:-2, 2:-2], torch.full((1, 3, 12, 12), 0.3), atol=1e-6)
    assert AntiAliasInterpolation2d(3, 1.0)(x) is x
    with pytest.raises(ValueError):
        AntiAliasInterpolation2d(3, 0.3)
    hg = Hourglass(8, 5, num_blocks=3, max_features=32)
    assert hg(torch.rand(1, 5, 32, 32)).shape == (1, 13, 32, 32)
    m = torch.randn(4, 2, 2) + 3 * torch.eye(2)
    assert torch.allclose(inverse_2x2(m), torch.linalg.inv(m), atol=1e-5)


def test_convex_hull_and_relative_motion():
    square = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, 0.0], [0.2, -0.3]]])
    assert convex_hull_area(square).item() == pytest.approx(4.0)
    assert convex_hull_area(square * 0.5).item() == pytest.approx(1.0)
    jac = torch.eye(2).expand(1, 6, 2, 2)
    kp_s = Keypoints(square * 0.5, jac * 1.5)
    kp_ref = Keypoints(square, jac)
    scale = movement_scale(kp_s, kp_ref)
    assert scale.item() == pytest.approx(0.5)
    # driver at its reference pose: the source keeps its own keypoints
    same = relative_keypoints(kp_s, kp_ref, kp_ref, scale)
    assert torch.allclose(same.value, kp_s.value) and torch.allclose(same.jacobian, kp_s.jacobian)
    moved = relative_keypoints(kp_s, Keypoints(square + 0.4, jac), kp_ref, scale)
    assert torch.allclose(moved.value - kp_s.value, torch.full_like(kp_s.value, 0.2))


def test_reference_compatibility_switches(tiny_config):
    """activation=relu and warp_align_corners=false (set by the DaGAN import) change the computation and
    keep the cached path exact."""
    src, drv = _inputs(64)
    base = make_model(tiny_config)
    relu = make_model(tiny_config.replace(**{"generator.attention.activation": "relu"}))
    corners = make_model(tiny_config.replace(**{"generator.warp_align_corners": False}))
    assert relu.generator.attention.relu and not corners.generator.warp_align_corners
    assert not corners.generator.dense_motion_network.align_corners
    with torch.no_grad():
        ref = base(src, drv).prediction
        for model in (relu, corners):
            out = model(src, drv).prediction
            assert (out - ref).abs().max() > 1e-5
            assert (out - model.animate(model.encode_source(src), drv).prediction).abs().max() <= 1e-5
    # the ReLU applies to q, k and v: with it, no query entry is negative
    with torch.no_grad():
        q = relu.generator.attention.project_query(torch.randn(1, 32, 16, 16))
    assert q.min() >= 0
    with pytest.raises(ValueError):
        CrossModalAttention(8, 4, activation="gelu")
