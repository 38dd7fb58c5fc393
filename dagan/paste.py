"""Paste-back: the animated face crop blended back into the full-resolution source photo, and the photo
framed for a meeting (``--output-size 1280x720``).

The model animates only the face crop (128 px for the bundled weights); shown alone that is a small
square with a band of soft, warping background. Pasting it back where it came from keeps the rest of the
photo sharp and still, as the leading open systems do by default (LivePortrait's "paste back"):

1. **Framing** (:func:`frame_photo`): the whole photo, cropped or padded to the output's aspect, scaled to
   the output size, the face in the upper middle the way a webcam frames a person. Padding (a photo too
   narrow for 16:9, a face near the border) shows the photo itself enlarged and blurred behind it, as
   phones show a portrait video in landscape, never black bars. Computed once per photo
   (:func:`plan_paste`), like the engine's source cache.
2. **Mask** (:func:`face_mask`): a soft mask in crop coordinates that covers the face (with hair, ears
   and chin) and fades to zero before the crop's edge, placed on the face (not on the crop's centre:
   a face near the photo's border sits off-centre in its crop) and turned with the face's roll. A fixed
   feathered ellipse is the default; ``mesh`` grows it from the photo's 478-point face mesh instead
   (the comparison that chose the default is in docs/server.md, "Paste-back").
3. **Per frame** (:func:`paste`): the avatar's colour is matched to the photo's where the two mix (a
   per-channel offset measured on the mask's transition ring, so no halo shows at the seam), the avatar
   is resampled onto the crop's place in the output and blended by the mask. Outside the mask the
   output *is* the framed photo, pixel for pixel; with no output size that is the photo itself.

Everything here is NumPy/OpenCV on the CPU (≈ 1–2 ms per 1280×720 frame); the engine's device-side
version of step 3 (:mod:`engine.paste`) uses the same :class:`PastePlan`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np

from .face import FaceBox, SourceFace

__all__ = [
    "DEFAULT_MASK",
    "MASKS",
    "Framing",
    "PastePlan",
    "colour_offset",
    "face_mask",
    "frame_photo",
    "parse_size",
    "paste",
    "plan_paste",
]

MASKS = ("ellipse", "mesh")
# The mask every command uses unless told otherwise (docs/server.md, "Paste-back": the measurement).
DEFAULT_MASK = "ellipse"
# The ellipse in units of the face's square box (the crop's side): half-axes of its outer edge, where
# the mask reaches 0, and the inner fraction of them where it is 1. The box is ≈ 2.1 face widths wide
# with the head centred (dagan.face.DEFAULT_MARGIN, HEAD_LIFT), so this covers ears, hair line and chin.
ELLIPSE_AXES = (0.40, 0.47)
ELLIPSE_INNER = 0.68
# The mask is 0 on the crop's outermost EDGE_FADE (fraction of its side) and reaches full height only
# 2·EDGE_FADE inside: so it fades before the crop's edge even where the face sits near it.
EDGE_FADE = 0.03
# Where the face sits in a meeting frame: the head box's centre at this fraction of the height (upper
# middle, like a webcam at eye level), and the view at least this many head boxes tall when the photo
# has to be padded to get there.
FACE_CENTRE_Y = 0.45
MIN_VIEW_HEADS = 1.15
# The colour offset at the seam is clamped to this many levels per channel (a driver who covers the
# face with a hand must not tint the whole avatar).
MAX_COLOUR_OFFSET = 24.0
MAX_OUTPUT_SIDE = 4096


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` → (1280, 720). Sides are even (the video encoders' 4:2:0 needs it) and 16..4096."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"output size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    for side in (w, h):
        if not (16 <= side <= MAX_OUTPUT_SIDE) or side % 2:
            raise ValueError(
                f"output size {w}x{h}: each side must be an even number from 16 to {MAX_OUTPUT_SIDE}"
            )
    return w, h


# ---------------------------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Framing:
    """Where the photo sits in the output frame: photo point (x, y) → output (x·scale + ox, y·scale + oy)
    in continuous pixel coordinates (pixel i covers [i, i+1)), output ``width``×``height``."""

    width: int
    height: int
    scale: float
    ox: float
    oy: float

    def box(self, box: FaceBox) -> FaceBox:
        """A photo box in output coordinates."""
        return FaceBox(box.cx * self.scale + self.ox, box.cy * self.scale + self.oy, box.size * self.scale)

    def aligned(self, box: FaceBox) -> Framing:
        """This framing nudged so that ``box`` (photo coordinates: the model's crop) covers whole output
        pixels: the scale changes by at most half a pixel over the box's side, the offsets by at most
        half a pixel. The avatar then goes into place by a plain resize, exactly (no sub-pixel error)
        and several times faster than a general resampling."""
        s = max(1, round(box.size * self.scale)) / box.size
        left, top = box.cx - box.size / 2, box.cy - box.size / 2
        ox = round(left * self.scale + self.ox) - left * s
        oy = round(top * self.scale + self.oy) - top * s
        return Framing(self.width, self.height, s, ox, oy)


def _place(centre: float, view: float, side: float, at: float) -> float:
    """Start of a view of length ``view`` along an axis of the photo of length ``side`` that puts
    ``centre`` at fraction ``at`` of the view, moved inside the photo where it fits (no padding) or to
    cover the whole side where it does not (the least padding) — :meth:`FaceBox.fit` for one axis."""
    start = centre - at * view
    lo, hi = (0.0, side - view) if view <= side else (side - view, 0.0)
    return min(max(start, lo), hi)


def frame_photo(photo_shape: tuple[int, ...], face: FaceBox, size: tuple[int, int] | None) -> Framing:
    """The framing of a photo for an output of ``size`` (width, height), or the photo itself for None.

    With a size: the view is the largest rectangle of the output's aspect inside the photo (cropping the
    long side), positioned with the head box's centre at half the width and :data:`FACE_CENTRE_Y` of the
    height as far as the photo allows; when that view would cut the head (a portrait photo into 16:9), it
    grows, padding the photo, until the head box fits with a margin (:data:`MIN_VIEW_HEADS`), and never
    beyond the whole photo padded to the aspect. The view is then scaled to the output, up or down: a
    photo smaller than the output is enlarged, not refused. Without a size the output is the photo at
    its own resolution (an odd last row or column dropped, for the video encoders).
    """
    h, w = int(photo_shape[0]), int(photo_shape[1])
    if size is None:
        return Framing(w - w % 2, h - h % 2, 1.0, 0.0, 0.0)
    out_w, out_h = int(size[0]), int(size[1])
    aspect = out_w / out_h
    crop_h = min(h, w / aspect)  # largest view inside the photo
    pad_h = max(h, w / aspect)  # smallest view containing it
    view_h = min(max(crop_h, MIN_VIEW_HEADS * face.size), pad_h)
    view_w = view_h * aspect
    x0 = _place(face.cx, view_w, w, 0.5)
    y0 = _place(face.cy, view_h, h, FACE_CENTRE_Y)
    scale = out_w / view_w
    # Whole output pixels of offset: an unscaled photo is then copied exactly, pixel for pixel.
    return Framing(out_w, out_h, scale, float(round(-x0 * scale)), float(round(-y0 * scale)))


def _coverage(origin: float, scale: float, n: int, side: int) -> np.ndarray:
    """Per output pixel along one axis, the fraction of it that shows the photo [0, side)."""
    lo = (np.arange(n, dtype=np.float64) - origin) / scale
    return np.clip((np.minimum(lo + 1 / scale, side) - np.maximum(lo, 0.0)) * scale, 0.0, 1.0)


def render_background(photo: np.ndarray, framing: Framing) -> np.ndarray:
    """The photo as the output frame shows it (:class:`Framing`), padding filled without bars."""
    h, w = photo.shape[:2]
    s = framing.scale
    src, ratio = photo, 1.0
    if s < 1.0:  # shrink with an area filter first (warpAffine has none), then place sub-pixel exactly
        rw, rh = max(1, round(w * s)), max(1, round(h * s))
        src = cv2.resize(photo, (rw, rh), interpolation=cv2.INTER_AREA)
        ratio = rw / w  # src pixels per photo pixel (≈ s)
    step = 1.0 / (s / ratio)  # src pixels per output pixel
    # inverse map: output index X → src index ((X + 0.5 − ox) / s) · ratio − 0.5
    matrix = np.array(
        [
            [step, 0.0, (0.5 - framing.ox) / s * ratio - 0.5],
            [0.0, step, (0.5 - framing.oy) / s * ratio - 0.5],
        ]
    )
    if s == 1.0 and float(framing.ox).is_integer() and float(framing.oy).is_integer():
        matrix[:, 2] = np.round(matrix[:, 2])  # an exact copy, no resampling at all
    out = cv2.warpAffine(
        src,
        matrix,
        (framing.width, framing.height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    cov_x = _coverage(framing.ox, s, framing.width, w)
    cov_y = _coverage(framing.oy, s, framing.height, h)
    if cov_x.min() < 1.0 or cov_y.min() < 1.0:
        cover = (cov_y[:, None] * cov_x[None, :]).astype(np.float32)
        out = cv2.blendLinear(out, _backdrop(photo, framing.width, framing.height), cover, 1.0 - cover)
    return out


def _backdrop(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """What the padding shows: the photo scaled to cover the whole output, heavily blurred and a little
    darker — the photo's own colours and light continued, read as out-of-focus background, with no bars
    and no smeared edge pixels. Made at 1/8 of the output size (it is smooth), then enlarged."""
    sw, sh = max(2, width // 8), max(2, height // 8)
    h, w = photo.shape[:2]
    cover = max(sw / w, sh / h)
    cw, ch = max(sw, math.ceil(w * cover)), max(sh, math.ceil(h * cover))
    small = cv2.resize(photo, (cw, ch), interpolation=cv2.INTER_AREA)
    x0, y0 = (cw - sw) // 2, (ch - sh) // 2
    small = small[y0 : y0 + sh, x0 : x0 + sw]
    small = cv2.GaussianBlur(small, (0, 0), 0.03 * max(sw, sh), borderType=cv2.BORDER_REFLECT)
    small = cv2.convertScaleAbs(small, alpha=0.8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------------------------- mask


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _edge_fade(n: int) -> np.ndarray:
    """n×n: 0 on the crop's outer :data:`EDGE_FADE`, rising smoothly to 1 at twice that."""
    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    d = np.minimum(u, 1.0 - u)
    ramp = _smoothstep((d - EDGE_FADE) / EDGE_FADE)
    return ramp[:, None] * ramp[None, :]


