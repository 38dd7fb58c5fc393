"""Blinks: close (or widen) the avatar's lids as far as the driver's, by a warp of the avatar's frame.

Why not the generator: it warps the photo's features by a motion field that moves a lid at a tenth of
the driver's blink, whatever the lid keypoints do (weights/README.md, "Eyelid detail"). A blink is
simple geometry instead: the upper lid slides down over the eye. So:

1. **The photo's eyes** (:func:`eye_shapes`, once per photo): from its face mesh, each eye's corners and
   the upper and lower lid's profile across the eye, in the avatar's pixels.
2. **How far to close or open** (:class:`LidState`, per frame): the lid reader's opening of the
   driver's eyes (:mod:`dagan.nets.lid_reader`) against the driver's own open eyes, both eyes together,
   through ``blink.dead_zone`` and ``blink.gain``: 1 shut, 0 open as the photo, below 0 open wider than
   the photo (down to ``-blink.widen``). "Open eyes" for a blink is the highest reading so far, sinking
   slowly towards lower ones, but never above the eyes at the reference (the widest reading of the
   stream's first ``blink.reference_seconds``): after a wide-eyed moment, eyes as open as at the
   reference are open, not half shut. A reading above the reference widens the avatar's eyes.
3. **The warp** (:func:`close_lids`): inside each eye, along the eye, the skin above the upper lid is
   stretched down to cover the eye (:data:`UPPER_SHARE`: all the way, the lower lid stays); the eye sits
   where the lid keypoints moved it. To widen, the lids move apart (the upper three quarters of the way,
   :data:`WIDEN_UPPER_SHARE`) and the eye between them is stretched to fill the gap. Nothing outside the
   eyes' bands moves, and a frame whose closure is 0 is returned untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from dagan.config import BlinkConfig
from dagan.helpers import corner_axes, pixel_box, sample_at

# Face-mesh corners (outer, inner) and upper / lower lid contours of the subject's right eye (the
# image-left one), then of the left.
EYES = (
    ((33, 133), (246, 161, 160, 159, 158, 157, 173), (7, 163, 144, 145, 153, 154, 155)),
    ((263, 362), (466, 388, 387, 386, 385, 384, 398), (249, 390, 373, 374, 380, 381, 382)),
)
PROFILE = 33  # samples of each lid's profile across the eye
# Of the closing the upper lid does; the lower lid does the rest. A blink is the upper lid's: with the
# lower lid rising a quarter of the way (0.75, until 2026-12-07) the shut eye's two lash lines met in a
# band the face mesh read as an eye still half open (six held-out photos: their mesh eye opening fell by
# a median 50 % shut and 19 % half shut; all the upper lid's: 60 % and 28 %), and the avatar's blinks
# came through at eyes gain 0.54 on 24 held-out pairs, 0.61 with 1.0 (0.63 → 0.69 on 48;
# weights/README.md, "The upper lid").
UPPER_SHARE = 1.0
# Of the widening the upper lid does (the lower lid drops the rest), so the eye's own edge stays inside the
# stretched gap at both lids.
WIDEN_UPPER_SHARE = 0.75
ABOVE, BELOW = 0.5, 0.3  # the stretched skin bands above the upper and below the lower lid, × eye width
GROW = 0.06  # the lids' profiles widened by this × eye width, so a shut eye covers the lash lines too
# A closure this small moves a lid by under a tenth of a pixel (a 128-px avatar's lid gap is ~4 px): it
# is not drawn, so the frame skips the warp.
UNSEEN = 0.02


@dataclass(frozen=True)
class EyeShapes:
    """The photo's two eyes (image-left, image-right) in its avatar's pixels.

    corner: 2×2 the eye's left corner; axis / normal: 2×2 unit vectors along the eye and across it
    (downwards); width: (2,) corner to corner; upper / lower: 2×PROFILE, each lid's distance below the
    axis at PROFILE evenly spaced points from corner to corner (0 at both corners)."""

    corner: torch.Tensor
    axis: torch.Tensor
    normal: torch.Tensor
    width: torch.Tensor
    upper: torch.Tensor
    lower: torch.Tensor

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as float64 NumPy arrays (the warp's geometry runs on the host), made once."""
        return {f: getattr(self, f).detach().cpu().double().numpy() for f in self.__dataclass_fields__}


