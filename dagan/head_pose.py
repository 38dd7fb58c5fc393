"""Head pose from the face mesh: the one solvePnP fit the evaluation's PRMSE and the engine's nod share.

The evaluation scores head angles with it (:func:`evaluation.metrics.head_pose`); the engine reads the
driver's nod with it (:mod:`dagan.nod`), so what the avatar is asked to do and how it is judged are one
measure of the same mesh.
"""

from __future__ import annotations

import cv2
import numpy as np

# Canonical 3D face: vertices of mediapipe's canonical_face_model.obj (Apache-2.0; the face-geometry module
# of google/mediapipe, file mediapipe/modules/face_geometry/data/canonical_face_model.obj, vertex i = mesh
# landmark i), in its units (≈ cm), x to the person's left (image right), y up, z out of the face towards
# the viewer. The model is left/right symmetric, so 263/362/291 are the mirror images of 33/133/61.
# Points are chosen to move little with expression except the mouth corners and chin, which the standard
# 6-point head-pose recipe includes and which make the fit better constrained vertically.
CANONICAL_FACE: dict[int, tuple[float, float, float]] = {
    1: (0.000000, -1.126865, 7.475604),  # nose tip
    168: (0.000000, 3.271027, 5.236015),  # nose bridge between the eyes
    33: (-4.445859, 2.663991, 3.173422),  # right eye, outer corner
    133: (-1.856432, 2.585245, 3.757904),  # right eye, inner corner
    362: (1.856432, 2.585245, 3.757904),  # left eye, inner corner
    263: (4.445859, 2.663991, 3.173422),  # left eye, outer corner
    61: (-2.456206, -4.342621, 4.283884),  # mouth, right corner
    291: (2.456206, -4.342621, 4.283884),  # mouth, left corner
    152: (0.000000, -9.403378, 4.264492),  # chin
}
_POSE_IDS = list(CANONICAL_FACE)
# The mesh points the fit reads, in its order: a caller that keeps only some tracks (training data packed
# for a GPU machine) keeps these to read a head pose with :func:`rotation_from_points`.
POSE_POINTS: tuple[int, ...] = tuple(_POSE_IDS)
# OpenCV's camera frame has y down and z into the scene: rotate the model by 180° about x to match.
_OBJECT_POINTS = np.array([CANONICAL_FACE[i] for i in _POSE_IDS], dtype=np.float64) * np.array(
    [1.0, -1.0, -1.0]
)


def head_rotation(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
    """3×3 rotation of the canonical face into OpenCV's camera frame (x right, y down, z into the scene)
    for a face's mesh landmarks (478×2+, pixels) in an image of (height, width); None when the fit fails.

    Pinhole camera with focal length = image width and the principal point at the centre (the field of
    view of a typical webcam/VoxCeleb crop; only differences between frames matter here, and they depend
    little on this choice)."""
    return rotation_from_points(np.asarray(landmarks, dtype=np.float64)[_POSE_IDS, :2], image_size)


def rotation_from_points(points: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
    """:func:`head_rotation` from the :data:`POSE_POINTS` alone (9×2 pixels, in that order); None when
    the fit fails or a point is missing (NaN)."""
    pts = np.asarray(points, dtype=np.float64)[:, :2]
    if pts.shape != (len(_POSE_IDS), 2) or not np.isfinite(pts).all():
        return None
    h, w = int(image_size[0]), int(image_size[1])
    camera = np.array([[w, 0.0, w / 2.0], [0.0, w, h / 2.0], [0.0, 0.0, 1.0]])
    ok, rvec, _ = cv2.solvePnP(_OBJECT_POINTS, pts, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return None
    return cv2.Rodrigues(rvec)[0]


def euler_angles(rotation: np.ndarray) -> np.ndarray:
    """(pitch, yaw, roll) in degrees of a 3×3 rotation (OpenCV's RQ decomposition)."""
    return np.asarray(cv2.RQDecomp3x3(np.asarray(rotation, np.float64))[0], dtype=np.float64)


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(pitch, yaw, roll) in degrees of a face from its mesh landmarks in an image of (height, width)
    (:func:`head_rotation`'s Euler angles; NaN where the fit fails). A frontal, upright face gives about
    (0, 0, 0); in-plane rotation of the image by θ changes roll by θ."""
    rot = head_rotation(landmarks, image_size)
    return np.full(3, np.nan) if rot is None else euler_angles(rot)


def pitch_since(reference: np.ndarray, rotation: np.ndarray) -> float:
    """Degrees the head pitched since ``reference`` (both 3×3 from :func:`head_rotation`), measured in the
    head's own frame at the reference: the pitch of R_ref⁻¹ R.

    Why the head's frame and not the difference of the camera-frame angles: a driver whose head is turned
    at the reference (20°) and who then tilts it (22° about its own axis, no nod) changes the camera's
    pitch angle by 7.8°, and an upright photo would be told to nod by that much; on 24 held-out pairs the
    camera-frame reading cost the avatar's head turns (yaw gain 0.76 → 0.66) for the same nod.
    """
    rel = np.asarray(reference, np.float64).T @ np.asarray(rotation, np.float64)
    return float(euler_angles(rel)[0])
