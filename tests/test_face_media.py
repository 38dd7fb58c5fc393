"""Tests for dagan.face (detection, cropping, tracking) and dagan.media (image/video I/O).

Real faces come from images bundled with scikit-image and matplotlib, so everything runs offline.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from dagan.face import (
    DEFAULT_MARGIN,
    FaceBox,
    FaceDetector,
    FaceTracker,
    NoFaceError,
    crop_source,
    face_landmarks,
    square_box,
    tracked_crops,
)
from dagan.media import MediaError, VideoReader, VideoWriter, load_image, read_video, write_video

# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()  # 512×512 RGB, face at about x 170–280, y 60–170


@pytest.fixture(scope="module")
def grace_hopper() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return load_image(path)  # 512 wide × 600 high


@pytest.fixture(scope="module")
def detector() -> Iterator[FaceDetector]:
    with FaceDetector() as det:
        yield det


def _shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    h, w = image.shape[:2]
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _grey(h: int = 480, w: int = 640) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


# ------------------------------------------------------------------------------------------ detection


def test_astronaut_face_is_found_and_cropped(astronaut: np.ndarray, detector: FaceDetector) -> None:
    detections = detector.detect(astronaut)
    assert len(detections) == 1
    det = detections[0]
    cx, cy = det.center
    assert 190 < cx < 260 and 80 < cy < 150, det.bbox
    assert 0.5 < det.score <= 1.0
    assert len(det.keypoints) == 6

    crop, box = crop_source(astronaut, out_size=256, detector=detector)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    # The crop box contains the whole detected face, and the face is about half the crop width.
    x0, y0, x1, y1 = box.bbox
    assert x0 < det.bbox[0] and y0 < det.bbox[1] and x1 > det.bbox[2] and y1 > det.bbox[3]
    assert 0.4 < det.width / box.size < 0.56
    # Lifted for the hair: the crop centre is above the face centre.
    assert box.cy < cy
    # The true face region (x 170–280, y 60–170) is inside the crop box.
    assert x0 < 170 and x1 > 280 and y0 < 60 and y1 > 170


def test_grace_hopper_face_is_found(grace_hopper: np.ndarray) -> None:
    assert grace_hopper.shape == (600, 512, 3)
    crop, box = crop_source(grace_hopper, out_size=128)  # detector created and closed internally
    assert crop.shape == (128, 128, 3)
    # Her face spans about x 170–365, y 130–340; the crop is centred on it, slightly above its middle.
    assert 230 < box.cx < 300 and 170 < box.cy < 260, box
    assert 300 < box.size < 560
    x0, y0, x1, y1 = box.bbox
    assert x0 < 175 and x1 > 360 and y0 < 135 and y1 > 335


def test_blank_image_has_no_face(detector: FaceDetector) -> None:
    assert detector.detect(_grey()) == []
    with pytest.raises(NoFaceError, match="no face found in the source image"):
        crop_source(_grey(), detector=detector)
    assert issubclass(NoFaceError, ValueError)


def test_detector_rejects_bad_input(detector: FaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="H×W×3"):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_detections_sorted_largest_first(astronaut: np.ndarray, detector: FaceDetector) -> None:
    # Two copies of the astronaut's head at different scales side by side.
    head = astronaut[20:260, 110:350]
    canvas = np.full((400, 700, 3), 200, np.uint8)
    canvas[40:280, 20:260] = head
    small = cv2.resize(head, (160, 160), interpolation=cv2.INTER_AREA)
    canvas[100:260, 420:580] = small
    detections = detector.detect(canvas)
    assert len(detections) == 2
    assert detections[0].area > detections[1].area
    assert detections[0].center[0] < 300 < detections[1].center[0]


def test_square_box_geometry() -> None:
    box = square_box((100.0, 100.0, 200.0, 150.0), (480, 640), margin=0.5, lift=0.1)
    assert box.size == pytest.approx(200.0)  # max(100, 50) * (1 + 2 * 0.5)
    assert box.cx == pytest.approx(150.0)
    assert box.cy == pytest.approx(125.0 - 5.0)  # lifted by 10% of the face height
    default = square_box((100.0, 100.0, 200.0, 200.0), (480, 640))
    assert default.size == pytest.approx(100.0 * (1 + 2 * DEFAULT_MARGIN))
    with pytest.raises(ValueError, match="positive width"):
        square_box((10.0, 10.0, 10.0, 50.0), (480, 640), margin=0.5)


def test_face_landmarks(astronaut: np.ndarray) -> None:
    points = face_landmarks(astronaut)
    assert points is not None
    assert points.shape == (478, 3) and points.dtype == np.float32
    xy_mean = points[:, :2].mean(axis=0)
    assert 170 < xy_mean[0] < 280 and 60 < xy_mean[1] < 180
    assert face_landmarks(_grey(256, 256)) is None


# --------------------------------------------------------------------------------------------- FaceBox


def test_facebox_crop_identity_and_area_downscale(astronaut: np.ndarray) -> None:
    whole = FaceBox(256.0, 256.0, 512.0)
    assert np.array_equal(whole.crop(astronaut, 512), astronaut)
    # Shrinking by exactly 2 is an area average of 2×2 blocks.
    expected = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(whole.crop(astronaut, 256).astype(int) - expected).max() <= 1
    # A sub-region: the crop of the top-left quarter equals that quarter resized.
    quarter = FaceBox(128.0, 128.0, 256.0).crop(astronaut, 256)
    assert np.array_equal(quarter, astronaut[:256, :256])


def test_facebox_crop_preshrinks_large_boxes_exactly_in_position(astronaut: np.ndarray) -> None:
    """A box ≥ 4× the output is averaged in m×m blocks first (the server's cost of a face that fills the
    webcam picture): the geometry stays sub-pixel exact and the values stay those of the direct path."""
    # A horizontal ramp: the area mean over an output pixel is the ramp at the pixel's centre, so any
    # error of position shows as an error of value. Sub-pixel boxes, ratios 4.3–7.9, partly outside too.
    ramp = np.broadcast_to((np.arange(1024, dtype=np.float64) * 0.24)[None, :, None], (700, 1024, 3))
    image = np.round(ramp).astype(np.uint8)
    for cx, cy, size, out in (
        (500.37, 350.61, 553.3, 128),
        (611.9, 300.2, 1011.7, 128),
        (300.3, 300.3, 500.1, 64),
    ):
        box = FaceBox(cx, cy, size)
        crop = box.crop(image, out, fit=False).astype(np.float64)
        centres = cx - size / 2 + (np.arange(out) + 0.5) * size / out
        inside = (centres - size / out / 2 >= 0) & (centres + size / out / 2 <= 1024)
        rows = slice(int(out * 0.3), int(out * 0.7))  # away from the top and bottom padding
        err = np.abs(crop[rows, inside, 0] - centres[inside] * 0.24)
        assert err.max() <= 1.0, (box, err.max())
    # Real pixels: the crop of the direct path, a little softer (the bilinear taps now fall between block
    # means). The astronaut is sharper than any webcam frame: 43–46 dB here, 50–52 dB on face clips.
    for box in (FaceBox(256.3, 250.9, 540.2), FaceBox(200.6, 300.1, 700.4), FaceBox(256.0, 256.0, 512.0)):
        fast, direct = box.crop(astronaut, 96), box.crop(astronaut, 96, preshrink=False)
        mse = np.mean((fast.astype(np.float64) - direct) ** 2)
        assert 10 * np.log10(255**2 / mse) > 40, box
    small = FaceBox(256.0, 256.0, 300.0)  # ratio < 4: the direct path, bit for bit
    assert np.array_equal(small.crop(astronaut, 96), small.crop(astronaut, 96, preshrink=False))


def test_facebox_crop_shifts_the_box_inside_where_it_fits(astronaut: np.ndarray) -> None:
    # Half outside on the left: the crop is the image's own left 256 columns, not padding.
    box = FaceBox(cx=0.0, cy=256.0, size=256.0)
    assert box.fit(astronaut.shape) == FaceBox(128.0, 256.0, 256.0)
    assert np.array_equal(box.crop(astronaut, 256), astronaut[128:384, :256])
    # Mostly outside the bottom-left corner: moved to the corner, same size (the face keeps its scale).
    corner = FaceBox(cx=10.0, cy=500.0, size=300.0)
    fitted = corner.fit(astronaut.shape)
    assert (fitted.cx, fitted.cy, fitted.size) == (150.0, 362.0, 300.0)
    assert np.array_equal(corner.crop(astronaut, 96), fitted.crop(astronaut, 96, fit=False))
    assert np.array_equal(corner.crop(astronaut, 96), FaceBox(150.0, 362.0, 300.0).crop(astronaut, 96))
    # A box already inside is untouched, and fit=False still cuts the box as given.
    inside = FaceBox(200.0, 200.0, 100.0)
    assert inside.fit(astronaut.shape) is inside
    assert not np.array_equal(corner.crop(astronaut, 96, fit=False), corner.crop(astronaut, 96))
    # Longer than one side only: inside along the other, covering the whole short side.
    wide = np.ascontiguousarray(astronaut[100:400])  # 300 high, 512 wide
    tall = FaceBox(cx=30.0, cy=20.0, size=400.0).fit(wide.shape)
    assert tall.size == 400.0 and tall.cx == 200.0  # x: moved inside [0, 512]
    assert tall.bbox[1] <= 0.0 and tall.bbox[3] >= 300.0  # y: covers all 300 rows
    assert tall.cy == 100.0  # ... moved as little as that allows (from 20: box rows -100..300)
    enlarged = FaceBox(cx=2.0, cy=2.0, size=20.0).crop(astronaut, 200)
    assert enlarged.shape == (200, 200, 3)
    assert np.array_equal(enlarged, FaceBox(10.0, 10.0, 20.0).crop(astronaut, 200))


def _replicated_crop(box: FaceBox, image: np.ndarray, out_size: int) -> np.ndarray:
    """The old crop: bilinear warp with edge replication outside the image (what made the streaks)."""
    step = box.size / out_size
    x0, y0 = box.cx - box.size / 2, box.cy - box.size / 2
    matrix = np.array([[step, 0, x0 + 0.5 * step - 0.5], [0, step, y0 + 0.5 * step - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(image, matrix, (out_size, out_size), flags=flags, borderMode=cv2.BORDER_REPLICATE)


def _streak_ratio(crop: np.ndarray, pad: int) -> float:
    """Edge detail carried into the padding: mean |difference between horizontal neighbours| in the
    padding rows (more than 4 rows from the image), over the same in the first 4 image rows at each edge.
    A streak copies the edge row outwards, so it keeps all of that detail (ratio ≈ 1); a fill that does
    not smear has little (a mirror image would keep it too, and also fail)."""
    g = np.abs(np.diff(crop.astype(np.float64), axis=1)).mean(axis=(1, 2))
    edge = np.r_[g[pad : pad + 4], g[-pad - 4 : -pad]].mean()
    return float(np.r_[g[: pad - 4], g[-pad + 4 :]].mean() / edge)


def test_facebox_crop_pads_without_streaks_where_the_box_cannot_fit(astronaut: np.ndarray) -> None:
    strip = np.ascontiguousarray(astronaut[40:240])  # 200 rows: the 320-px box cannot fit vertically
    box = FaceBox(256.0, 100.0, 320.0)
    crop = box.crop(strip, 256)
    pad = 48  # 60 source rows above and below = 48 output rows
    assert box.fit(strip.shape) == box
    old = _replicated_crop(box, strip, 256)
    assert _streak_ratio(old, pad) > 0.8  # the criterion catches the old streaks ...
    assert _streak_ratio(crop, pad) < 0.25  # ... and the new padding has none
    # The image rows are untouched: the same as cutting the box out of the full photo, where those
    # rows are real pixels (same sampling, one-pixel margin for the edge rows' bilinear footprint).
    full = FaceBox(256.0, 140.0, 320.0).crop(astronaut, 256, fit=False)
    assert np.array_equal(crop[pad + 1 : -pad - 1], full[pad + 1 : -pad - 1])
    # Natural: the padding continues the colours at the edge (no black or grey bar) ...
    for rows, edge in ((crop[pad - 8 : pad], strip[:6]), (crop[-pad : -pad + 8], strip[-6:])):
        assert np.abs(rows.reshape(-1, 3).mean(0) - edge.reshape(-1, 3).mean(0)).max() < 20
    # ... and varies smoothly (no seam of blocks or bands inside it).
    rows = crop[: pad - 1].astype(np.float64)
    assert np.abs(np.diff(rows, axis=0)).mean() < 3 and np.abs(np.diff(rows, axis=1)).mean() < 3
    # A box wholly outside the image has nothing to continue: its mean colour, not garbage.
    away = FaceBox(-1000.0, -1000.0, 50.0).crop(strip, 32, fit=False)
    assert np.abs(away.astype(int) - strip.reshape(-1, 3).mean(0)).max() <= 1


def test_source_and_driving_crops_stay_inside_the_photo(
    astronaut: np.ndarray, detector: FaceDetector
) -> None:
    edge = np.ascontiguousarray(astronaut[50:, 150:])  # the face now touches the top-left corner
    h, w = edge.shape[:2]
    raw = square_box(detector.detect(edge)[0], edge.shape)
    assert raw.bbox[0] < 0 or raw.bbox[1] < 0  # the face-centred box runs past the edge ...
    crop, box = crop_source(edge, out_size=128, detector=detector)
    x0, y0, x1, y1 = box.bbox
    assert min(x0, y0) >= 0 and x1 <= w and y1 <= h  # ... the crop box does not
    assert box.size == pytest.approx(raw.size)  # same face scale
    assert np.array_equal(crop, box.crop(edge, 128, fit=False))
    tracker = FaceTracker(out_size=128, detector=detector)
    driving, tracked = tracker.update(edge)
    assert tracked is not None
    fitted = tracked.fit(edge.shape)
    assert fitted.bbox[0] >= 0 and fitted.bbox[1] >= 0
    assert np.array_equal(driving, fitted.crop(edge, 128, fit=False))


def test_facebox_dict_round_trip_and_validation() -> None:
    box = FaceBox(1.5, 2.5, 30.0)
    assert box.to_dict() == {"cx": 1.5, "cy": 2.5, "size": 30.0}
    assert FaceBox.from_dict(box.to_dict()) == box
    with pytest.raises(ValueError):
        FaceBox(0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------- tracker


def _jitter(centres: np.ndarray) -> float:
    """RMS of frame-to-frame centre motion after removing the constant drift."""
    steps = np.diff(centres, axis=0)
    steps = steps - steps.mean(axis=0)
    return float(np.sqrt((steps**2).sum(axis=1).mean()))


def test_tracked_crops_leave_out_the_frames_before_the_first_face(astronaut: np.ndarray) -> None:
    """A clip's crops as the server makes them: the two blank frames before the face are left out, the
    rest keep their index in the clip, and the detector runs on every third frame (``detect_every``)."""
    astro = cv2.resize(astronaut, (640, 640))
    frames = [_grey(640, 640)] * 2 + [_shift(astro, 2 * i, 0) for i in range(7)]
    out = list(tracked_crops(frames, 25.0, 64, detect_every=3))
    assert [f.index for f in out] == list(range(2, 9))
    assert all(f.crop.shape == (64, 64, 3) and f.crop.dtype == np.uint8 for f in out)
    assert [f.detected for f in out][:1] == [True]
    # the same frames through a tracker driven by hand give the same crops
    with FaceTracker(out_size=64, detect_every=3) as tracker:
        by_hand = [
            b.crop(fr, 64) for i, fr in enumerate(frames) if (b := tracker.locate(fr, i / 25.0)) is not None
        ]
    for a, b in zip(out, by_hand, strict=True):
        np.testing.assert_array_equal(a.crop, b)


def test_tracker_smooths_jitter(astronaut: np.ndarray, detector: FaceDetector) -> None:
    rng = np.random.default_rng(1234)
    tracker = FaceTracker(out_size=128, detector=detector)
    raw, smooth = [], []
    n = 40
    for i in range(n):
        dx = 0.4 * i + rng.uniform(-0.6, 0.6)
        dy = 0.2 * i + rng.uniform(-0.6, 0.6)
        frame = _shift(astronaut, dx, dy)
        raw_box = square_box(detector.detect(frame)[0], frame.shape)
        crop, box = tracker.update(frame)
        assert crop.shape == (128, 128, 3)
        assert box is not None
        raw.append((raw_box.cx, raw_box.cy))
        smooth.append((box.cx, box.cy))
    raw_arr, smooth_arr = np.array(raw)[8:], np.array(smooth)[8:]  # skip the lock-on transient
    raw_jitter, smooth_jitter = _jitter(raw_arr), _jitter(smooth_arr)
    assert raw_jitter > 0.3  # the sequence really is jittery
    assert smooth_jitter < 0.5 * raw_jitter, (raw_jitter, smooth_jitter)
    # ... while still following the drift (16 px right, 8 px down over the sequence).
    drift = smooth_arr[-1] - smooth_arr[0]
    assert abs(drift[0] - 0.4 * (n - 9)) < 4 and abs(drift[1] - 0.2 * (n - 9)) < 4
    assert np.abs(smooth_arr[-1] - raw_arr[-1]).max() < 6  # small lag only


def test_tracker_still_head_gives_still_crop(astronaut: np.ndarray, detector: FaceDetector) -> None:
    rng = np.random.default_rng(7)
    tracker = FaceTracker(out_size=64, detector=detector)
    boxes = []
    for _ in range(15):
        noisy = np.clip(astronaut + rng.normal(0, 2.0, astronaut.shape), 0, 255).astype(np.uint8)
        boxes.append(tracker.update(noisy)[1])
    assert len(set(boxes[3:])) == 1  # bit-identical box, hence an identical crop of a still scene


def test_tracker_relocks_on_jump(astronaut: np.ndarray, detector: FaceDetector) -> None:
    tracker = FaceTracker(detector=detector)
    canvas = np.full((512, 900, 3), 60, np.uint8)
    left = canvas.copy()
    left[:, :512] = astronaut
    right = canvas.copy()
    right[:, 388:] = astronaut
    for _ in range(3):
        _, before = tracker.update(left)
    _, after = tracker.update(right)
    assert before is not None and after is not None
    assert after.cx - before.cx == pytest.approx(388.0, abs=8.0)  # snapped in one frame, no glide


def test_tracker_keeps_box_when_face_is_lost(astronaut: np.ndarray, detector: FaceDetector) -> None:
    tracker = FaceTracker(out_size=96, detector=detector)
    grey = _grey(512, 512)
    crop, box = tracker.update(grey)  # never seen a face: centred square of the short side, box None
    assert box is None and crop.shape == (96, 96, 3)
    assert not tracker.face_found and tracker.frames_without_face == 1
    crop, box = tracker.update(astronaut)
    assert box is not None and tracker.face_found
    lost_crop, lost_box = tracker.update(grey)
    assert lost_box == box  # the previous box is kept and returned
    assert not tracker.face_found and tracker.frames_without_face == 2
    assert lost_crop.shape == (96, 96, 3)
    assert np.array_equal(lost_crop, box.crop(grey, 96))
    tracker.reset()
    assert tracker.update(grey)[1] is None


def test_tracker_detect_every(astronaut: np.ndarray) -> None:
    calls = 0

    class CountingDetector(FaceDetector):
        def detect(self, image_rgb: np.ndarray):  # type: ignore[override]
            nonlocal calls
            calls += 1
            return super().detect(image_rgb)

    with CountingDetector() as det, FaceTracker(detect_every=3, detector=det) as tracker:
        for _ in range(7):
            _, box = tracker.update(astronaut)
            assert box is not None
    assert calls == 3  # frames 0, 3 and 6


# ----------------------------------------------------------------------------------------------- images


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n" * 20)
    with pytest.raises(MediaError, match="is not an image"):
        load_image(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"is not an image \(the file is empty\)"):
        load_image(empty)
    with pytest.raises(MediaError, match="directory"):
        load_image(tmp_path)
    video = tmp_path / "clip.mp4"
    write_video(video, _levels(2), fps=25)
    with pytest.raises(MediaError, match=r"clip\.mp4 is not an image"):
        load_image(video)


def test_load_image_channels_and_colour_order(tmp_path: Path) -> None:
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    gray_path = tmp_path / "gray.png"
    assert cv2.imwrite(str(gray_path), gray)
    rgb = load_image(gray_path)
    assert rgb.shape == (32, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:, :, 0], gray) and np.array_equal(rgb[:, :, 2], gray)

    bgr_red = np.zeros((8, 8, 3), np.uint8)
    bgr_red[:, :, 2] = 255  # red in OpenCV's BGR order
    red_path = tmp_path / "rött.jpg"  # non-ASCII name on purpose
    assert cv2.imencode(".jpg", bgr_red)[1].tofile(str(red_path)) is None
    red = load_image(red_path)
    assert red[:, :, 0].mean() > 240 and red[:, :, 2].mean() < 15

    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[:, :, 0] = 255  # blue, fully transparent except one pixel
    bgra[0, 0, 3] = 255
    rgba_path = tmp_path / "alpha.png"
    assert cv2.imwrite(str(rgba_path), bgra)
    flat = load_image(rgba_path)
    assert flat.shape == (4, 4, 3)
    assert tuple(flat[0, 0]) == (0, 0, 255) and tuple(flat[2, 2]) == (255, 255, 255)


# ----------------------------------------------------------------------------------------------- videos


def _levels(n: int = 12, size: int = 64) -> list[np.ndarray]:
    return [np.full((size, size, 3), 10 + 20 * i, np.uint8) for i in range(n)]


def test_video_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "clip.mp4"  # parent created by the writer
    frames = _levels()
    with VideoWriter(path, fps=12.5) as writer:
        for frame in frames:
            writer.write(frame)
    assert path.is_file() and writer.frames_written == 12
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary file left

    with VideoReader(path) as reader:
        assert reader.fps == pytest.approx(12.5, abs=0.01)
        assert reader.size == (64, 64)
        assert reader.frame_count == 12
        decoded = list(reader)
        again = list(reader)  # iterating again restarts at the first frame
    assert len(decoded) == 12 and len(again) == 12
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in decoded)
    means = [float(f.mean()) for f in decoded]
    assert all(b > a for a, b in itertools.pairwise(means)), means
    assert abs(means[0] - 10) < 6 and abs(means[-1] - 230) < 6

    frames2, fps = read_video(path, max_frames=5)
    assert len(frames2) == 5 and fps == pytest.approx(12.5, abs=0.01)


def test_write_video_replaces_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    assert write_video(path, _levels(3), fps=25) == 3
    first_size = path.stat().st_size
    assert write_video(path, _levels(6), fps=25) == 6
    assert path.stat().st_size != first_size
    assert len(read_video(path)[0]) == 6


def test_video_writer_rejects_other_frame_sizes(tmp_path: Path) -> None:
    path = tmp_path / "sizes.mp4"
    with pytest.raises(MediaError, match=r"32×32 but .* is 64×64"), VideoWriter(path) as writer:
        writer.write(np.zeros((64, 64, 3), np.uint8))
        writer.write(np.zeros((32, 32, 3), np.uint8))
    assert not path.exists()


def test_interrupted_writer_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, fps=25) as writer:
        for frame in _levels(4):
            writer.write(frame)
        raise RuntimeError("boom")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too

    # An existing video at the final path survives an interrupted rewrite untouched.
    write_video(path, _levels(2), fps=25)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt), VideoWriter(path) as writer:
        writer.write(_levels(1)[0])
        raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["broken.mp4"]


def test_writer_without_frames_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nothing.mp4"
    with pytest.raises(MediaError, match="no frames were written"):
        write_video(path, [], fps=25)
    assert not path.exists()


def test_folder_of_frames(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    # Unpadded names on purpose: 2 must come before 10.
    for index, level in zip((1, 2, 10, 11), (40, 80, 120, 160), strict=True):
        assert cv2.imwrite(str(folder / f"frame_{index}.png"), np.full((20, 30, 3), level, np.uint8))
    (folder / "readme.txt").write_text("ignored")
    with VideoReader(folder) as reader:
        assert reader.fps == 25.0 and reader.size == (30, 20) and reader.frame_count == 4
        levels = [int(f[0, 0, 0]) for f in reader]
    assert levels == [40, 80, 120, 160]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="contains no frames"):
        VideoReader(empty)


def test_unreadable_videos(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        VideoReader(tmp_path / "missing.mp4")

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(MediaError, match="could not be read as a video"):
        VideoReader(garbage)

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="could not be read as a video"):
        VideoReader(empty)

    # A valid container with zero frames: an AVI whose writer was released before any write.
    zero = tmp_path / "zero.avi"
    writer = cv2.VideoWriter(str(zero), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 64))
    assert writer.isOpened()
    writer.release()
    assert zero.stat().st_size > 0
    with pytest.raises(MediaError, match="contains no frames"):
        VideoReader(zero)
