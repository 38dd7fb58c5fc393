"""Face depth net, pose net and the view-synthesis geometry used to train them (paper §3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from dagan.nets.depth import DepthDecoder, FaceDepthNet, ResNetEncoder, disp_to_depth
from dagan.nets.pose import (
    PoseNet,
    PoseOutput,
    axisangle_to_matrix,
    backproject,
    intrinsics_matrix,
    inverse_warp,
    project,
    transformation_matrix,
)

# Non-square on purpose: any H/W mix-up changes a shape or a number below.
H, W = 64, 96


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _skew(v: torch.Tensor) -> torch.Tensor:
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    rows = [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)]
    return torch.stack(rows, -2)


# --------------------------------------------------------------------------------------------------
# Encoder / decoder / FaceDepthNet
# --------------------------------------------------------------------------------------------------


def test_resnet18_matches_torchvision_size_and_names() -> None:
    enc = ResNetEncoder(in_channels=3, width=64)
    # torchvision resnet18 has 11,689,512 parameters; its fc layer (512·1000 + 1000) is dropped here.
    assert _n_params(enc) == 11_176_512
    keys = set(enc.state_dict())
    for name in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.conv2.weight",
    ):
        assert name in keys, name
    # torchvision only has a downsample branch where the shortcut changes shape.
    assert "layer1.0.downsample.0.weight" not in keys
    assert "layer3.1.downsample.0.weight" not in keys
    assert enc.num_ch_enc == [64, 64, 128, 256, 512]
    with torch.no_grad():
        feats = enc.eval()(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 128, 128),
        (1, 64, 64, 64),
        (1, 128, 32, 32),
        (1, 256, 16, 16),
        (1, 512, 8, 8),
    ]


def test_encoder_feature_strides_small_width() -> None:
    enc = ResNetEncoder(in_channels=6, width=16)
    assert enc.num_ch_enc == [16, 16, 32, 64, 128]
    feats = enc(torch.randn(2, 6, H, W))
    assert len(feats) == 5
    for i, (f, c) in enumerate(zip(feats, enc.num_ch_enc, strict=True)):
        stride = 2 ** (i + 1)
        assert tuple(f.shape) == (2, c, H // stride, W // stride)


@pytest.mark.parametrize("scales", [[0, 1, 2, 3], [0, 2]])
def test_decoder_scales_and_range(scales: list[int]) -> None:
    enc = ResNetEncoder(width=16)
    dec = DepthDecoder(enc.num_ch_enc, channels=[8, 8, 16, 16, 32], scales=scales)
    out = dec(enc(torch.randn(2, 3, H, W)))
    assert sorted(out) == scales
    for s, d in out.items():
        assert tuple(d.shape) == (2, 1, H // 2**s, W // 2**s)
        assert torch.all(d > 0) and torch.all(d < 1)


def test_face_depth_net_outputs() -> None:
    net = FaceDepthNet(width=16).eval()
    img = torch.rand(2, 3, H, W)
    with torch.no_grad():
        multi = net.forward_multiscale(img)
        disp = net(img)
    assert sorted(multi) == [0, 1, 2, 3]
    for s, d in multi.items():
        assert tuple(d.shape) == (2, 1, H // 2**s, W // 2**s)
        assert torch.all(d > 0) and torch.all(d < 1)
    assert tuple(disp.shape) == (2, 1, H, W)
    torch.testing.assert_close(disp, multi[0])
    # Each image gets its own map (no batch mixing, not a constant).
    assert not torch.allclose(disp[0], disp[1])
    assert disp.std() > 0


def test_face_depth_net_normalises_input() -> None:
    net = FaceDepthNet(width=16).eval()
    seen: list[torch.Tensor] = []
    net.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    img = torch.rand(1, 3, H, W)
    with torch.no_grad():
        net(img)
    torch.testing.assert_close(seen[0], (img - 0.45) / 0.225)


def test_face_depth_net_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        FaceDepthNet(width=16)(torch.rand(1, 3, 48, 64))


def test_half_resolution_depth_is_the_net_on_the_area_downsampled_image_upsampled() -> None:
    """``input_scale`` 0.5: the same weights run on the 2×2-averaged image, the scale-0 disparity comes
    back at H×W (bilinear), the multi-scale outputs are relative to the small image; a size the
    encoder cannot take after downsampling is refused with the reason."""
    half = FaceDepthNet(width=16, input_scale=0.5).eval()
    full = FaceDepthNet(width=16).eval()
    full.load_state_dict(half.state_dict())
    h, w = 128, 192
    img = torch.rand(2, 3, h, w)
    with torch.no_grad():
        disp = half(img)
        small = full(torch.nn.functional.avg_pool2d(img, 2))
        multi = half.forward_multiscale(img)
    assert tuple(disp.shape) == (2, 1, h, w)
    expected = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    torch.testing.assert_close(disp, expected)
    assert tuple(multi[0].shape) == (2, 1, h // 2, w // 2)
    assert tuple(multi[3].shape) == (2, 1, h // 16, w // 16)
    with pytest.raises(ValueError, match=r"after input_scale 0\.5"):
        half(torch.rand(1, 3, 32, 64))
    with pytest.raises(ValueError, match="input_scale"):
        FaceDepthNet(width=16, input_scale=0.3)


def test_disp_to_depth_monotone_and_bounded() -> None:
    min_d, max_d = 0.1, 100.0
    disp = torch.linspace(0.0, 1.0, 1001)
    scaled, depth = disp_to_depth(disp, min_d, max_d)
    assert torch.all(depth[1:] < depth[:-1])  # more disparity = closer
    assert torch.all(scaled[1:] > scaled[:-1])
    assert torch.all(depth >= min_d * (1 - 1e-6)) and torch.all(depth <= max_d * (1 + 1e-6))
    torch.testing.assert_close(depth[0], torch.tensor(max_d))
    torch.testing.assert_close(depth[-1], torch.tensor(min_d))
    torch.testing.assert_close(scaled * depth, torch.ones_like(depth))
    # Same function reachable from the class, and the net's own range is used by .depth().
    net = FaceDepthNet(width=16, min_depth=0.5, max_depth=20.0)
    assert FaceDepthNet.disp_to_depth is disp_to_depth
    torch.testing.assert_close(net.depth(torch.tensor([0.0, 1.0])), torch.tensor([20.0, 0.5]))


# --------------------------------------------------------------------------------------------------
# PoseNet
# --------------------------------------------------------------------------------------------------


def test_pose_net_outputs() -> None:
    net = PoseNet(width=16).eval()
    a, b = torch.rand(3, 3, H, W), torch.rand(3, 3, H, W)
    with torch.no_grad():
        out = net(a, b)
    assert isinstance(out, PoseOutput)
    assert tuple(out.axisangle.shape) == (3, 3)
    assert tuple(out.translation.shape) == (3, 3)
    K = out.intrinsics
    assert tuple(K.shape) == (3, 3, 3)
    assert torch.all(K[:, 1, 0] == 0) and torch.all(K[:, 2, 0] == 0) and torch.all(K[:, 2, 1] == 0)
    assert torch.all(K[:, 0, 1] == 0)  # no skew
    assert torch.all(K[:, 2, 2] == 1)
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    assert torch.all(fx > 0) and torch.all(fy > 0)
    # At initialisation: focal ≈ image size (in pixels of *that* axis), principal point ≈ centre.
    torch.testing.assert_close(fx, torch.full_like(fx, float(W)), rtol=0.05, atol=0.0)
    torch.testing.assert_close(fy, torch.full_like(fy, float(H)), rtol=0.05, atol=0.0)
    torch.testing.assert_close(cx, torch.full_like(cx, W / 2), rtol=0.05, atol=0.0)
    torch.testing.assert_close(cy, torch.full_like(cy, H / 2), rtol=0.05, atol=0.0)
    # Initial motion is small (×0.01 output scaling) but depends on the input.
    assert out.axisangle.abs().max() < 0.1 and out.translation.abs().max() < 0.1
    assert not torch.allclose(out.translation[0], out.translation[1])


def test_pose_net_structure_and_gradients() -> None:
    net = PoseNet(width=16)
    assert net.encoder.conv1.in_channels == 6
    assert net.pose_head.squeeze.out_channels == 64  # 4·width
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, H, W), torch.rand(1, 3, H, W), torch.rand(1, 3, H, W))
    out = net(torch.rand(2, 3, H, W), torch.rand(2, 3, H, W))
    loss = out.axisangle.sum() + out.translation.sum() + out.intrinsics.sum()
    loss.backward()
    for name in ("pose_head.out.weight", "intrinsics_head.fc2.weight", "encoder.conv1.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# Rotations and rigid motions
# --------------------------------------------------------------------------------------------------


def test_axisangle_to_matrix_is_rotation() -> None:
    v = torch.randn(64, 3) * 2.0
    R = axisangle_to_matrix(v)
    eye = torch.eye(3).expand(64, 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64), atol=1e-5, rtol=0)
    # The rotation axis is left fixed.
    torch.testing.assert_close((R @ v[..., None])[..., 0], v, atol=1e-5, rtol=0)


def test_axisangle_matches_matrix_exponential() -> None:
    # Independent reference: exp([v]_x), across tiny, small and large angles.
    v = torch.randn(40, 3, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True) * torch.logspace(-9, 0.5, 40, dtype=torch.float64)[:, None]
    torch.testing.assert_close(axisangle_to_matrix(v), torch.linalg.matrix_exp(_skew(v)), atol=1e-12, rtol=0)


def test_axisangle_identity_at_zero_with_finite_gradient() -> None:
    v = torch.zeros(2, 3, requires_grad=True)
    R = axisangle_to_matrix(v)
    torch.testing.assert_close(R, torch.eye(3).expand(2, 3, 3), atol=0, rtol=0)
    (R * torch.randn(2, 3, 3)).sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    # d/dv of R at 0 is the skew generator, so a random weighting gives a non-zero gradient.
    assert v.grad.abs().sum() > 0


def test_axisangle_90_degrees_about_z() -> None:
    R = axisangle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]]))[0]
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(R, expected, atol=1e-6, rtol=0)
    # x axis goes to y axis (right-handed, counter-clockwise).
    x_axis, y_axis = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(R @ x_axis, y_axis, atol=1e-6, rtol=0)


def test_transformation_matrix_and_inverse() -> None:
    aa, t = torch.randn(5, 3), torch.randn(5, 3)
    T = transformation_matrix(aa, t)
    assert tuple(T.shape) == (5, 4, 4)
    torch.testing.assert_close(T[:, :3, :3], axisangle_to_matrix(aa))
    torch.testing.assert_close(T[:, :3, 3], t)
    torch.testing.assert_close(T[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(5, 4))
    T_inv = transformation_matrix(aa, t, invert=True)
    eye = torch.eye(4).expand(5, 4, 4)
    torch.testing.assert_close(T_inv @ T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(T @ T_inv, eye, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Back-projection, projection, inverse warping
# --------------------------------------------------------------------------------------------------


def _K(batch: int, fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    full = torch.full((batch,), 1.0)
    return intrinsics_matrix(fx * full, fy * full, cx * full, cy * full)


def _identity_T(batch: int) -> torch.Tensor:
    return torch.eye(4).expand(batch, 4, 4).clone()


def test_backproject_project_roundtrip_uses_pixel_centres() -> None:
    K = _K(2, 70.0, 60.0, 45.0, 30.0)
    depth = torch.rand(2, 1, H, W) * 5 + 1
    pts = backproject(depth, torch.linalg.inv(K))
    assert tuple(pts.shape) == (2, 4, H * W)
    torch.testing.assert_close(pts[:, 2], depth.reshape(2, -1))  # z is the depth
    torch.testing.assert_close(pts[:, 3], torch.ones(2, H * W))
    grid = project(pts, K, _identity_T(2), H, W)
    assert tuple(grid.shape) == (2, H, W, 2)
    # align_corners=False: the centre of column j is at (2j + 1)/W − 1; grid[..., 0] is x.
    xs = (2 * torch.arange(W) + 1) / W - 1
    ys = (2 * torch.arange(H) + 1) / H - 1
    torch.testing.assert_close(grid[0, 5, :, 0], xs, atol=1e-5, rtol=0)
    torch.testing.assert_close(grid[1, :, 7, 1], ys, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "atol"),
    # float32 positions carry ~1e-5 px of rounding, which a white-noise image turns into ~1e-5 of
    # intensity; in float64 any half-pixel convention slip would still show up far above 1e-10.
    [(torch.float32, 3e-5), (torch.float64, 1e-10)],
)
def test_inverse_warp_identity_reproduces_source(dtype: torch.dtype, atol: float) -> None:
    src = torch.rand(2, 3, H, W, dtype=dtype)
    depth = torch.rand(2, 1, H, W, dtype=dtype) * 10 + 0.5
    K = _K(2, 80.0, 75.0, 50.0, 33.0).to(dtype)
    warped = inverse_warp(src, depth, _identity_T(2).to(dtype), K)
    assert tuple(warped.shape) == (2, 3, H, W)
    assert warped.dtype == dtype
    torch.testing.assert_close(warped[..., 2:-2, 2:-2], src[..., 2:-2, 2:-2], atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("axis", "shift_px"),
    [(0, 3.0), (0, -4.0), (1, 2.0), (1, -5.0), (0, 2.5)],
)
def test_inverse_warp_pure_translation_shifts_image(axis: int, shift_px: float) -> None:
    # Constant depth d and translation t along x (or y): every target pixel lands f·t/d pixels away
    # in the source, so the warp is a plain image shift. fx ≠ fy catches a swapped focal length.
    fx, fy, d = 80.0, 50.0, 4.0
    f = fx if axis == 0 else fy
    t = shift_px * d / f
    translation = torch.zeros(1, 3)
    translation[0, axis] = t
    T = transformation_matrix(torch.zeros(1, 3), translation)
    src = torch.rand(1, 3, H, W)
    warped = inverse_warp(src, torch.full((1, 1, H, W), d), T, _K(1, fx, fy, W / 2, H / 2))

    whole, frac = math.floor(shift_px), shift_px - math.floor(shift_px)
    if axis == 0:
        expected = (1 - frac) * src.roll(-whole, dims=3) + frac * src.roll(-whole - 1, dims=3)
        margin = abs(whole) + 2
        sl = (..., slice(None), slice(margin, W - margin))
    else:
        expected = (1 - frac) * src.roll(-whole, dims=2) + frac * src.roll(-whole - 1, dims=2)
        margin = abs(whole) + 2
        sl = (..., slice(margin, H - margin), slice(None))
    torch.testing.assert_close(warped[sl], expected[sl], atol=1e-4, rtol=0)
    # Sanity: the shift really moved content (the identity would not pass the check above).
    assert (warped[sl] - src[sl]).abs().max() > 0.1


def test_inverse_warp_border_padding_and_depth_gradient() -> None:
    src = torch.rand(1, 3, H, W)
    depth = torch.full((1, 1, H, W), 2.0, requires_grad=True)
    translation = torch.tensor([[0.2, 0.0, 0.0]])  # 80·0.2/2 = 8 px to the right
    T = transformation_matrix(torch.zeros(1, 3), translation)
    warped = inverse_warp(src, depth, T, _K(1, 80.0, 80.0, W / 2, H / 2))
    # Pixels that look past the right edge repeat the last source column.
    torch.testing.assert_close(warped[..., -1], src[..., -1], atol=1e-5, rtol=0)
    # The photometric loss must be able to train the depth through the warp.
    ((warped - torch.rand_like(warped)) ** 2).mean().backward()
    assert depth.grad is not None and torch.isfinite(depth.grad).all() and depth.grad.abs().sum() > 0
