"""Paste-back (issue 19): the framing of the photo in a meeting-sized frame, the soft mask, the colour
match at the seam, "outside the mask the output is the photo, pixel for pixel", the device (torch) blend
against the OpenCV one, and bad photos (a tiny face, a face cut by the border, a tilted face, a photo
smaller than the output) made from real photos."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dagan.face import FaceBox, locate_source
from dagan.paste import (
    EDGE_FADE,
    FACE_CENTRE_Y,
    colour_offset,
    face_mask,
    frame_photo,
    parse_size,
    paste,
    plan_paste,
)

REAL = Path("/work/shared/data/real-faces/photos")
N = 64  # the tiny model's crop side: what the engine's avatar would be


def _real(name: str) -> np.ndarray:
    path = REAL / f"{name}.jpg"
    if not path.is_file():
        pytest.skip(f"the real photos are not here ({path})")
    from dagan.media import load_image

    return load_image(path)


def _plan(photo: np.ndarray, size=(1280, 720), mask="ellipse", n=N):
    face = locate_source(photo)
    crop = face.crop_box.crop(photo, n)
    return face, crop, plan_paste(photo, face, crop, size, mask)


# ---------------------------------------------------------------------------------------------- sizes


def test_parse_size():
    assert parse_size("1280x720") == (1280, 720)
    assert parse_size(" 640 X 360 ") == (640, 360)
    for bad in ("1280", "1280x", "x720", "1281x720", "8x8", "99999x720", "axb", "1280x720x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -------------------------------------------------------------------------------------------- framing


def test_without_a_size_the_output_is_the_photo():
    f = frame_photo((481, 640, 3), FaceBox(300, 200, 150), None)
    assert (f.width, f.height, f.scale, f.ox, f.oy) == (640, 480, 1.0, 0.0, 0.0)  # odd row dropped


def test_a_wide_view_crops_a_tall_photo_and_keeps_the_face_in_the_upper_middle():
    # 1000×1000 photo, a small head box at (500, 300): the 16:9 view is cut from the photo, no padding.
    face = FaceBox(500, 300, 200)
    f = frame_photo((1000, 1000, 3), face, (1280, 720))
    out = f.box(face)
    assert f.scale == pytest.approx(1280 / 1000)
    assert out.cx == pytest.approx(640, abs=1)
    assert out.cy == pytest.approx(FACE_CENTRE_Y * 720, abs=1)
    assert f.oy <= 0 and f.oy + 1000 * f.scale >= 720  # the photo covers the frame: nothing padded
    # a face near the top of the photo: the view stops at the photo's top instead of padding
    high = frame_photo((1000, 1000, 3), FaceBox(500, 120, 200), (1280, 720))
    assert high.oy == 0


def test_a_head_that_would_be_cut_pads_instead_and_never_more_than_the_whole_photo():
    # A tight portrait: the head box nearly as tall as the photo. Cropping to 16:9 would cut it.
    face = FaceBox(300, 420, 560)
    f = frame_photo((900, 600, 3), face, (1280, 720))
    out = f.box(face)
    assert out.cy - out.size / 2 >= -1 and out.cy + out.size / 2 <= 721  # the whole head box is shown
    assert 600 * f.scale < 1280  # padded at the sides
    huge = frame_photo((900, 600, 3), FaceBox(300, 450, 2000), (1280, 720))
    assert huge.scale == pytest.approx(720 / 900)  # at most the whole photo, padded to the aspect


def test_a_photo_smaller_than_the_output_is_enlarged_not_refused():
    f = frame_photo((120, 160, 3), FaceBox(80, 50, 60), (1280, 720))
    assert f.scale > 1 and (f.width, f.height) == (1280, 720)


# ----------------------------------------------------------------------------------------- mask, paste


def test_mask_covers_the_face_and_is_zero_at_the_crop_edge(astronaut):
    face = locate_source(astronaut)
    m = face_mask(face, 128)
    edge = math.ceil(EDGE_FADE * 128)
    assert m[:edge].max() == 0 and m[-edge:].max() == 0 and m[:, :edge].max() == 0 and m[:, -edge:].max() == 0
    u = (face.face_box.cx - face.crop_box.cx) / face.crop_box.size + 0.5
    v = (face.face_box.cy - face.crop_box.cy) / face.crop_box.size + 0.5
    assert m[int(v * 128), int(u * 128)] == pytest.approx(1.0)  # the face's centre is fully animated
    assert 0.25 < m.mean() < 0.6


def test_outside_the_mask_the_output_is_the_photo_pixel_for_pixel(astronaut):
    _, crop, plan = _plan(astronaut, size=None)
    assert np.array_equal(plan.background, astronaut)  # 512×512: no size, no resampling
    rng = np.random.default_rng(0)
    avatar = rng.integers(0, 256, crop.shape, dtype=np.uint8)  # anything the model could output
    out = paste(plan, avatar)
    x0, y0, x1, y1 = plan.roi
    outside = np.ones(out.shape[:2], bool)
    outside[y0:y1, x0:x1] = plan.mask <= 0
    assert outside.mean() > 0.3
    assert np.array_equal(out[outside], astronaut[outside])
    assert not np.array_equal(out[~outside], astronaut[~outside])  # and inside, the avatar shows


def test_the_photo_own_crop_pastes_back_without_seam_or_shift(astronaut):
    """The avatar at rest (the source crop itself) must give back the photo: no step at the mask's edge
    and the face exactly where it was (a shift would show as a double contour)."""
    _, crop, plan = _plan(astronaut, size=(1280, 720))
    check_no_seam_no_shift(plan, crop)


def check_no_seam_no_shift(plan, crop: np.ndarray, max_shift: float = 0.6) -> None:
    out = paste(plan, crop)
    x0, y0, x1, y1 = plan.roi
    got, want = out[y0:y1, x0:x1].astype(np.float32), plan.background[y0:y1, x0:x1].astype(np.float32)
    # The avatar is the n-px crop enlarged, so compare at its resolution: low-pass both.
    sigma = max(1.0, 0.5 * plan.crop_box.size / plan.model_side)
    g, w = cv2.GaussianBlur(got, (0, 0), sigma), cv2.GaussianBlur(want, (0, 0), sigma)
    inside = plan.mask > 0.05
    assert np.abs(g - w)[inside].mean() < 4.0  # colours: the photo's (no halo, no tint)
    band = (plan.mask > 0.05) & (plan.mask < 0.95)
    step = np.abs(g - w).mean(axis=2)[band]
    assert np.percentile(step, 95) < 12.0  # no visible step anywhere along the seam
    # shift: phase correlation of the low-passed grey images over the ROI
    gg, ww = cv2.cvtColor(g, cv2.COLOR_RGB2GRAY), cv2.cvtColor(w, cv2.COLOR_RGB2GRAY)
    win = cv2.createHanningWindow(gg.shape[::-1], cv2.CV_32F) * plan.mask
    (dx, dy), _ = cv2.phaseCorrelate(ww * win, gg * win)
    assert math.hypot(dx, dy) < max_shift, (dx, dy)


def test_colour_is_matched_at_the_seam(astronaut):
    _, crop, plan = _plan(astronaut, size=None)
    tinted = np.clip(crop.astype(int) + np.array([18, -12, 6]), 0, 255).astype(np.uint8)
    off = colour_offset(tinted, plan)
    assert np.allclose(off, [-18, 12, -6], atol=1.5)
    out = paste(plan, tinted).astype(np.float32)
    x0, y0, x1, y1 = plan.roi
    ring = (plan.mask > 0.2) & (plan.mask < 0.8)
    diff = (out[y0:y1, x0:x1] - astronaut[y0:y1, x0:x1].astype(np.float32))[ring].mean(axis=0)
    assert np.abs(diff).max() < 2.5  # the tint is gone where avatar and photo meet


def test_device_blend_matches_opencv(astronaut):
    from engine.paste import Paster

    _, crop, plan = _plan(astronaut, size=(640, 360))
    rng = np.random.default_rng(1)
    avatar = cv2.GaussianBlur(rng.integers(0, 256, crop.shape, dtype=np.uint8), (0, 0), 2)
    want = paste(plan, avatar)
    pred = torch.from_numpy(avatar).permute(2, 0, 1).float() / 255
    got = Paster(plan, "cpu", on_device=True)(pred)
    assert got.shape == want.shape == (360, 640, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 3
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 0.2
    small = plan_paste(astronaut, locate_source(astronaut), crop, (128, 72))  # face smaller than the crop
    assert small.avatar_side < N
    t = Paster(small, "cpu", on_device=True)(pred)
    # shrinking first: OpenCV's area filter and torch's adaptive average pool weigh the edge pixels of a
    # non-integer ratio differently, a few levels at most
    diff = np.abs(t.astype(int) - paste(small, avatar).astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.5


def test_animate_pictures_pastes_on_the_device_path(astronaut, engine):
    from engine.paste import Paster, animate_pictures

    face = locate_source(astronaut)
    crop = face.crop_box.crop(astronaut, engine.image_size)
    plan = plan_paste(astronaut, face, crop, (320, 180))
    session = engine.new_session(crop, relative=True)
    device, host = Paster(plan, "cpu", on_device=True), Paster(plan, "cpu")
    r_dev = animate_pictures(engine, [session], [crop], [device])[0]
    r_host = animate_pictures(engine, [session], [crop], [host])[0]
    assert r_dev.picture is not None and r_dev.picture.shape == (180, 320, 3)
    assert r_host.picture is None  # left to the caller's OpenCV paste (the server's media threads)
    assert np.abs(r_dev.picture.astype(int) - host(r_host.image).astype(int)).max() <= 3


# ------------------------------------------------------------------------------------------ bad input


def _tiny_face(photo: np.ndarray) -> np.ndarray:
    """The photo shrunk into a corner of a 4× larger, plain-coloured canvas: a small face."""
    h, w = photo.shape[:2]
    canvas = np.full((3 * h, 3 * w, 3), (96, 110, 120), np.uint8)
    canvas[h // 3 : h // 3 + h, 2 * w - w // 3 : 3 * w - w // 3] = photo
    return canvas


def _cut_by_border(photo: np.ndarray) -> np.ndarray:
    """The photo cropped so that the left border runs through the face."""
    face = locate_source(photo).face_box
    x = int(face.cx - 0.2 * face.size)  # through the cheek: the face box spans ±0.24 of the crop side
    return np.ascontiguousarray(photo[:, max(1, x) :])


def _tilted(photo: np.ndarray, degrees: float = 25.0) -> np.ndarray:
    h, w = photo.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(photo, m, (w, h), borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("name", ["s42", "s8"])
@pytest.mark.parametrize("make", [_tiny_face, _cut_by_border, _tilted], ids=["tiny", "cut", "tilted"])
@pytest.mark.parametrize("size", [(1280, 720), None], ids=["720p", "own-size"])
def test_bad_photos_paste_back_without_seam_or_shift(name, make, size):
    photo = make(_real(name))
    _, crop, plan = _plan(photo, size=size)
    if size is not None:
        assert plan.background.shape[:2] == (size[1], size[0])
    check_no_seam_no_shift(plan, crop)
    rng = np.random.default_rng(2)
    out = paste(plan, rng.integers(0, 256, crop.shape, dtype=np.uint8))
    x0, y0, x1, y1 = plan.roi
    outside = np.ones(out.shape[:2], bool)
    outside[y0:y1, x0:x1] = plan.mask <= 0
    assert np.array_equal(out[outside], plan.background[outside])


def test_a_tilted_face_gets_a_tilted_mask():
    photo = _real("s42")
    straight, tilted = locate_source(photo), locate_source(_tilted(photo, 25.0))
    from dagan.paste import _face_in_crop

    roll0, roll = _face_in_crop(straight)[2], _face_in_crop(tilted)[2]
    assert math.degrees(roll0 - roll) == pytest.approx(25.0, abs=6.0)  # cv2 rotates counter-clockwise


def test_a_face_cut_by_the_border_keeps_the_mask_on_the_face_not_on_the_crop_centre():
    photo = _cut_by_border(_real("s42"))
    face = locate_source(photo)
    crop, box = face.crop_box, face.face_box
    off = math.hypot(crop.cx - box.cx, crop.cy - box.cy)
    assert off > 0.02 * crop.size  # the crop was moved inside the photo: the face sits off-centre in it
    m = face_mask(face, 128)
    ys, xs = np.nonzero(m > 0.5)
    mx = crop.cx - crop.size / 2 + (xs.mean() + 0.5) / 128 * crop.size
    my = crop.cy - crop.size / 2 + (ys.mean() + 0.5) / 128 * crop.size
    assert math.hypot(mx - box.cx, my - box.cy) < 0.5 * off  # the mask follows the face


def test_a_small_photo_is_fitted_to_the_output():
    photo = _real("s12")  # 375×500
    _, crop, plan = _plan(photo, size=(1280, 720))
    assert plan.framing.scale > 1 and plan.background.shape == (720, 1280, 3)
    check_no_seam_no_shift(plan, crop)
