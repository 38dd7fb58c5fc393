"""A textured head mesh fitted to one portrait: mediapipe's face mesh, an outer ring and a background plane.

Why this shape: a talking-head model learns motion from how pixels move between frames, so the synthetic
frames must move like a real head does — the face as a rigid 3D surface (parallax between nose and cheeks),
hair and neck following it, the background staying put — and nothing may tear or leave holes. The mesh is
therefore one continuous sheet over the whole image:

* the face: mediapipe's 478 landmarks (x, y in pixels of the crop, z relative depth) with the triangles of
  its tesselation. The triangle list is derived from ``FACEMESH_TESSELATION`` (an edge list): every 3-clique
  of the edge graph is a triangle, except the two separating 3-cycles whose three edges are each shared by
  three cliques (they are not faces of the surface). That yields the 852 triangles of mediapipe's canonical
  mesh, whose three holes (the two eyes and the mouth) are filled here with fans around an extra centre
  vertex, so eyes and mouth can be opened and closed;
* an outer ring: copies of the face oval scaled outward from its centre (hair, ears, neck) whose depth
  falls back towards the background and whose *rigidity* (how much of the head motion a vertex follows)
  falls from 1 at the face to 0 at the background, like a rubber sheet;
* a background plane: the last ring lies far outside the image, static (rigidity 0), so every pixel is
  always covered.

Units: 3D points live in the reference camera frame (x right, y down, z forward) measured in "pixels at
depth ``focal``": the reference camera has focal length ``focal`` px and mediapipe's z origin is placed at
z = focal, so one unit there spans one pixel. The head frame (the ground-truth pose's origin) is centred
between the two face-oval points beside the ears, where the neck turns the head. Every vertex's texture
coordinate is its projection in the reference pose, so rendering the rest pose reproduces the portrait crop
exactly. :data:`HeadMesh.mm_per_unit` converts to millimetres assuming a 63 mm distance between the pupils
(only used to write ground truth in a
familiar unit; projections do not depend on it).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..errors import UserError

__all__ = [
    "NUM_LANDMARKS",
    "Camera",
    "HeadMesh",
    "MeshFitError",
    "Topology",
    "fit_head_mesh",
    "topology",
]

NUM_LANDMARKS = 478
NUM_FACE_POINTS = 468  # the tesselated points; 468..477 are the iris centres and rims
IRIS_CENTRES = (468, 473)
# Anatomical corners that split each closed contour into its upper and lower path (mediapipe indices).
_EYE_CORNERS = ((33, 133), (263, 362))  # (outer, inner) corner of the right and the left eye
_EYE_UPPER_MARKS = (159, 386)  # middle of the upper lid of each eye
_INNER_LIP_CORNERS = (78, 308)
_OUTER_LIP_CORNERS = (61, 291)
_UPPER_LIP_MARK, _LOWER_LIP_MARK = 13, 14  # middle of the upper / lower inner lip
_OUTER_UPPER_MARK, _OUTER_LOWER_MARK = 0, 17
_EAR_LEVEL = (234, 454)  # face-oval points beside the ears: the head's rotation centre lies between them
MEAN_IPD_MM = 63.0

# Outer ring: (scale of the face oval about its centre, depth behind the oval point it extends, in units of
# the face radius, rigidity). The first ring is hair/ears/jaw line and moves with the head; further out the
# sheet blends into the static background plane. The last entry is the far ring pushed out past the image.
RING_LAYOUT: tuple[tuple[float, float, float], ...] = (
    (1.12, 0.10, 1.0),
    (1.32, 0.30, 0.85),
    (1.60, 0.70, 0.45),
    (2.00, 1.40, 0.12),
)
BACKGROUND_DEPTH = 0.5  # background plane, face radii behind the deepest ring vertex
EYE_FILL_DEPTH = 0.05  # eye centre vertex behind the mean of the lid contour, in eye widths
MOUTH_FILL_DEPTH = 0.30  # mouth-cavity centre behind the inner-lip contour, in mouth widths


class MeshFitError(UserError, ValueError):
    """No face mesh could be fitted to a portrait (no face found, or a degenerate one)."""


# ------------------------------------------------------------------------------------------ topology


def _cycle(edges: set[tuple[int, int]] | frozenset, start: int) -> list[int]:
    """Walk a closed loop given as an undirected edge set, starting at ``start``."""
    adj: dict[int, list[int]] = collections.defaultdict(list)
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    loop, prev, cur = [start], -1, start
    while True:
        nxt = [n for n in adj[cur] if n != prev]
        if not nxt:
            raise RuntimeError(f"open contour at {cur}")
        prev, cur = cur, nxt[0]
        if cur == start:
            return loop
        loop.append(cur)
        if len(loop) > len(adj):
            raise RuntimeError("contour is not a simple loop")


def _split(loop: list[int], a: int, b: int) -> tuple[list[int], list[int]]:
    """The two paths from corner ``a`` to corner ``b`` of a closed loop (both include the corners)."""
    i = loop.index(a)
    rolled = loop[i:] + loop[:i]
    j = rolled.index(b)
    first = rolled[: j + 1]
    second = [a, *reversed(rolled[j:])]
    return first, second


@dataclass(frozen=True)
class Topology:
    """Mediapipe index sets used to build and animate the mesh (the same for every face)."""

    face_triangles: np.ndarray  # (852, 3) int32 tesselation triangles
    oval: tuple[int, ...]  # closed face-oval loop (36 points), in order
    eyes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # per eye: (upper lid path, lower lid path)
    inner_lips: tuple[tuple[int, ...], tuple[int, ...]]  # (upper, lower), corner to corner
    outer_lips: tuple[tuple[int, ...], tuple[int, ...]]


@lru_cache(maxsize=1)
def topology() -> Topology:
    """Triangles and contours from mediapipe's connection tables (see the module docstring)."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    edges = {tuple(sorted(e)) for e in fmc.FACEMESH_TESSELATION}
    adj: dict[int, set[int]] = collections.defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]}
    uses = collections.Counter(e for t in cliques for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))
    tris = sorted(
        t for t in cliques if not all(uses[e] == 3 for e in ((t[0], t[1]), (t[1], t[2]), (t[0], t[2])))
    )
    oval = _cycle(fmc.FACEMESH_FACE_OVAL, 10)
    eyes = []
    eye_conns = (fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_LEFT_EYE)
    for (outer, inner), mark, conn in zip(_EYE_CORNERS, _EYE_UPPER_MARKS, eye_conns, strict=True):
        p, q = _split(_cycle(conn, outer), outer, inner)
        eyes.append((tuple(p), tuple(q)) if mark in p else (tuple(q), tuple(p)))
    lips = set(fmc.FACEMESH_LIPS)
    lip_adj: dict[int, set[int]] = collections.defaultdict(set)
    for a, b in lips:
        lip_adj[a].add(b)
        lip_adj[b].add(a)

    def component(seed: int) -> set[tuple[int, int]]:
        seen, todo = {seed}, [seed]
        while todo:
            for n in lip_adj[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return {e for e in lips if e[0] in seen}

    def lip_paths(corners: tuple[int, int], upper_mark: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        p, q = _split(_cycle(component(corners[0]), corners[0]), *corners)
        return (tuple(p), tuple(q)) if upper_mark in p else (tuple(q), tuple(p))

    return Topology(
        face_triangles=np.asarray(tris, dtype=np.int32),
        oval=tuple(oval),
        eyes=tuple(eyes),
        inner_lips=lip_paths(_INNER_LIP_CORNERS, _UPPER_LIP_MARK),
        outer_lips=lip_paths(_OUTER_LIP_CORNERS, _OUTER_UPPER_MARK),
    )


# --------------------------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class Camera:
    """Pinhole camera of the square ``size``×``size`` output; pixel (row i, col j) covers [j, j+1)×[i, i+1).

    The default focal length (2 × size, a 28° field of view) is a portrait lens: enough perspective for
    real parallax between nose and ears, not the distortion of a webcam held close.
    """

    size: int
    focal: float

    @property
    def principal(self) -> float:
        return self.size / 2.0

    @property
    def K(self) -> np.ndarray:
        c = self.principal
        return np.array([[self.focal, 0.0, c], [0.0, self.focal, c], [0.0, 0.0, 1.0]])

    def project(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) camera-frame points -> (..., 2) pixel coordinates."""
        z = points[..., 2:3]
        return points[..., :2] * (self.focal / z) + self.principal

    def backproject(self, xy: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(..., 2) pixels and (...) depths -> (..., 3) camera-frame points."""
        z = np.asarray(z, dtype=np.float64)
        xy = (np.asarray(xy, dtype=np.float64) - self.principal) * (z / self.focal)[..., None]
        return np.concatenate([xy, z[..., None]], axis=-1)


# ----------------------------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class HeadMesh:
    """A head mesh in its reference pose (vertex layout: 478 landmarks, 3 fill centres, then the rings).

    ``rest`` are camera-frame positions in the reference pose; the head frame is ``rest - pivot`` (the
    pivot, roughly the centre of the head between the ears, is the origin of the ground-truth pose).
    ``uv`` are texture pixel coordinates (= the reference projection of ``rest``).
    """

    name: str
    texture: np.ndarray  # (S, S, 3) uint8: the portrait crop
    camera: Camera
    rest: np.ndarray  # (V, 3) float64
    uv: np.ndarray  # (V, 2) float64
    triangles: np.ndarray  # (T, 3) int32, wound so that reference normals face the camera
    rigidity: np.ndarray  # (V,) float64 in [0, 1]
    pivot: np.ndarray  # (3,) float64
    face_radius: float  # mean distance of the face oval from its centre, in units
    mm_per_unit: float
    tri_kind: np.ndarray  # (T,) uint8: see TRI_* constants
    eye_fill_centres: tuple[int, int]
    mouth_fill_centre: int
    landmarks_px: np.ndarray = field(repr=False)  # (478, 3) the fitted mediapipe landmarks (crop pixels)
    topo: Topology = field(repr=False, default_factory=topology)

    @property
    def num_vertices(self) -> int:
        return int(self.rest.shape[0])


TRI_FACE, TRI_EYE, TRI_MOUTH, TRI_RING = 0, 1, 2, 3


def _oval_depth_and_rings(
    cam: Camera, oval_uv: np.ndarray, oval_z: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ring vertices: (uv (R·n, 2), camera z (R·n,), rigidity (R·n,)), ring by ring, then the far ring."""
    centre = oval_uv.mean(axis=0)
    rel = oval_uv - centre
    uvs, zs, ws = [], [], []
    for scale, depth, rigidity in RING_LAYOUT:
        uvs.append(centre + rel * scale)
        zs.append(oval_z + depth * radius_px)
        ws.append(np.full(len(rel), rigidity))
    # Far ring: each oval direction carried out to the square [-S, 2S]^2, well past the image.
    lo, hi = -float(cam.size), 2.0 * cam.size
    dirs = rel / np.linalg.norm(rel, axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        tx = np.where(dirs[:, 0] > 0, (hi - centre[0]) / dirs[:, 0], (lo - centre[0]) / dirs[:, 0])
        ty = np.where(dirs[:, 1] > 0, (hi - centre[1]) / dirs[:, 1], (lo - centre[1]) / dirs[:, 1])
    t = np.minimum(np.abs(tx), np.abs(ty))
    uvs.append(centre + dirs * t[:, None])
    zs.append(np.full(len(rel), zs[-1].max() + BACKGROUND_DEPTH * radius_px))
    ws.append(np.zeros(len(rel)))
    return np.concatenate(uvs), np.concatenate(zs), np.concatenate(ws)


def fit_head_mesh(
    texture: np.ndarray,
    landmarks: np.ndarray | None = None,
    name: str = "face",
    focal_factor: float = 2.0,
) -> HeadMesh:
    """Build the head mesh for a square portrait crop (S×S×3 uint8, face roughly VoxCeleb-framed).

    ``landmarks`` (478×3, as :func:`dagan.face.face_landmarks` returns them) are computed from ``texture``
    when not given. Raises :class:`MeshFitError` when no face is found.
    """
    from ..face import face_landmarks

    if texture.ndim != 3 or texture.shape[2] != 3 or texture.shape[0] != texture.shape[1]:
        raise ValueError(f"texture must be a square S×S×3 image, got {texture.shape}")
    size = int(texture.shape[0])
    if landmarks is None:
        landmarks = face_landmarks(texture)
        if landmarks is None:
            raise MeshFitError(f"{name}: mediapipe found no face mesh in the crop")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks must be (478, 3), got {landmarks.shape}")
    topo = topology()
    cam = Camera(size=size, focal=focal_factor * size)

    # Landmarks -> camera frame. mediapipe's z is in units of the image width (0 near the middle of the
    # head); that origin is placed at z = focal, where one unit is one pixel.
    lm_uv = landmarks[:, :2]
    lm_z = cam.focal + landmarks[:, 2] * size
    oval = np.asarray(topo.oval)
    oval_uv = lm_uv[oval]
    radius_px = float(np.linalg.norm(oval_uv - oval_uv.mean(axis=0), axis=1).mean())
    if not radius_px > 8:
        raise MeshFitError(f"{name}: the fitted face is degenerate (radius {radius_px:.1f} px)")
    lm_rest = cam.backproject(lm_uv, lm_z)

    # Fill centres (eyes, mouth cavity), behind the mean of their contour.
    eye_loops = [list(up) + list(reversed(low))[1:-1] for up, low in topo.eyes]
    mouth_loop = list(topo.inner_lips[0]) + list(reversed(topo.inner_lips[1]))[1:-1]
    eye_w = [np.linalg.norm(lm_rest[a] - lm_rest[b]) for a, b in _EYE_CORNERS]
    mouth_w = float(np.linalg.norm(lm_rest[_INNER_LIP_CORNERS[0]] - lm_rest[_INNER_LIP_CORNERS[1]]))
    fill_rest = [
        lm_rest[loop].mean(axis=0) + np.array([0.0, 0.0, EYE_FILL_DEPTH * w])
        for loop, w in zip(eye_loops, eye_w, strict=True)
    ]
    fill_rest.append(lm_rest[mouth_loop].mean(axis=0) + np.array([0.0, 0.0, MOUTH_FILL_DEPTH * mouth_w]))
    fill_rest_a = np.asarray(fill_rest)

    ring_uv, ring_z, ring_w = _oval_depth_and_rings(cam, oval_uv, lm_z[oval], radius_px)
    ring_rest = cam.backproject(ring_uv, ring_z)

    rest = np.concatenate([lm_rest, fill_rest_a, ring_rest])
    n_lm = NUM_LANDMARKS
    eye_c = (n_lm, n_lm + 1)
    mouth_c = n_lm + 2
    rigidity = np.concatenate([np.ones(n_lm + 3), ring_w])

    # Triangles: face, eye fans, mouth fan, then the ring strips (oval -> ring 1 -> ... -> far ring).
    tris = [topo.face_triangles]
    kinds = [np.full(len(topo.face_triangles), TRI_FACE, np.uint8)]
    for loop, c in zip(eye_loops, eye_c, strict=True):
        fan = np.array([(loop[i], loop[(i + 1) % len(loop)], c) for i in range(len(loop))], np.int32)
        tris.append(fan)
        kinds.append(np.full(len(fan), TRI_EYE, np.uint8))
    fan = np.array(
        [(mouth_loop[i], mouth_loop[(i + 1) % len(mouth_loop)], mouth_c) for i in range(len(mouth_loop))]
    )
    tris.append(fan.astype(np.int32))
    kinds.append(np.full(len(fan), TRI_MOUTH, np.uint8))
    n = len(oval)
    rings = [oval, *(n_lm + 3 + k * n + np.arange(n) for k in range(len(RING_LAYOUT) + 1))]
    for a, b in itertools.pairwise(rings):
        for i in range(n):
            j = (i + 1) % n
            tris.append(np.array([(a[i], a[j], b[j]), (a[i], b[j], b[i])], np.int32))
            kinds.append(np.full(2, TRI_RING, np.uint8))
    triangles = np.concatenate(tris).astype(np.int32)
    tri_kind = np.concatenate(kinds)

    # Wind every triangle so that its normal faces the camera (negative z) in the reference pose.
    p = rest[triangles]
    normal_z = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])[:, 2]
    flip = normal_z > 0
    triangles[flip] = triangles[flip][:, [0, 2, 1]]

    # The head turns about the neck, below the ears: take the middle of the two oval points beside the
    # ears (depth included; mediapipe's z origin lies well in front of them).
    pivot = lm_rest[list(_EAR_LEVEL)].mean(axis=0)
    uv = cam.project(rest)
    ipd = float(np.linalg.norm(rest[IRIS_CENTRES[0]] - rest[IRIS_CENTRES[1]]))
    return HeadMesh(
        name=name,
        texture=np.ascontiguousarray(texture),
        camera=cam,
        rest=rest,
        uv=uv,
        triangles=triangles,
        rigidity=rigidity,
        pivot=pivot,
        face_radius=radius_px,
        mm_per_unit=MEAN_IPD_MM / max(ipd, 1e-6),
        tri_kind=tri_kind,
        eye_fill_centres=eye_c,
        mouth_fill_centre=mouth_c,
        landmarks_px=landmarks.astype(np.float32),
        topo=topo,
    )