def eye_shapes(landmarks: np.ndarray) -> EyeShapes:
    """:class:`EyeShapes` from 478 face-mesh landmarks (x, y in the avatar's pixels)."""
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    fields: dict[str, list[np.ndarray]] = {
        k: [] for k in ("corner", "axis", "normal", "width", "upper", "lower")
    }
    samples = np.linspace(0.0, 1.0, PROFILE)
    for (c0, c1), up, lo in EYES:
        a, width, axis, normal = corner_axes(p[c0], p[c1])

        def profile(ids: tuple[int, ...], a=a, axis=axis, normal=normal, width=width) -> np.ndarray:
            q = p[list(ids)] - a
            u, v = q @ axis / width, q @ normal
            order = np.argsort(u)
            return np.interp(samples, np.r_[0.0, u[order], 1.0], np.r_[0.0, v[order], 0.0])

        upper, lower = profile(up), profile(lo)
        gap = np.maximum(lower - upper, 0.0)
        grow = GROW * width * np.clip(2.0 * gap / max(gap.max(), 1e-6), 0.0, 1.0)
        fields["corner"].append(a)
        fields["axis"].append(axis)
        fields["normal"].append(normal)
        fields["width"].append(np.array(width))
        fields["upper"].append(upper - grow)
        fields["lower"].append(lower + grow)
    return EyeShapes(**{k: torch.tensor(np.stack(v), dtype=torch.float32) for k, v in fields.items()})


@dataclass
class LidState:
    """One stream's blink state: the photo's eyes and what the driver's open eyes read so far.

    ``reference``: the driver's eyes at the reference (the widest reading of the first
    ``reference_seconds``, from ``start``); ``open_reading``: the driver's open eyes for a blink."""

    shapes: EyeShapes
    open_reading: np.ndarray | None = None  # (2,)
    reference: np.ndarray | None = None  # (2,)
    start: float | None = None
    last_time: float | None = None

    def reset(self) -> None:
        """Learn the driver's eyes anew from the next reading (the stream's reference was reset)."""
        self.open_reading = self.reference = self.start = self.last_time = None

    def closure(self, reading: np.ndarray, now: float, cfg: BlinkConfig) -> float:
        """How far to close the avatar's eyes for the lid reader's ``reading`` (2,) of this frame, taken
        at ``now`` seconds: 1 shut, 0 as the photo, down to ``-cfg.widen`` (wider than the photo)."""
        reading = np.asarray(reading, dtype=np.float64)
        if self.reference is None or self.open_reading is None or self.start is None:
            self.reference, self.open_reading, self.start = reading.copy(), reading.copy(), now
        else:
            if now - self.start <= cfg.reference_seconds:
                self.reference = np.maximum(self.reference, reading)
            dt = 0.0 if self.last_time is None else max(now - self.last_time, 0.0)
            sink = self.open_reading + (reading - self.open_reading) * min(1.0, dt / cfg.open_seconds)
            self.open_reading = np.minimum(
                np.where(reading > self.open_reading, reading, sink), self.reference
            )
        self.last_time = now
        drop = float((1.0 - reading / np.maximum(self.open_reading, 1e-3)).mean())  # 0: as open as ever
        rise = float((reading / np.maximum(self.reference, 1e-3) - 1.0).mean())  # 0: as at the reference
        if drop > cfg.dead_zone:
            closure = min((drop - cfg.dead_zone) * cfg.gain, 1.0)
        else:
            closure = -float(np.clip((rise - cfg.dead_zone) * cfg.gain, 0.0, cfg.widen))
        return closure if abs(closure) >= UNSEEN else 0.0


