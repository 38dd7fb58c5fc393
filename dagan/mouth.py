"""An open mouth: the avatar's lips parted further than the generator draws them, by a warp and a shade of
the avatar's frame.

Why not the generator: it opens the avatar's mouth only part of the way, however far the lip keypoints
move (a lip-opening gain of 3 draws no more than 2.5: weights/README.md, "Mouth gain"), and on a photo
whose lips are closed it stretches lip and skin rather than drawing the dark of an open mouth. A mouth
that opens is simple geometry on top of what it drew: the lower lip and the chin drop, and the dark
between the lips grows. So, for a model with ``mouth.warp`` set (config ``mouth``):

1. **The photo's mouth** (:func:`mouth_shape`, once per photo): from its face mesh, the middle of the
   inner lips, the mouth's axis (corner to corner) and width, how far the lips are apart, the lower
   lip's thickness and the chin, in the avatar's pixels. A photo whose lips are already apart by more
   than ``mouth.open_photo`` of its mouth's width is left as the generator draws it: its open mouth is
   there to move, and stretching it further reads as a yawn.
2. **How far** (per frame, :func:`extra_opening`): ``mouth.warp`` × how far the lip keypoints that were
   rendered parted beyond the photo's (in pixels, along the photo's lips), at most :data:`MAX_OPENING`
   of the mouth's width. The rendered keypoints carry the session's lip-opening gain and relative
   motion's "only where it grew" (:func:`dagan.keypoint_ops.open_mouth`). Only an opening is warped:
   squeezing the drawn gap when the lips came closer than the photo's was measured and made the mouth's
   motion follow the driver's less (weights/README.md, "An open mouth").
3. **Where the lips part** (:func:`find_gap`): where the generator drew them: the darkest run of the
   luminance across the middle of the mouth, searched near the photo's lips moved as the upper lip's
   keypoint moved.
4. **The warp** (:func:`mouth_grid`, :func:`open_mouths`): that run stretched down by the extra opening,
   the lower lip moved down with it and the skin below taking the drop back by the chin, lens-shaped
   across the mouth (most at its middle, nothing at the corners); the stretched gap is shaded towards a
   dark mouth (the gap's own colour × :data:`DARKEN`), each pixel by ``mouth.shade`` × the share of its
   column's gap that is new, most at the gap's middle and none at the lips, so the dark is lens-shaped
   like the opening (a round spot read as a black dot). Nothing outside the mouth's box moves, and a
   frame with no extra opening is returned untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dagan.config import MouthConfig
from dagan.helpers import corner_axes, pixel_box, sample_at

# Face-mesh points: mouth corners (right, left of the subject), inner upper and lower lip at the middle,
# the lower lip's outer edge below it, the chin.
CORNERS = (61, 291)
INNER_UPPER, INNER_LOWER, OUTER_LOWER, CHIN = 13, 14, 17, 152
# The extra opening is capped at this × the mouth's width (a yawn is ~0.6 of it, the lips at rest 0).
MAX_OPENING = 0.3
# An extra opening under this many pixels is not drawn (a tenth of a 128-px avatar's pixel would round to
# the same bytes), so the frame skips the warp.
UNSEEN = 0.05
# The gap search: the luminance sampled across the mouth at these offsets (pixels) from where the lips
# should part, over the middle SEARCH_COLUMNS × width of the mouth; the darkest point within
# SEARCH_REACH of it is the gap, and the run around it darker than RUN_LEVEL of the way from it to the
# profile's median is the opening as drawn.
SEARCH_OFFSETS = np.arange(-6.0, 6.0 + 1e-6, 0.5)
SEARCH_REACH = 3.0
SEARCH_COLUMNS = 0.3
RUN_LEVEL = 0.5
# The warp's reach (× the mouth's width): across, from the middle, the lips' lens and the broader jaw;
# along the normal, the skin above the gap that holds still and the skin below the chin that takes the
# jaw's drop back.
LENS, JAW = 0.55, 0.9
ABOVE, BELOW = 0.5, 0.3
# The shade: the colour of a mouth's inside, as a share of the drawn gap's colour.
DARKEN = 0.35


@dataclass(frozen=True)
class MouthShape:
    """The photo's mouth in its avatar's pixels.

    centre: (2,) the middle of the inner lips; axis / normal: (2,) unit vectors along the mouth (corner
    to corner) and across it (downwards); width: corner to corner; gap: how far the inner lips are apart;
    lip: the lower lip's thickness; chin: the chin's distance below ``centre``."""

    centre: np.ndarray
    axis: np.ndarray
    normal: np.ndarray
    width: float
    gap: float
    lip: float
    chin: float

    def is_open(self, cfg: MouthConfig) -> bool:
        """Whether the photo's lips are already apart (``cfg.open_photo``): then it is not warped."""
        return self.gap > cfg.open_photo * self.width


