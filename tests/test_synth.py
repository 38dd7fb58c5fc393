"""Synthetic talking heads (dagan.synth): rasteriser, mesh, motion, ground truth and dataset layout."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dagan.face import crop_source
from dagan.synth.dataset import (
    CollectReport,
    SynthError,
    choose_test_identities,
    clip_rng,
    collect_identities,
    render_clip,
    source_yaw,
    write_dataset,
)
from dagan.synth.mesh import TRI_RING, fit_head_mesh, topology
from dagan.synth.motion import (
    ExpressionRig,
    MotionConfig,
    euler_from_matrix,
    matrix_from_euler,
    max_step,
    sample_trajectory,
)
from dagan.synth.render import rasterize, render_head

SIZE = 160  # small frames keep the suite fast; the code paths are the same as at 256


@pytest.fixture(scope="module")
def head(astronaut):
    crop, _ = crop_source(astronaut, SIZE)
    mesh = fit_head_mesh(crop, name="astronaut")
    return mesh, ExpressionRig(mesh)


@pytest.fixture(scope="module")
def builtin_report() -> CollectReport:
    return collect_identities(builtin=True, size=SIZE)


# ------------------------------------------------------------------------------------------ rasteriser


def test_zbuffer_hides_the_triangle_behind_whatever_the_order():
    near = np.array([[10, 10], [50, 10], [10, 50]], float)
    far = np.array([[5, 5], [60, 5], [5, 60]], float)
    xy = np.concatenate([near, far])
    depth = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    for tris, near_id in (([[0, 1, 2], [3, 4, 5]], 0), ([[3, 4, 5], [0, 1, 2]], 1)):
        r = rasterize(xy, depth, np.array(tris), 64, 64)
        assert r.tri[20, 20] == near_id  # overlap: the nearer triangle wins
        assert r.depth[20, 20] == pytest.approx(1.0)
        assert r.tri[6, 55] == 1 - near_id  # only the far triangle there
        assert r.depth[6, 55] == pytest.approx(2.0)
        assert r.tri[62, 62] == -1 and np.isinf(r.depth[62, 62])
    # Interpenetrating: a tilted triangle in front on its left, behind on its right.
    tilted = rasterize(
        np.array([[0, 0], [64, 0], [0, 64], [0, 0], [64, 0], [0, 64]], float),
        np.array([1.0, 3.0, 1.0, 2.0, 2.0, 2.0]),
        np.array([[0, 1, 2], [3, 4, 5]]),
        64,
        64,
    )
    assert tilted.tri[2, 5] == 0 and tilted.tri[2, 55] == 1


def test_shared_edges_leave_no_cracks_and_barycentrics_interpolate():
    xy = np.array([[3.3, 2.7], [60.1, 4.2], [58.7, 61.9], [2.2, 59.4]])
    depth = np.array([1.0, 2.0, 3.0, 2.0])
    r = rasterize(xy, depth, np.array([[0, 1, 2], [0, 2, 3]]), 64, 64)
    inside = cv2.fillConvexPoly(np.zeros((64, 64), np.uint8), np.round(xy * 16).astype(np.int32), 1, shift=4)
    core = cv2.erode(inside, np.ones((3, 3), np.uint8)).astype(bool)
    assert r.covered[core].all()  # the diagonal between the two triangles is covered
    # Perspective-correct barycentrics: the interpolated 3D point (pinhole with f = 1 at the origin)
    # projects back onto the pixel centre, and the interpolated z is the z-buffer depth.
    points = np.concatenate([xy * depth[:, None], depth[:, None]], axis=1)
    pos = r.interpolate(np.array([[0, 1, 2], [0, 2, 3]]), points)
    ys, xs = np.nonzero(core)
    assert np.allclose(pos[ys, xs, 0] / pos[ys, xs, 2], xs + 0.5, atol=1e-3)
    assert np.allclose(pos[ys, xs, 1] / pos[ys, xs, 2], ys + 0.5, atol=1e-3)
    assert np.allclose(pos[ys, xs, 2], r.depth[ys, xs], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ mesh


def test_topology_from_mediapipe_tesselation():
    topo = topology()
    assert topo.face_triangles.shape == (852, 3)
    assert len(topo.oval) == 36
    for upper, lower in topo.eyes:
        assert upper[0] == lower[0] and upper[-1] == lower[-1] and len(upper) + len(lower) == 18
    assert 13 in topo.inner_lips[0] and 14 in topo.inner_lips[1]


def test_rest_pose_reproduces_the_portrait_and_covers_every_pixel(head):
    mesh, rig = head
    frame = render_head(mesh, rig, np.eye(3))
    assert np.array_equal(frame.image, mesh.texture)
    extreme = render_head(
        mesh, rig, matrix_from_euler(30, -20, 15), shift=(0.05, -0.05), scale=1.08, mouth=1.0, blink=1.0
    )
    assert (extreme.triangle >= 0).all()  # no holes anywhere, even at the extremes of the motion
    assert np.abs(extreme.image.astype(int) - mesh.texture).mean() > 10


# ---------------------------------------------------------------------------------------- ground truth


def test_ground_truth_is_consistent_with_the_render(head):
    mesh, rig = head
    frames, gt = render_clip((mesh, rig), 10, clip_rng(5, mesh.name, 0), MotionConfig())
    K = gt["K"]
    assert len(frames) == 10 and gt["depth"].shape == (10, SIZE, SIZE)
    rigid = np.nonzero((rig.jaw_weight[:478] == 0) & (rig.lip_weight[:478] == 0))[0]
    rigid = np.setdiff1d(rigid, np.concatenate([lid[0] for lid in rig.lids] + [lid[2] for lid in rig.lids]))
    assert len(rigid) > 200
    checked = 0
    for i in range(10):
        R, t, lm, lm3 = gt["R"][i], gt["t"][i], gt["landmarks"][i], gt["landmarks3d"][i].astype(np.float64)
        # 2D landmarks are the projection of the posed 3D landmarks, which are the head model under (R, t).
        proj = lm3 @ K.T
        assert np.allclose(proj[:, :2] / proj[:, 2:], lm, atol=1e-3)
        assert np.allclose(gt["mesh_head"][rigid] @ R.T + t, lm3[rigid], atol=1e-2)
        # The depth map at each visible landmark's pixel is the landmark's depth, and un-projecting the
        # pixel with that depth and undoing the pose lands on the head-model point.
        depth = gt["depth"][i].astype(np.float64)
        col, row = lm[:, 0].astype(int), lm[:, 1].astype(int)
        ok = gt["visible"][i] & np.isfinite(depth[row.clip(0, SIZE - 1), col.clip(0, SIZE - 1)])
        ok &= (lm >= 0).all(1) & (lm < SIZE).all(1)
        d = depth[row[ok], col[ok]]
        z = lm3[ok, 2]
        err = np.abs(d - z)
        assert np.median(err) < 0.004 * z.mean() and np.quantile(err, 0.9) < 0.012 * z.mean()
        rays = np.linalg.solve(K, np.stack([lm[ok, 0], lm[ok, 1], np.ones(ok.sum())]))
        back = (rays * d).T
        head_pts = (back - t) @ R
        sel = np.isin(np.nonzero(ok)[0], rigid)
        dist = np.linalg.norm(head_pts[sel] - gt["mesh_head"][np.nonzero(ok)[0][sel]], axis=1)
        assert np.median(dist) < 0.006 * z.mean()
        # Z-buffer consistency: no landmark is seen through the surface in front of it.
        inside = (lm >= 0).all(1) & (lm < SIZE).all(1)
        front = np.nan_to_num(depth[row[inside], col[inside]], nan=np.inf)
        assert (front >= lm3[inside, 2] - 0.03 * z.mean()).mean() > 0.97
        checked += int(ok.sum())
    assert checked > 10 * 300


def test_determinism(head):
    mesh, rig = head
    f1, g1 = render_clip((mesh, rig), 4, clip_rng(1, "x", 0), MotionConfig())
    f2, g2 = render_clip((mesh, rig), 4, clip_rng(1, "x", 0), MotionConfig())
    f3, g3 = render_clip((mesh, rig), 4, clip_rng(2, "x", 0), MotionConfig())
    assert all(np.array_equal(a, b) for a, b in zip(f1, f2, strict=True))
    assert all(np.array_equal(g1[k], g2[k], equal_nan=True) for k in g1)
    assert not np.array_equal(f1[0], f3[0]) and not np.allclose(g1["R"], g3["R"])


# ------------------------------------------------------------------------------------------------ motion


def test_pose_trajectory_bounds_and_smoothness():
    cfg = MotionConfig()
    peak = np.zeros(3)
    for seed in range(12):
        traj = sample_trajectory(250, np.random.default_rng(seed), cfg)
        angles = np.array([euler_from_matrix(traj.rotation(i)) for i in range(len(traj))])
        assert np.allclose(angles, np.stack([traj.yaw, traj.pitch, traj.roll], 1), atol=1e-6)
        for k, bound in enumerate((cfg.yaw, cfg.pitch, cfg.roll)):
            assert np.abs(angles[:, k]).max() <= bound + 1e-9
            assert np.abs(np.diff(angles[:, k])).max() <= max_step(bound, cfg) + 1e-9
        peak = np.maximum(peak, np.abs(angles).max(0))
        assert np.abs(traj.shift).max() <= cfg.translation and np.abs(traj.scale - 1).max() <= cfg.scale
        assert traj.mouth.min() >= 0 and traj.mouth.max() <= 1 and traj.blink.max() > 0.99  # ≥ 1 blink
    # ... and the motion is not timid: the ranges are mostly used.
    assert (peak > 0.8 * np.array([cfg.yaw, cfg.pitch, cfg.roll])).all()
    assert math.isclose(max_step(30, cfg), 30 * 1.73 * 2 * math.pi * 0.45 / 25, rel_tol=0.01)


def test_mouth_opening_moves_the_lips_and_the_mouth_pixels(head):
    mesh, rig = head
    pose = matrix_from_euler(10, 5, 0)
    closed = render_head(mesh, rig, pose, mouth=0.0)
    opened = render_head(mesh, rig, pose, mouth=1.0)
    gap = [np.linalg.norm(f.landmarks[13] - f.landmarks[14]) for f in (closed, opened)]
    assert gap[1] > gap[0] + 0.12 * np.linalg.norm(closed.landmarks[61] - closed.landmarks[291])
    lips = closed.landmarks[[61, 291, 0, 17]]
    x0, y0 = lips.min(0).astype(int)
    x1, y1 = lips.max(0).astype(int)
    diff = np.abs(opened.image.astype(int) - closed.image.astype(int)).sum(-1)
    assert diff[y0 : y1 + 1, x0 : x1 + 1].mean() > 30
    top = int(closed.landmarks[[159, 386], 1].min()) - 5  # above the eyes nothing moves
    assert diff[:top].max() == 0


def test_blink_closes_the_eyes(head):
    mesh, rig = head
    open_, shut = (render_head(mesh, rig, np.eye(3), blink=b) for b in (0.0, 1.0))
    for up, low in ((159, 145), (386, 374)):
        # the upper lid comes down onto the lower lid (at its own x, so only the vertical gap closes)
        assert open_.landmarks[low, 1] - open_.landmarks[up, 1] > 3
        assert abs(shut.landmarks[low, 1] - shut.landmarks[up, 1]) < 0.5
    eye = open_.landmarks[[33, 133, 159, 145]]
    (x0, y0), (x1, y1) = eye.min(0).astype(int), eye.max(0).astype(int)
    diff = np.abs(shut.image.astype(int) - open_.image.astype(int)).sum(-1)
    assert diff[y0 : y1 + 1, x0 : x1 + 1].mean() > 15


# ----------------------------------------------------------------------------------------------- dataset


def test_identities_from_folders_skip_faceless_and_small_faces(tmp_path, astronaut):
    folder = tmp_path / "portraits"
    folder.mkdir()
    cv2.imwrite(str(folder / "wall.png"), np.full((200, 300, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "tiny.jpg"), cv2.cvtColor(cv2.resize(astronaut, (128, 128)), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "big.jpg"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    report = collect_identities([folder], size=SIZE)
    assert [i.name for i in report.identities] == ["big"]
    assert report.images == 3 and report.skipped_small == 1
    assert report.skipped_no_face == [str(folder / "wall.png")]
    assert report.identities[0].texture.shape == (SIZE, SIZE, 3)
    assert abs(source_yaw(report.identities[0].landmarks)) < 15  # the astronaut faces the camera
    # A face turned to near-profile is skipped too: squeeze one half of the face sideways.
    lm = report.identities[0].landmarks.copy()
    lm[:, 0] = np.where(lm[:, 0] > lm[1, 0], lm[1, 0] + 0.1 * (lm[:, 0] - lm[1, 0]), lm[:, 0])
    assert source_yaw(lm) > 60
    with pytest.raises(SynthError, match="not found"):
        collect_identities([tmp_path / "missing"])


def test_choose_test_identities():
    names = [f"p{i}" for i in range(20)]
    assert len(choose_test_identities(names, None, 0)) == 3
    assert choose_test_identities(names, "4", 0) == choose_test_identities(names, 4, 0)
    assert choose_test_identities(names, 4, 0) != choose_test_identities(names, 4, 1)
    assert choose_test_identities(names, "p3, p7", 0) == ["p3", "p7"]
    assert choose_test_identities(["a", "b"], None, 0) in (["a"], ["b"])
    with pytest.raises(SynthError, match="unknown test identities"):
        choose_test_identities(names, "nobody", 0)
    with pytest.raises(SynthError, match="no training identity"):
        choose_test_identities(["a", "b"], 2, 0)


def test_dataset_layout_split_and_determinism(tmp_path, builtin_report):
    assert sorted(i.name for i in builtin_report.identities) == ["astronaut", "grace_hopper"]
    kwargs = dict(test_identities="grace_hopper", clips_per_identity=2, frames=3, seed=7, progress=False)
    summary = write_dataset(tmp_path / "a", builtin_report, **kwargs)
    root = tmp_path / "a"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["astronaut-c0", "astronaut-c1"]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["grace_hopper-c0", "grace_hopper-c1"]
    on_disk = json.loads((root / "synth.json").read_text())
    assert on_disk["test_identities"] == summary["test_identities"] == ["grace_hopper"]
    assert on_disk["train_identities"] == ["astronaut"]
    video = root / "test" / "grace_hopper-c1"
    assert sorted(p.name for p in video.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    meta = json.loads((video / "meta.json").read_text())
    assert meta["identity"] == "grace_hopper" and meta["frames"] == 3 and meta["seed"] == 7
    assert np.allclose(meta["camera"]["K"], np.load(video / "gt.npz")["K"])
    gt = np.load(video / "gt.npz")
    assert gt["R"].shape == (3, 3, 3) and gt["t"].shape == (3, 3) and gt["landmarks"].shape == (3, 478, 2)
    assert gt["depth"].dtype == np.float16 and gt["depth"].shape == (3, SIZE, SIZE)
    face = np.isfinite(gt["depth"][0])
    assert 0.05 < face.mean() < 0.6  # the face, not the whole frame
    png = cv2.cvtColor(cv2.imread(str(video / "000001.png")), cv2.COLOR_BGR2RGB)
    assert png.shape == (SIZE, SIZE, 3)

    # Same seed -> byte-identical dataset; a different seed -> different clips.
    write_dataset(tmp_path / "b", builtin_report, **kwargs)
    for p in sorted(root.rglob("*.png")) + sorted(root.rglob("gt.npz")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(root)).read_bytes(), p
    write_dataset(tmp_path / "c", builtin_report, **{**kwargs, "seed": 8})
    assert (root / "train/astronaut-c0/000000.png").read_bytes() != (
        tmp_path / "c/train/astronaut-c0/000000.png"
    ).read_bytes()

    with pytest.raises(SynthError, match="--overwrite"):
        write_dataset(root, builtin_report, **kwargs)
    write_dataset(root, builtin_report, overwrite=True, **{**kwargs, "test_identities": "astronaut"})
    assert [p.name for p in (root / "test").iterdir()] == ["astronaut-c0", "astronaut-c1"]
    assert sorted(p.name for p in (root / "train").iterdir()) == ["grace_hopper-c0", "grace_hopper-c1"]


def test_cli_synth(tmp_path, capsys):
    from commands.synth_cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    out = tmp_path / "ds"
    args = parser.parse_args(
        ["synth", "--out", str(out), "--frames", "2", "--clips-per-identity", "1", "--size", "128", "--quiet"]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "2 identities from 2 images" in text and "held-out identities:" in text
    held = json.loads((out / "synth.json").read_text())["test_identities"]
    assert len(held) == 1 and [p.name for p in (out / "test").iterdir()] == [f"{held[0]}-c0"]
    assert len(list(Path(out).rglob("*.png"))) == 4
    args = parser.parse_args(["synth", "--out", str(tmp_path / "x"), "--portraits", str(tmp_path / "none")])
    with pytest.raises(SynthError):
        args.func(args)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = parser.parse_args(["synth", "--out", str(tmp_path / "y"), "--portraits", str(empty), "--quiet"])
    with pytest.raises(SynthError, match="no usable face"):
        args.func(args)


def test_ring_triangles_are_not_face_depth(head):
    mesh, rig = head
    frame = render_head(mesh, rig, matrix_from_euler(-20, 10, 5))
    ring = mesh.tri_kind[frame.triangle] == TRI_RING
    assert np.isnan(frame.depth[ring]).all() and np.isfinite(frame.depth[~ring]).all()