def _profile_at(profile: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Linear interpolation of a PROFILE-sample profile at positions u (clamped to [0, 1])."""
    return np.interp(u, _SAMPLES, profile)


_SAMPLES = np.linspace(0.0, 1.0, PROFILE)


def eye_box(shapes: EyeShapes, eye: int, shift: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The pixel rows and columns (y0, y1, x0, x1; end exclusive, inside the frame) that closing
    ``eye`` can move: its corners, lids and stretched bands, with a pixel to spare."""
    a = shapes.arrays
    width = float(a["width"][eye])
    corner = a["corner"][eye] + shift
    ends = np.stack([corner, corner + width * a["axis"][eye]])
    up = float(a["upper"][eye].min()) - ABOVE * width
    down = float(a["lower"][eye].max()) + BELOW * width
    normal = a["normal"][eye]
    points = np.concatenate([ends + up * normal, ends + down * normal])
    return pixel_box(points, size)


def eye_grid(
    shapes: EyeShapes,
    eye: int,
    closure: float,
    shift: np.ndarray,
    box: tuple[int, int, int, int],
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the pixels of ``box``: the sampling grid (1×h×w×2 float32, grid_sample's [-1, 1] over the
    whole size×size frame, align_corners=True) that closes ``eye`` by ``closure`` (1 shut, below 0
    wider than the photo: the lids apart by ``-closure`` of the eye's gap) with the eye moved by
    ``shift`` (2, pixels), and the h×w mask of the pixels it moves (the others are kept bit for bit).

    NumPy on the host, whatever the frame's device: a few hundred pixels, where each tensor operation
    would cost more to launch than to run."""
    y0, y1, x0, x1 = box
    a = shapes.arrays
    ys, xs = np.meshgrid(
        np.arange(y0, y1, dtype=np.float64), np.arange(x0, x1, dtype=np.float64), indexing="ij"
    )
    corner = a["corner"][eye] + shift
    axis, normal, width = a["axis"][eye], a["normal"][eye], float(a["width"][eye])
    dx, dy = xs - corner[0], ys - corner[1]
    u = (dx * axis[0] + dy * axis[1]) / width
    v = dx * normal[0] + dy * normal[1]
    upper, lower = _profile_at(a["upper"][eye], u), _profile_at(a["lower"][eye], u)
    gap = np.maximum(lower - upper, 0.0)
    share = UPPER_SHARE if closure > 0 else WIDEN_UPPER_SHARE
    new_upper = upper + closure * share * gap
    new_lower = lower - closure * (1 - share) * gap
    above, below = ABOVE * width, BELOW * width
    inside = (u > 0) & (u < 1)
    top, bottom = upper - above, lower + below
    # the band [top, new_upper] shows the skin of [top, upper]; [new_lower, bottom] that of
    # [lower, bottom]; between the new lids the eye stays where it is when closing (the lids slide over
    # it) and is stretched over the wider gap when widening
    v_src = np.where(
        inside & (v >= top) & (v < new_upper), top + (v - top) * above / (above + new_upper - upper), v
    )
    v_src = np.where(
        inside & (v > new_lower) & (v <= bottom),
        bottom - (bottom - v) * below / (below + lower - new_lower),
        v_src,
    )
    if closure < 0:
        stretch = gap / np.maximum(new_lower - new_upper, 1e-6)
        v_src = np.where(
            inside & (v >= new_upper) & (v <= new_lower), upper + (v - new_upper) * stretch, v_src
        )
    moved = v_src - v
    scale = 2.0 / max(size - 1, 1)
    grid = np.stack([(xs + moved * normal[0]) * scale - 1, (ys + moved * normal[1]) * scale - 1], axis=-1)
    return torch.from_numpy(grid[None].astype(np.float32)), torch.from_numpy(moved != 0)


def close_lids(
    images: torch.Tensor, shapes: list[EyeShapes | None], closure: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """B×3×S×S frames with each item's eyes closed by ``closure`` (B×2; 1 shut, below 0 widened) where
    the photo's eyes (``shapes``; None: no face mesh, left as is) moved by ``shift`` (B×2×2, pixels).
    Items whose closure is 0, and every pixel outside the moved bands, are returned as they are, bit for
    bit. Only the few hundred pixels around each eye are computed."""
    out = images
    size = images.shape[-1]
    closures = closure.detach().cpu().double().numpy()
    shifts = shift.detach().cpu().double().numpy()
    for i, shape in enumerate(shapes):
        if shape is None or not bool((closures[i] != 0).any()):
            continue
        for eye in range(2):
            c = float(closures[i, eye])
            if c == 0.0:
                continue
            box = eye_box(shape, eye, shifts[i, eye], size)
            y0, y1, x0, x1 = box
            if y1 <= y0 or x1 <= x0:
                continue
            grid, changed = eye_grid(shape, eye, c, shifts[i, eye], box, size)
            warped = sample_at(images[i : i + 1], grid)
            if out is images:
                out = images.clone()
            region = out[i, :, y0:y1, x0:x1]
            out[i, :, y0:y1, x0:x1] = torch.where(
                changed.to(images.device), warped[0].to(images.dtype), region
            )
    return out
