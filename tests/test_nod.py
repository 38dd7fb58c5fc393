"""The nod: head pitch read from the face mesh (dagan.head_pose), the keypoints nodded by it (dagan.nod),
and how the engine runs it (engine.hot_path, step 5)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from helpers import make_model

from dagan.config import ConfigError, config_from_dict, load_config, set_dotted, to_plain
from dagan.head_pose import _OBJECT_POINTS, _POSE_IDS, euler_angles, head_rotation, pitch_since
from dagan.nets.keypoints import Keypoints
from dagan.nod import (
    OTHER_SHOT,
    SAME_SHOT,
    NodProfile,
    NodState,
    mesh_profile,
    nod_keypoints,
    shot_distance,
    shot_signature,
    shot_weight,
)

SIZE = 64


def rotation(pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """R = Rz(roll) Ry(yaw) Rx(pitch), degrees (the order OpenCV's RQ decomposition reads back)."""
    p, y, r = np.radians([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def mesh_of(rot: np.ndarray, size: int = 256) -> np.ndarray:
    """478×2 landmarks: the canonical face's pose points turned by ``rot`` and seen by the head-pose
    camera (focal length = width) from 45 units away; every other point at the image centre."""
    lm = np.full((478, 2), size / 2.0)
    cam = np.array([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
    pts, _ = cv2.projectPoints(_OBJECT_POINTS, cv2.Rodrigues(rot)[0], np.array([0.0, 0.0, 45.0]), cam, None)
    lm[_POSE_IDS] = pts.reshape(-1, 2)
    return lm


def source_keypoints(b: int = 1, k: int = 10, seed: int = 0, jacobian: bool = True) -> Keypoints:
    g = torch.Generator().manual_seed(seed)
    value = torch.rand(b, k, 2, generator=g) * 1.2 - 0.6
    jac = torch.eye(2).repeat(b, k, 1, 1) + 0.1 * torch.randn(b, k, 2, 2, generator=g) if jacobian else None
    return Keypoints(value, jac)


# ------------------------------------------------------------------------------------- head pose


def test_head_rotation_reads_back_a_known_pose():
    true = rotation(pitch=12, yaw=-20, roll=8)
    got = head_rotation(mesh_of(true), (256, 256))
    assert got is not None
    np.testing.assert_allclose(euler_angles(got), [12, -20, 8], atol=0.5)


def test_pitch_since_is_measured_in_the_heads_own_frame():
    # A driver whose head is turned 20° at the reference and then tilts it 22° about its own axis,
    # without nodding: the camera's pitch angle changes by several degrees, the head's own pitch does not.
    ref = rotation(yaw=20)
    turned = ref @ rotation(roll=22)
    nodded = ref @ rotation(pitch=9)
    r_ref = head_rotation(mesh_of(ref), (256, 256))
    r_turned = head_rotation(mesh_of(turned), (256, 256))
    r_nodded = head_rotation(mesh_of(nodded), (256, 256))
    camera_pitch_change = euler_angles(r_turned)[0] - euler_angles(r_ref)[0]
    assert abs(camera_pitch_change) > 3  # what a difference of camera angles would hand the photo
    assert abs(pitch_since(r_ref, r_turned)) < 0.5
    assert pitch_since(r_ref, r_nodded) == pytest.approx(9, abs=0.5)


# ------------------------------------------------------------------------------------- the keypoints


def test_no_pitch_leaves_the_keypoints_exactly_as_they_were():
    kp_s = source_keypoints(b=2)
    kp = source_keypoints(b=2, seed=1)
    out = nod_keypoints(kp_s, kp, torch.zeros(2), gain=2.0)
    assert torch.equal(out.value, kp.value) and torch.equal(out.jacobian, kp.jacobian)


def test_a_nod_moves_the_keypoints_vertically_the_middle_of_the_face_most():
    kp_s = source_keypoints(k=15)
    out = nod_keypoints(kp_s, kp_s, torch.tensor([10.0]), gain=2.0)
    moved = out.value - kp_s.value
    assert torch.all(moved[..., 0] == 0)  # only vertically
    dist = (kp_s.value - kp_s.value.mean(1, keepdim=True)).norm(dim=-1)[0]
    dy = moved[0, :, 1]
    centre, edge = int(dist.argmin()), int(dist.argmax())
    assert dy[centre] > 0 and dy[centre] > dy[edge]  # positive pitch: down, the nose most
    back = nod_keypoints(kp_s, kp_s, torch.tensor([-10.0]), gain=2.0).value - kp_s.value
    torch.testing.assert_close(back, -moved)  # the other way is the mirror image
    twice = nod_keypoints(kp_s, kp_s, torch.tensor([10.0]), gain=4.0).value - kp_s.value
    torch.testing.assert_close(twice, 2 * moved)


def test_the_nod_scales_with_the_face():
    kp_s = source_keypoints(k=15)
    centre = kp_s.value.mean(1, keepdim=True)
    big = Keypoints(centre + 2 * (kp_s.value - centre), kp_s.jacobian)
    small_move = nod_keypoints(kp_s, kp_s, torch.tensor([8.0]), 2.0).value - kp_s.value
    big_move = nod_keypoints(big, big, torch.tensor([8.0]), 2.0).value - big.value
    torch.testing.assert_close(big_move, 2 * small_move)


def test_the_jacobians_take_the_local_deformation_of_the_nod():
    """Each keypoint's neighbourhood is deformed by the gradient of the nod's displacement field,
    checked against finite differences of that field (a keypoint moved, the field sampled again)."""
    kp_s = source_keypoints(k=12, seed=3)
    kp = source_keypoints(k=12, seed=4)
    pitch = torch.tensor([7.0])
    out = nod_keypoints(kp_s, kp, pitch, gain=2.0)
    src = kp_s.value.double()
    centre = src.mean(1, keepdim=True)
    spread = (src - centre).pow(2).sum(-1).mean().sqrt()
    rho2 = (1.6 * spread) ** 2
    amp = 2.0 * spread * np.sin(np.radians(7.0))

    def dy(p: torch.Tensor) -> torch.Tensor:
        return amp * (1 - (p - centre[0, 0]).pow(2).sum(-1) / rho2)

    eps = 1e-6
    for k in range(12):
        p = src[0, k]
        grad = torch.stack([(dy(p + eps * e) - dy(p - eps * e)) / (2 * eps) for e in torch.eye(2).double()])
        expected = (
            kp.jacobian[0, k].double()
            + torch.stack([torch.zeros(2).double(), grad]) @ kp.jacobian[0, k].double()
        )
        torch.testing.assert_close(out.jacobian[0, k].double(), expected, atol=1e-5, rtol=1e-5)


def test_keypoints_without_jacobians_are_nodded_too():
    kp_s = source_keypoints(jacobian=False)
    out = nod_keypoints(kp_s, kp_s, torch.tensor([5.0]), 2.0)
    assert out.jacobian is None and not torch.equal(out.value, kp_s.value)


def shot_scene(seed: int = 0, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random picture (size² RGB) and a face mesh on it: 478 points scattered over a box in the
    middle third."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(
        rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
    )
    mesh = size / 3 + rng.random((478, 2)) * size / 3
    return image, mesh


def test_the_nod_is_added_for_another_shot_and_not_for_the_same_one():
    image, mesh = shot_scene()
    photo = shot_signature(image, mesh)
    assert photo.shape == (16, 16, 3) and abs(photo.mean()) < 1e-9 and photo.std() == pytest.approx(1)
    # the same shot cropped elsewhere and scaled (as the photo's crop and the tracker's differ), its
    # exposure changed: the keypoints carry the nod of such a frame themselves
    warp = np.array([[1.25, 0.0, -20.0], [0.0, 1.25, -12.0]])
    again = cv2.warpAffine(image, warp, (128, 128), borderMode=cv2.BORDER_REFLECT)
    again = np.clip(again.astype(np.float64) * 0.8 + 20, 0, 255).astype(np.uint8)
    moved = mesh * 1.25 + np.array([-20.0, -12.0])
    frame = shot_signature(again, moved)
    assert shot_distance(photo, frame) < SAME_SHOT
    assert shot_weight(photo, frame) == 0
    # another picture under the same mesh: another face
    other = shot_signature(shot_scene(seed=1)[0], mesh)
    assert shot_distance(photo, other) > OTHER_SHOT
    assert shot_weight(photo, other) == 1
    # unknown shots (a photo without a face mesh): the whole nod
    assert shot_weight(None, frame) == 1 and shot_weight(photo, None) == 1
    # between the two bounds the weight grows linearly with the distance
    mixed = shot_signature(
        ((image.astype(np.float64) * 3 + shot_scene(seed=1)[0]) / 4).astype(np.uint8), mesh
    )
    d = shot_distance(photo, mixed)
    assert SAME_SHOT < d < OTHER_SHOT
    assert shot_weight(photo, mixed) == pytest.approx((d - SAME_SHOT) / (OTHER_SHOT - SAME_SHOT))


# ------------------------------------------------------------------------------------- the photo's profile


def dome_mesh(size: int = 64, n: int = 41) -> np.ndarray:
    """n² mesh points on a grid over the crop (pixels of ``size``), z as mediapipe gives it (into the
    scene): a dome whose surface toward the camera is 1 − x² − y² in keypoint units."""
    u = np.linspace(-1, 1, n)
    x, y = np.meshgrid(u, u)
    toward = 1 - x**2 - y**2
    return np.c_[(x.ravel() + 1) * size / 2, (y.ravel() + 1) * size / 2, -toward.ravel() * 7.0]


def test_the_mesh_profile_is_the_faces_depth_and_slope_at_each_keypoint():
    mesh = dome_mesh()
    kp = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, -0.5], [-0.3, 0.4]])
    prof = mesh_profile(mesh, 64, kp)
    toward = -mesh[:, 2] / 7.0
    lo = np.percentile(toward, 5)
    scale = 1 - lo  # the dome's top is 1
    want_z = (1 - (kp**2).sum(1) - lo) / scale
    torch.testing.assert_close(prof.z.double(), torch.from_numpy(want_z), atol=0.01, rtol=0)
    want_grad = -2 * kp / scale  # the dome's slope, in units of the profile's scale
    torch.testing.assert_close(prof.grad.double(), torch.from_numpy(want_grad), atol=0.01, rtol=0)
    assert prof.z[0] == prof.z.max()  # the top of the dome stands out most
    # depth in other units (mediapipe's z is in pixels of whatever it was run on) gives the same profile
    other = mesh.copy()
    other[:, 2] *= 3
    torch.testing.assert_close(mesh_profile(other, 64, kp).z, prof.z)


def test_a_keypoint_off_the_mesh_takes_the_nearest_points():
    mesh = dome_mesh()
    # just past the mesh's right edge (three mesh points within MESH_RADIUS), and far off it
    kp = np.array([[1.1, 0.3], [0.9, 0.3], [3.0, 0.0]])
    prof = mesh_profile(mesh, 64, kp)
    assert torch.isfinite(prof.z).all() and torch.isfinite(prof.grad).all()
    assert prof.grad[0, 0] < 0 and prof.z[0] < prof.z[1]  # the dome goes on falling away to the right


def test_a_profile_replaces_the_bump_for_its_item_only():
    kp_s = source_keypoints(b=2, k=12, seed=5)
    kp = source_keypoints(b=2, k=12, seed=6)
    pitch = torch.tensor([6.0, 6.0])
    bump = nod_keypoints(kp_s, kp, pitch, 2.0)
    flat = NodProfile(torch.ones(12), torch.zeros(12, 2))  # every keypoint stands out as far
    out = nod_keypoints(kp_s, kp, pitch, 2.0, [None, flat])
    torch.testing.assert_close(out.value[0], bump.value[0])  # the first item: the bump still
    torch.testing.assert_close(out.jacobian[0], bump.jacobian[0])
    moved = out.value[1] - kp.value[1]
    assert torch.all(moved[:, 0] == 0) and torch.allclose(moved[:, 1], moved[0, 1].expand(12))
    assert moved[0, 1] > 0
    torch.testing.assert_close(out.jacobian[1], kp.jacobian[1])  # a flat profile deforms nothing
    # the bump's own values given as a profile reproduce the bump
    src = kp_s.value[1]
    rel = src - src.mean(0)
    rho2 = (1.6 * rel.pow(2).sum(-1).mean().sqrt()) ** 2
    same = NodProfile(1 - rel.pow(2).sum(-1) / rho2, -2 * rel / rho2)
    again = nod_keypoints(kp_s, kp, pitch, 2.0, [None, same])
    torch.testing.assert_close(again.value, bump.value)
    torch.testing.assert_close(again.jacobian, bump.jacobian)


# ------------------------------------------------------------------------------------- the state


def frame_of(size: int = 256) -> np.ndarray:
    """A grey driving frame of ``size``² (the state reads only its shape and, at a reference, its shot)."""
    return np.full((size, size, 3), 128, np.uint8)


def test_nod_state_measures_from_its_reference_and_starts_anew_with_a_new_one():
    state = NodState(max_degrees=30)
    ref_a, ref_b = object(), object()
    frame = frame_of()
    assert state.pitch(mesh_of(rotation(pitch=5)), frame, ref_a, smooth=False) == pytest.approx(0, abs=1e-6)
    assert state.pitch(mesh_of(rotation(pitch=13)), frame, ref_a, smooth=False) == pytest.approx(8, abs=0.5)
    held = state.pitch(None, frame, ref_a, smooth=False)  # no face: the last pitch holds
    assert held == pytest.approx(8, abs=0.5)
    # a recalibration: the next frame is the new zero
    assert state.pitch(mesh_of(rotation(pitch=13)), frame, ref_b, smooth=False) == pytest.approx(0, abs=1e-6)
    assert state.pitch(mesh_of(rotation(pitch=3)), frame, ref_b, smooth=False) == pytest.approx(-10, abs=0.5)


def test_nod_state_weighs_each_reference_frame_against_the_photo():
    image, mesh = shot_scene(size=256)
    other = shot_scene(seed=1, size=256)[0]
    state = NodState()
    assert state.weight == 1  # nothing weighed yet: another face
    state.photo = shot_signature(image, mesh)
    ref_a, ref_b = object(), object()
    state.pitch(mesh, image, ref_a, smooth=False)  # the photo's own shot is the reference: no nod added
    assert state.weight == 0
    state.pitch(mesh, other, ref_a, smooth=False)  # later frames of that reference do not re-weigh it
    assert state.weight == 0
    state.pitch(None, other, ref_b, smooth=False)  # a new reference, weighed at its first face
    assert state.weight == 0
    state.pitch(mesh, other, ref_b, smooth=False)
    assert state.weight == 1


def test_nod_state_clips_a_reading_past_its_limit_and_filters_when_asked():
    state = NodState(max_degrees=5)
    ref = object()
    frame = frame_of()
    state.pitch(mesh_of(rotation()), frame, ref, smooth=False)
    assert state.pitch(mesh_of(rotation(pitch=20)), frame, ref, smooth=False) == pytest.approx(5)
    smooth = NodState()
    smooth.pitch(mesh_of(rotation()), frame, ref, t=0.0)
    # a sudden 10° step one frame later passes the filter only in part
    step = smooth.pitch(mesh_of(rotation(pitch=10)), frame, ref, t=1 / 30)
    assert 0 < step < 9


# ------------------------------------------------------------------------------------- config + engine


def nod_config(**changes):
    return config_from_dict(set_dotted(to_plain(load_config("tiny")), {"nod.gain": 2.0, **changes}))


def test_nod_config_is_checked():
    assert load_config("vox-256").nod.gain == 0  # the authors' model does not nod
    assert nod_config().nod.gain == 2.0
    for key, bad in (
        ("nod.gain", -1.0),
        ("nod.gain", 6.0),
        ("nod.max_degrees", 0.0),
        ("nod.gain", float("nan")),
    ):
        with pytest.raises(ConfigError, match=key):
            nod_config(**{key: bad})


def _nodding_engine(monkeypatch, pitches: list[float], profile: NodProfile | None = None):
    """A torch engine of a tiny model that nods, whose face mesh of every driving frame is the canonical
    face pitched by the next of ``pitches`` (the photo's mesh: the first), and whose uploads keep
    ``profile`` (the upload's calibration has tests of its own); and the keypoints it renders."""
    import dagan.face
    from engine.torch_backend import TorchEngine

    meshes = [mesh_of(rotation(pitch=p), SIZE) for p in pitches]
    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: meshes.pop(0))
    engine = TorchEngine(make_model(nod_config()), device="cpu")
    monkeypatch.setattr(engine, "_nod_profile", lambda session, image, landmarks: profile)
    rendered: list[torch.Tensor] = []
    render = engine._render

    def recording(feed):
        rendered.append(feed["kp_driving_value"].clone())
        return render(feed)

    monkeypatch.setattr(engine, "_render", recording)
    return engine, rendered


@pytest.mark.parametrize("flat", [False, True], ids=["bump", "own-profile"])
def test_engine_nods_the_rendered_keypoints_by_the_drivers_pitch(monkeypatch, flat):
    rng = np.random.default_rng(0)
    src = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    frame = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    k = nod_config().keypoints.num_kp
    profile = NodProfile(torch.ones(k), torch.zeros(k, 2)) if flat else None
    # the photo's mesh, then the driver's: at the reference, unchanged, then pitched 10°
    engine, rendered = _nodding_engine(monkeypatch, [0.0, 0.0, 0.0, 10.0], profile)
    session = engine.new_session(src, relative=True)
    assert isinstance(session.nod, NodState) and session.nod.profile is profile
    for _ in range(3):  # one driving frame three times: the keypoints stay, only the mesh nods
        engine.animate_batch([session], [frame])
    first, same, nodded = rendered
    torch.testing.assert_close(same, first)  # no nod since the reference: exactly the plain transfer
    kp_s = engine._source_keypoints(session)
    pitch = torch.tensor([session.nod._last])
    assert pitch.item() == pytest.approx(10, abs=0.5)
    weight = session.nod.weight
    assert weight == 1  # a random photo and a random frame: other shots
    expected = nod_keypoints(kp_s, Keypoints(first, None), pitch * weight, 2.0, [profile]).value
    torch.testing.assert_close(nodded, expected, atol=1e-5, rtol=1e-5)
    assert (nodded - first)[..., 1].mean() > 0 and torch.all((nodded - first)[..., 0].abs() < 1e-6)
    if flat:  # the photo's own profile, not the bump: every keypoint moved alike
        dy = (nodded - first)[0, :, 1]
        torch.testing.assert_close(dy, dy[0].expand_as(dy))


def test_engine_adds_no_nod_when_the_photo_is_the_drivers_own_frame(monkeypatch):
    """Self-reenactment, or a snapshot of the camera taken as the avatar: the photo is the reference
    frame's shot, whose keypoints carry the nod already, so the mesh's nod is not added on top."""
    rng = np.random.default_rng(0)
    src = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    engine, rendered = _nodding_engine(monkeypatch, [0.0, 0.0, 0.0, 10.0])
    session = engine.new_session(src, relative=True)
    for _ in range(3):
        engine.animate_batch([session], [src])
    first, _, nodded = rendered
    assert session.nod._last == pytest.approx(10, abs=0.5)  # the driver did nod
    assert session.nod.weight == 0
    torch.testing.assert_close(nodded, first)


def with_depth(lm: np.ndarray) -> np.ndarray:
    """A 478×2 mesh with a z column (the face mesh's third coordinate)."""
    return np.c_[lm, np.zeros(len(lm))]


@pytest.mark.parametrize(
    ("poses", "keeps_mesh"),
    [
        ([(-2, 0), (2, 0), (-6, 0), (6, 0)], True),
        ([(-6, 0), (6, 0), (-2, 0), (2, 0)], False),
        ([(-2, 0), (2, 0), (-6, -5), (6, 5)], False),
        ([(-2, 0), (2, 0), None, None], False),
    ],
    ids=["mesh-nods-further", "bump-nods-further", "mesh-nods-further-but-tilts", "mesh-loses-the-face"],
)
def test_the_upload_keeps_the_profile_its_avatar_nods_better_with(monkeypatch, poses, keeps_mesh):
    """At upload the photo is drawn nodded ∓8° over the bump, then over its mesh's profile; the face
    mesh of the four drawings (here: the canonical face pitched and rolled by ``poses``, None: no face)
    decides: the nod per degree, less any roll (or yaw) drawn with it."""
    import dagan.face
    from engine.hot_path import CALIBRATION_DEGREES
    from engine.torch_backend import TorchEngine

    photo_mesh = dome_mesh(SIZE, 22)  # 484 points
    meshes = [photo_mesh] + [
        None if p is None else with_depth(mesh_of(rotation(pitch=p[0], roll=p[1]), SIZE)) for p in poses
    ]
    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: meshes.pop(0))
    engine = TorchEngine(make_model(nod_config()), device="cpu")
    drawn: list[torch.Tensor] = []
    render = engine._render
    monkeypatch.setattr(
        engine, "_render", lambda feed: drawn.append(feed["kp_driving_value"]) or render(feed)
    )
    src = (np.random.default_rng(2).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    session = engine.new_session(src, relative=True)
    assert not meshes  # the photo's mesh and the four drawings' were read
    kp_s = engine._source_keypoints(session)
    mesh = mesh_profile(photo_mesh, SIZE, kp_s.value[0].numpy())
    if keeps_mesh:
        torch.testing.assert_close(session.nod.profile.z, mesh.z)
        torch.testing.assert_close(session.nod.profile.grad, mesh.grad)
    else:
        assert session.nod.profile is None
    # one batch of four drawings: the bump and the mesh's profile, each nodded down and up
    (batch,) = drawn
    four = Keypoints(kp_s.value.repeat(4, 1, 1), kp_s.jacobian.repeat(4, 1, 1, 1))
    pitch = torch.tensor([-1.0, 1.0, -1.0, 1.0]) * CALIBRATION_DEGREES
    want = nod_keypoints(four, four, pitch, 2.0, [None, None, mesh, mesh]).value
    torch.testing.assert_close(batch, want)


def test_a_backend_without_a_generator_draws_the_calibration_through_the_frame_graph(monkeypatch):
    """TensorRT builds only the fused graph: the photo driven by itself with moved references draws the
    same nodded keypoints as the generator does."""
    import dagan.face
    from engine.torch_backend import TorchEngine

    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", lambda image, min_size=256: None)
    engine = TorchEngine(make_model(nod_config()), device="cpu")
    src = (np.random.default_rng(3).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    session = engine.new_session(src, relative=True)
    kp_s = engine._source_keypoints(session)
    two = Keypoints(kp_s.value.repeat(2, 1, 1), kp_s.jacobian.repeat(2, 1, 1, 1))
    kp = nod_keypoints(two, two, torch.tensor([-8.0, 8.0]), 2.0)
    with torch.inference_mode():
        by_generator = engine._draw(session, src, kp)
        monkeypatch.setattr(engine, "_render", lambda feed: None)
        by_frame = engine._draw(session, src, kp)
    assert by_frame.shape == (2, 3, SIZE, SIZE)
    # a tiny random model draws the two nods only slightly apart (7e-5); the two paths agree far closer
    assert (by_generator[0] - by_generator[1]).abs().max() > 1e-5
    torch.testing.assert_close(by_frame, by_generator, atol=1e-6, rtol=0)


def test_an_absolute_stream_and_a_model_that_does_not_nod_read_no_mesh(monkeypatch):
    import dagan.face
    from engine.torch_backend import TorchEngine

    calls = []
    monkeypatch.setattr(
        dagan.face,
        "face_landmarks_upscaled",
        lambda image, min_size=256: calls.append(1) or with_depth(mesh_of(rotation())),
    )
    rng = np.random.default_rng(1)
    src = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    plain = TorchEngine(make_model(load_config("tiny")), device="cpu")
    assert plain.nod is None
    s = plain.new_session(src, relative=True)
    plain.animate_batch([s], [src])
    assert s.nod is None and not calls  # the tiny preset does not nod, blink or warp the mouth
    nodding = TorchEngine(make_model(nod_config()), device="cpu")
    a = nodding.new_session(src, relative=False)
    n = len(calls)
    nodding.animate_batch([a], [src])
    assert len(calls) == n  # absolute motion copies the driver's keypoints: nothing to nod


def test_engine_without_mediapipe_animates_without_a_nod(monkeypatch):
    import dagan.face
    from engine.hot_path import FramePathEngine
    from engine.torch_backend import TorchEngine

    def missing(image, min_size=256):
        raise ImportError("No module named 'mediapipe'")

    monkeypatch.setattr(dagan.face, "face_landmarks_upscaled", missing)
    monkeypatch.setattr(FramePathEngine, "_warned_no_mesh", False)
    engine = TorchEngine(make_model(nod_config()), device="cpu")
    src = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.warns(UserWarning, match="will not nod"):
        session = engine.new_session(src, relative=True)
    assert session.nod is None
    assert engine.animate_batch([session], [src])[0].image.shape == (SIZE, SIZE, 3)


def test_bench_times_the_nod_of_a_nodding_model(astronaut):
    from bench.model import bench_nod

    r = bench_nod(make_model(nod_config()), frames=3, warmup=1, face=astronaut)
    assert r["mesh_and_nod"]["frames"] == 3 and r["mesh_and_nod"]["median_ms"] > 0
    assert r["upload_calibration"]["frames"] == 3 and r["upload_calibration"]["median_ms"] > 0
    assert "skipped" not in r