def _face_in_crop(source: SourceFace) -> tuple[float, float, float]:
    """The face box's centre in crop units ([0, 1]², 0.5 = the crop's centre) and the face's roll
    (radians, from the detector's eye keypoints; 0 without them)."""
    crop, face = source.crop_box, source.face_box
    u = (face.cx - crop.cx) / crop.size + 0.5
    v = (face.cy - crop.cy) / crop.size + 0.5
    roll = 0.0
    kps = source.detection.keypoints
    if len(kps) >= 2:
        (rx, ry), (lx, ly) = kps[0], kps[1]  # the person's right eye is on the image's left
        if lx != rx or ly != ry:
            roll = math.atan2(ly - ry, lx - rx)
            if abs(roll) > math.pi / 2:  # keypoints in the other order: same line
                roll -= math.copysign(math.pi, roll)
    return u, v, roll


def _ellipse(n: int, u: float, v: float, roll: float, scale: float = 1.0) -> np.ndarray:
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    x, y = c[None, :] - u, c[:, None] - v
    cos, sin = math.cos(roll), math.sin(roll)
    xr, yr = cos * x + sin * y, -sin * x + cos * y
    ax, ay = ELLIPSE_AXES[0] * scale, ELLIPSE_AXES[1] * scale
    r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2)
    return _smoothstep((1.0 - r) / (1.0 - ELLIPSE_INNER))