def mouth_shape(landmarks: np.ndarray) -> MouthShape:
    """:class:`MouthShape` from 478 face-mesh landmarks (x, y in the avatar's pixels)."""
    p = np.asarray(landmarks, dtype=np.float64)[:, :2]
    _, width, axis, normal = corner_axes(p[CORNERS[0]], p[CORNERS[1]])
    centre = (p[INNER_UPPER] + p[INNER_LOWER]) / 2
    return MouthShape(
        centre=centre,
        axis=axis,
        normal=normal,
        width=width,
        gap=max(float((p[INNER_LOWER] - p[INNER_UPPER]) @ normal), 0.0),
        lip=max(float((p[OUTER_LOWER] - p[INNER_LOWER]) @ normal), 0.5),
        chin=max(float((p[CHIN] - centre) @ normal), 1.0),
    )


def extra_opening(
    shape: MouthShape,
    rendered: np.ndarray,
    source: np.ndarray,
    lips: tuple[int, int],
    size: int,
    cfg: MouthConfig,
) -> float:
    """Step 2: how many pixels further to open the avatar's mouth, from the keypoints that were
    rendered and the photo's own (K×2 each, keypoint units: ±1 is the frame's edge); 0 when under
    :data:`UNSEEN` (a closing mouth too)."""
    upper, lower = lips
    opened = ((rendered[lower] - rendered[upper]) - (source[lower] - source[upper])) @ shape.normal
    extra = min(cfg.warp * float(opened) * size / 2, MAX_OPENING * shape.width)
    return extra if extra >= UNSEEN else 0.0


def find_gap(profile: np.ndarray) -> tuple[float, float]:
    """Step 3: the drawn gap's (top, bottom) offsets (pixels along the normal, around the expected
    lips) from the luminance ``profile`` sampled at :data:`SEARCH_OFFSETS`."""
    near = np.abs(SEARCH_OFFSETS) <= SEARCH_REACH
    k = int(np.argmin(np.where(near, profile, np.inf)))
    level = profile[k] + RUN_LEVEL * (float(np.median(profile)) - profile[k])
    a = b = k
    while a > 0 and profile[a - 1] < level:
        a -= 1
    while b < len(profile) - 1 and profile[b + 1] < level:
        b += 1
    step = float(SEARCH_OFFSETS[1] - SEARCH_OFFSETS[0])
    return float(SEARCH_OFFSETS[a]) - step / 2, float(SEARCH_OFFSETS[b]) + step / 2


def _profile(image: torch.Tensor, shape: MouthShape, centre: np.ndarray) -> np.ndarray:
    """The luminance of a 3×S×S frame across the mouth at :data:`SEARCH_OFFSETS` from ``centre``,
    averaged over the middle of the mouth."""
    size = image.shape[-1]
    columns = np.linspace(-SEARCH_COLUMNS / 2, SEARCH_COLUMNS / 2, 5) * shape.width
    points = (
        centre[None, None]
        + SEARCH_OFFSETS[:, None, None] * shape.normal
        + columns[None, :, None] * shape.axis
    )  # O×C×2
    grid = torch.from_numpy((points * 2 / (size - 1) - 1)[None].astype(np.float32)).to(image.device)
    lum = image.float().mean(dim=0)[None, None]
    sampled = sample_at(lum, grid)
    return sampled[0, 0].mean(dim=1).cpu().double().numpy()


def mouth_box(
    shape: MouthShape, centre: np.ndarray, top: float, extra: float, size: int
) -> tuple[int, int, int, int]:
    """The pixel rows and columns (y0, y1, x0, x1; end exclusive, inside the frame) the warp can change
    around a gap whose middle is ``centre`` and top ``top`` below it."""
    reach_up = -top + ABOVE * shape.width
    reach_down = max(shape.chin, -top) + BELOW * shape.width + extra
    ends = np.stack([centre - JAW * shape.width * shape.axis, centre + JAW * shape.width * shape.axis])
    points = np.concatenate([ends - reach_up * shape.normal, ends + reach_down * shape.normal])
    return pixel_box(points, size)