def _mesh_mask(crop: np.ndarray, n: int) -> np.ndarray | None:
    """The face mesh's hull on the source crop, grown by a fifth about its centre (forehead to hair
    line, jaw room to open the mouth) and feathered; None when the mesh finds no face in the crop."""
    from .face import face_landmarks

    side = max(256, crop.shape[0])
    big = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC) if crop.shape[0] != side else crop
    lm = face_landmarks(big)
    if lm is None:
        return None
    pts = lm[:, :2].astype(np.float64) / side * n
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    centre = hull.mean(axis=0)
    grown = centre + (hull - centre) * np.array([1.2, 1.3])
    grown[:, 1] -= 0.04 * n  # the mesh stops at the brows' top: more room upwards, for the hair line
    hi = 4 * n
    canvas = np.zeros((hi, hi), np.float32)
    cv2.fillPoly(canvas, [np.round(grown * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA)
    sigma = 0.05 * hi
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return cv2.resize(canvas, (n, n), interpolation=cv2.INTER_AREA).astype(np.float64)


def _photo_fade(source: SourceFace, photo_shape: tuple[int, ...], n: int) -> np.ndarray:
    """n×n: 1 where the crop shows the photo, fading to 0 at the photo's border (over :data:`EDGE_FADE`
    of the crop), 0 in the padding of a crop box larger than the photo. Pasting the avatar only over the
    photo keeps the padding the frame's own (a face cut by the border is not extended into it)."""
    box = source.crop_box
    h, w = int(photo_shape[0]), int(photo_shape[1])
    c = (np.arange(n, dtype=np.float64) + 0.5) / n * box.size
    x, y = box.cx - box.size / 2 + c, box.cy - box.size / 2 + c
    ramp = 2 * EDGE_FADE * box.size

    def axis(p: np.ndarray, side: int) -> np.ndarray:
        inside = np.minimum(p, side - p)  # distance to the photo's border, negative outside
        return _smoothstep(inside / ramp)

    return axis(y, h)[:, None] * axis(x, w)[None, :]


def face_mask(
    source: SourceFace,
    n: int,
    kind: str = "ellipse",
    crop: np.ndarray | None = None,
    photo_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """The soft paste mask at the crop's resolution n×n (float32 in [0, 1]): ``ellipse`` or ``mesh``
    (which needs the source ``crop`` and falls back to the ellipse when the mesh finds no face).
    Always 0 at the crop's edge (:data:`EDGE_FADE`) and, given the photo's shape, outside the photo."""
    if kind not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {kind!r}")
    u, v, roll = _face_in_crop(source)
    mask = None
    if kind == "mesh":
        if crop is None:
            raise ValueError("the mesh mask needs the source crop")
        mask = _mesh_mask(crop, n)
    if mask is None:
        mask = _ellipse(n, u, v, roll)
    mask = mask * _edge_fade(n)
    if photo_shape is not None:
        mask = mask * _photo_fade(source, photo_shape, n)
    return mask.astype(np.float32)


# ------------------------------------------------------------------------------------------------- plan


@dataclass
class PastePlan:
    """Everything a frame's paste needs, computed once per photo and output size.

    ``background``: the framed photo (H×W×3 uint8). ``roi``: (x0, y0, x1, y1), the output pixels the mask
    reaches (outside them the output is ``background``). ``matrix``: the 2×3 inverse map from a ROI
    pixel index to an avatar pixel index (of an avatar of side ``avatar_side``; the model's output is
    first shrunk to it with an area filter when the face is smaller in the output than the model's
    crop). ``resize_to``/``resize_offset``: when the crop covers whole output pixels (every fitted
    output size, :meth:`Framing.aligned`), the same map as a plain resize of the avatar to that side and
    the ROI's place in it; None for the photo's own size, which is resampled by ``matrix``.
    ``mask``/``inv_mask``: the mask and 1 − mask over the ROI (float32). ``ring``: n×n weights of the
    mask's transition (where avatar and photo mix), and ``source_crop``: the model's crop of the photo,
    for the colour offset (``ring_index``/``ring_weight``/``ring_target``: the same, gathered once).
    ``crop_box``/``framing``: the geometry, for callers and tests.
    """

    background: np.ndarray
    roi: tuple[int, int, int, int]
    matrix: np.ndarray
    avatar_side: int
    model_side: int
    mask: np.ndarray
    inv_mask: np.ndarray
    ring: np.ndarray
    source_crop: np.ndarray
    crop_mask: np.ndarray
    crop_box: FaceBox
    framing: Framing
    resize_to: int | None = None
    resize_offset: tuple[int, int] = (0, 0)
    ring_index: np.ndarray | None = None
    ring_weight: np.ndarray | None = None
    ring_target: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.framing.width, self.framing.height


def plan_paste(
    photo: np.ndarray,
    source: SourceFace,
    source_crop: np.ndarray,
    size: tuple[int, int] | None = None,
    mask: str = "ellipse",
) -> PastePlan:
    """The :class:`PastePlan` for a photo, its face (:func:`dagan.face.locate_source`) and the model's
    crop of it (``source_crop``, n×n: the avatar has that size), for an output of ``size`` (None: the
    photo's own)."""
    n = int(source_crop.shape[0])
    framing = frame_photo(photo.shape, source.face_box, size)
    if size is not None:
        framing = framing.aligned(source.crop_box)
    background = render_background(photo, framing)
    crop_mask = face_mask(source, n, mask, source_crop, photo.shape)
    box = framing.box(source.crop_box)
    bx0, by0 = box.cx - box.size / 2, box.cy - box.size / 2
    resize_to = None
    if size is not None:  # aligned: whole pixels (up to float rounding)
        resize_to = round(box.size)
        bx0, by0 = float(round(bx0)), float(round(by0))
        box = FaceBox(bx0 + resize_to / 2, by0 + resize_to / 2, float(resize_to))
        side = n if resize_to >= n else resize_to
    else:
        side = n if box.size >= n else max(8, math.ceil(box.size))
    k = side / box.size  # avatar pixels per output pixel
    # ROI: the box's footprint in the output, then shrunk to where the warped mask is not zero.
    x0, y0 = max(0, math.floor(bx0)), max(0, math.floor(by0))
    x1, y1 = min(framing.width, math.ceil(bx0 + box.size)), min(framing.height, math.ceil(by0 + box.size))
    if x1 <= x0 or y1 <= y0:  # the face is outside the output (cannot happen with frame_photo's views)
        x0, y0, x1, y1 = 0, 0, 1, 1

    def matrix_for(ox: int, oy: int) -> np.ndarray:
        return np.array(
            [[k, 0.0, (ox + 0.5 - bx0) * k - 0.5], [0.0, k, (oy + 0.5 - by0) * k - 0.5]], dtype=np.float64
        )

    mask_side = cv2.resize(crop_mask, (side, side), interpolation=cv2.INTER_AREA) if side != n else crop_mask
    warped = cv2.warpAffine(
        mask_side, matrix_for(x0, y0), (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    ys, xs = np.nonzero(warped > 0)
    if len(xs):
        x0, x1, y0, y1 = (
            x0 + int(xs.min()),
            x0 + int(xs.max()) + 1,
            y0 + int(ys.min()),
            y0 + int(ys.max()) + 1,
        )
        warped = warped[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    else:
        warped = np.zeros((y1 - y0, x1 - x0), np.float32)
    warped = np.ascontiguousarray(np.clip(warped, 0.0, 1.0), dtype=np.float32)
    ring = (4.0 * crop_mask * (1.0 - crop_mask)).astype(np.float32)
    index = np.flatnonzero(ring > 0.01)
    weight = ring.reshape(-1)[index]
    weight = (weight / max(float(weight.sum()), 1e-9)).astype(np.float32)
    target = weight @ source_crop.reshape(-1, 3)[index].astype(np.float32)
    return PastePlan(
        background=background,
        roi=(x0, y0, x1, y1),
        matrix=matrix_for(x0, y0),
        avatar_side=side,
        model_side=n,
        mask=warped,
        inv_mask=np.ascontiguousarray(1.0 - warped, dtype=np.float32),
        ring=ring,
        source_crop=np.ascontiguousarray(source_crop),
        crop_mask=crop_mask,
        crop_box=box,
        framing=framing,
        resize_to=resize_to,
        resize_offset=(x0 - int(bx0), y0 - int(by0)),
        ring_index=index,
        ring_weight=weight,
        ring_target=target,
    )


# ------------------------------------------------------------------------------------------- per frame


def colour_offset(avatar: np.ndarray, plan: PastePlan) -> np.ndarray:
    """Per-channel offset (float, RGB) that brings the avatar's colour to the photo's on the mask's
    transition ring: the weighted mean of photo − avatar there, clamped to ±:data:`MAX_COLOUR_OFFSET`."""
    if plan.ring_index is None or not len(plan.ring_index):
        return np.zeros(3)
    mean = plan.ring_target - plan.ring_weight @ avatar.reshape(-1, 3)[plan.ring_index].astype(np.float32)
    return np.clip(mean, -MAX_COLOUR_OFFSET, MAX_COLOUR_OFFSET)


def paste(plan: PastePlan, avatar: np.ndarray) -> np.ndarray:
    """One frame: the avatar (the model's n×n RGB uint8 output) blended into a copy of the framed photo.

    Costs a copy of the background, one resample of the avatar onto the ROI and one weighted blend
    there (OpenCV, which releases the GIL: the server runs it on its media threads)."""
    n = plan.model_side
    if avatar.shape != (n, n, 3) or avatar.dtype != np.uint8:
        raise ValueError(f"paste needs the model's {n}×{n}×3 uint8 output, got {avatar.shape} {avatar.dtype}")
    off = colour_offset(avatar, plan)
    a = cv2.add(avatar, (float(off[0]), float(off[1]), float(off[2]), 0.0))
    x0, y0, x1, y1 = plan.roi
    if plan.resize_to is not None:  # the crop covers whole pixels: a plain resize puts it in place
        side = plan.resize_to
        interp = cv2.INTER_AREA if side < n else cv2.INTER_LINEAR
        big = cv2.resize(a, (side, side), interpolation=interp)
        ox, oy = plan.resize_offset
        warped = big[oy : oy + y1 - y0, ox : ox + x1 - x0]
    else:
        if plan.avatar_side != n:
            a = cv2.resize(a, (plan.avatar_side, plan.avatar_side), interpolation=cv2.INTER_AREA)
        warped = cv2.warpAffine(
            a,
            plan.matrix,
            (x1 - x0, y1 - y0),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
    out = plan.background.copy()
    out[y0:y1, x0:x1] = cv2.blendLinear(warped, out[y0:y1, x0:x1], plan.mask, plan.inv_mask)
    return out