def mouth_grid(
    shape: MouthShape,
    centre: np.ndarray,
    gap: tuple[float, float],
    extra: float,
    shade: float,
    box: tuple[int, int, int, int],
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 for the pixels of ``box``: the sampling grid (1×h×w×2 float32, grid_sample's [-1, 1] over
    the whole size×size frame, align_corners=True) that opens the gap (``gap``: its top and bottom
    offsets from ``centre`` along the normal) by ``extra`` pixels, and the h×w weight (0–1) of the dark
    shade over the stretched gap. NumPy on the host: a few hundred pixels."""
    y0, y1, x0, x1 = box
    ys, xs = np.meshgrid(
        np.arange(y0, y1, dtype=np.float64), np.arange(x0, x1, dtype=np.float64), indexing="ij"
    )
    dx, dy = xs - centre[0], ys - centre[1]
    u = dx * shape.axis[0] + dy * shape.axis[1]
    v = dx * shape.normal[0] + dy * shape.normal[1]
    top, bottom = gap
    lip_bottom = bottom + shape.lip + 0.5
    chin = max(shape.chin, lip_bottom + 2.0)
    start, end = top - ABOVE * shape.width, chin + BELOW * shape.width
    # where each part of the mouth goes along the normal: nothing above the gap moves, its bottom, the
    # lower lip and the jaw drop by ``extra``, and the skin below the lower lip takes the drop back by
    # ``end``, past the chin
    source = np.array([start, top, bottom, lip_bottom, end])
    target = np.array([start, top, bottom + extra, lip_bottom + extra, end])
    moved = np.interp(v, target, source) - v
    # across the mouth: the lips' lens, and the broader jaw's below the lower lip
    lips_lens = _fade(np.abs(u) / (LENS * shape.width))
    lens = np.where(v > lip_bottom, _fade(np.abs(u) / (JAW * shape.width)), lips_lens)
    moved = np.where((v > start) & (v < end), moved * lens, 0.0)
    scale = 2.0 / max(size - 1, 1)
    grid = np.stack(
        [(xs + moved * shape.normal[0]) * scale - 1, (ys + moved * shape.normal[1]) * scale - 1], axis=-1
    )
    # the shade follows the warp: a pixel whose source lies in the drawn gap is shaded by the share of
    # its column's gap that is new (most in the middle of the mouth, none at the corners), most at the
    # gap's middle and none at its edges (the lips)
    height = bottom - top
    opened = extra * lips_lens
    inside = np.clip((v + moved - top) / max(height, 1e-6), 0.0, 1.0)
    along = np.clip(1.0 - np.abs(2.0 * inside - 1.0), 0.0, 1.0) ** 0.5
    weight = np.clip(shade * opened / (opened + height) * along, 0.0, 1.0)
    return torch.from_numpy(grid[None].astype(np.float32)), torch.from_numpy(weight.astype(np.float32))


def _fade(x: np.ndarray) -> np.ndarray:
    """The share of the warp at a pixel ``x`` of the warp's reach across the mouth: 1 in the middle,
    falling smoothly (a raised cosine) to 0 at the reach and beyond."""
    return 0.5 + 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))


def open_mouths(
    images: torch.Tensor,
    shapes: list[MouthShape | None],
    extra: np.ndarray,
    shift: np.ndarray,
    cfg: MouthConfig,
) -> torch.Tensor:
    """B×3×S×S frames with each item's mouth opened ``extra[i]`` pixels further (0: as drawn) where
    the photo's mouth (``shapes``; None: no face mesh, or an open-mouthed photo) moved by ``shift[i]``
    (2, pixels: the upper lip keypoint's move). Items with no extra opening, and every pixel outside the
    mouth's box, are returned as they are, bit for bit."""
    out = images
    size = images.shape[-1]
    for i, shape in enumerate(shapes):
        if shape is None or extra[i] <= 0.0:
            continue
        expected = shape.centre + shift[i]
        top, bottom = find_gap(_profile(images[i], shape, expected))
        centre = expected + (top + bottom) / 2 * shape.normal
        half = (bottom - top) / 2
        opening = float(extra[i])
        box = mouth_box(shape, centre, -half, opening, size)
        y0, y1, x0, x1 = box
        if y1 <= y0 or x1 <= x0:
            continue
        grid, weight = mouth_grid(shape, centre, (-half, half), opening, cfg.shade, box, size)
        warped = sample_at(images[i : i + 1], grid)[0]
        ci = np.clip(np.round(centre).astype(int), 2, size - 3)
        gap_colour = images[i, :, ci[1], ci[0] - 2 : ci[0] + 3].float().mean(dim=1).view(3, 1, 1)
        w = weight.to(images.device)[None]
        warped = warped * (1 - w) + gap_colour * DARKEN * w
        if out is images:
            out = images.clone()
        out[i, :, y0:y1, x0:x1] = warped.to(images.dtype)
    return out
