"""Motion-transfer measures on face-mesh tracks: what cross-identity evaluation asks of an avatar.

In cross-identity reenactment there is no ground-truth frame: the avatar is a different person, so pixel
and landmark distances to the driver mean nothing. What can be measured is whether the avatar *moves like*
the driver: each frame gives a few scale-free signals (head yaw, pitch, roll; mouth and eye opening), and
the avatar's change since the reference frame is compared with the driver's change since the same frame.

- :func:`frame_signals` — the five :data:`SIGNALS` of one face from its 478 mediapipe landmarks.
- :func:`gain_and_correlation` — Pearson correlation and least-squares gain of avatar vs driver;
  :func:`follow` — both for every signal of two tracks, since their first shared face.
- :func:`still_centres`, :func:`landmark_jitter`, :func:`jitter_comparison` — temporal jitter: how much the
  avatar's mesh shakes while the driver holds still, beside the driver's own (measurement) shake. These
  are independent of the evaluation command, so a smoothing filter can be measured before and after with
  the same numbers.

Everything here is plain numpy on landmark arrays (N×2 or N×3, pixels), so it is cheap and testable
without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import metrics as M

__all__ = [
    "ANGLE_SIGNALS",
    "MIN_DRIVER_STD",
    "SIGNALS",
    "STILL_SPEED",
    "Following",
    "Jitter",
    "changes_since",
    "eye_opening",
    "face_size",
    "follow",
    "frame_signals",
    "gain_and_correlation",
    "jitter_comparison",
    "landmark_jitter",
    "mouth_opening",
    "signal_track",
    "still_centres",
]

# Head angles in degrees (solvePnP on the mesh, evaluation.metrics.head_pose), then two scale-free ratios.
SIGNALS = ("yaw", "pitch", "roll", "mouth", "eyes")
ANGLE_SIGNALS = ("yaw", "pitch", "roll")

# Below this standard deviation of the driver's change, a signal has nothing to follow and its gain and
# correlation are undefined (None) for the pair, instead of a slope through measurement noise: 0.5° for
# the angles, 0.01 for the mouth and eye ratios (a talking mouth moves by 0.08–0.09, a blinking eye by
# 0.07–0.14 on real clips). A real clip with closed lips throughout (s18 of ../shared/data/real-faces)
# has a mouth std of 0.0004, which gave mouth "gains" from −18 to 0.2 over six photos.
MIN_DRIVER_STD = {"yaw": 0.5, "pitch": 0.5, "roll": 0.5, "mouth": 0.01, "eyes": 0.01}

# A driver counts as still while its mesh moves less than this many inter-ocular distances per second
# (mean over the 478 points). Measured on three real clips cropped to 128 px by the tracker (every second
# frame at 25–30 fps): the quietest 5% of steps move 0.02–0.08 iod/s (mediapipe's own noise on a still
# head), the median step of a talking, gently moving head 0.07–0.3 iod/s, so 0.12 keeps the quiet
# stretches and drops most of the moving ones.
STILL_SPEED = 0.12


def _dist(p: np.ndarray, i: int, j: int) -> float:
    return float(np.hypot(*(p[i, :2] - p[j, :2])))


def face_size(landmarks: np.ndarray) -> float:
    """Inter-ocular distance (outer eye corners 33–263) in pixels: the face-size unit that makes the mouth
    opening and the jitter independent of how large the face is in the frame (and of the image size)."""
    return max(_dist(np.asarray(landmarks), 33, 263), 1e-6)


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap (mesh 13–14) over the inter-ocular distance: 0 with the lips together."""
    p = np.asarray(landmarks)
    return _dist(p, 13, 14) / face_size(p)


def eye_opening(landmarks: np.ndarray) -> float:
    """Mean lid gap of both eyes (mesh 159–145 right, 386–374 left), each over its own eye width (33–133,
    362–263): ~0.3 open, ~0.05 closed. Each eye's own width cancels head yaw foreshortening better than
    the inter-ocular distance would."""
    p = np.asarray(landmarks)
    right = _dist(p, 159, 145) / max(_dist(p, 33, 133), 1e-6)
    left = _dist(p, 386, 374) / max(_dist(p, 362, 263), 1e-6)
    return 0.5 * (right + left)


def frame_signals(landmarks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """The five :data:`SIGNALS` of one face: (yaw, pitch, roll) in degrees, mouth and eye opening."""
    pitch, yaw, roll = M.head_pose(landmarks, image_size)
    return np.array([yaw, pitch, roll, mouth_opening(landmarks), eye_opening(landmarks)], dtype=np.float64)


def signal_track(tracks: Sequence[np.ndarray | None], image_size: tuple[int, int]) -> np.ndarray:
    """(T, 5) signals of a landmark track; a row of NaN where there is no face."""
    out = np.full((len(tracks), len(SIGNALS)), np.nan)
    for t, lm in enumerate(tracks):
        if lm is not None:
            out[t] = frame_signals(lm, image_size)
    return out


def changes_since(signals: np.ndarray, ref: int) -> np.ndarray:
    """Change of every signal since frame ``ref``: angles wrapped into [−180, 180), the ratios plainly."""
    out = signals - signals[ref]
    k = len(ANGLE_SIGNALS)
    out[:, :k] = M.angle_difference(signals[:, :k], signals[ref, :k])
    return out


def gain_and_correlation(
    driver: np.ndarray, avatar: np.ndarray, min_frames: int = 3, min_driver_std: float = 0.0
) -> tuple[float | None, float | None]:
    """(gain, correlation) of the avatar's signal against the driver's, on frames where both are finite.

    ``gain`` is the ordinary least-squares slope **with intercept**, cov(driver, avatar) / var(driver): how
    many units the avatar moves per unit the driver moves. With an intercept, a constant offset (e.g. the
    avatar's or driver's reference frame measured a little off) changes neither gain nor correlation.
    ``correlation`` is Pearson's r. Both are ``None`` when the driver does not move (standard deviation
    at most ``min_driver_std``, e.g. :data:`MIN_DRIVER_STD`) or with fewer than ``min_frames`` frames;
    correlation also when the avatar does not move at all (an avatar that never moves has gain 0 but no
    defined correlation).
    """
    x, y = np.asarray(driver, np.float64), np.asarray(avatar, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < min_frames:
        return None, None
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    sxx, syy, sxy = float(x @ x), float(y @ y), float(x @ y)
    if sxx <= 1e-18 or np.sqrt(sxx / len(x)) <= min_driver_std:
        return None, None
    if syy <= 1e-18 * max(1.0, sxx):  # the avatar does not move (up to rounding): gain exactly 0
        return 0.0, None
    return sxy / sxx, float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))


@dataclass(frozen=True)
class Following:
    """How one signal track follows a driver's (:func:`follow`).

    ``reference``: the first frame where both have a face (None: no such frame, and every score None);
    ``both``: (T,) the frames where both have one; ``driver`` / ``other``: (T, 5) each track's change since
    the reference, NaN where either lacks a face; ``scores``: per signal, (gain, correlation) of the
    other's change against the driver's (:func:`gain_and_correlation` with :data:`MIN_DRIVER_STD`)."""

    reference: int | None
    both: np.ndarray
    driver: np.ndarray
    other: np.ndarray
    scores: dict[str, tuple[float | None, float | None]]


def follow(driver: np.ndarray, other: np.ndarray) -> Following:
    """:class:`Following` of the (T, 5) signal track ``other`` (an avatar's, or the driver's own frames
    read again) against the driver's: both taken since their first shared face, scored per signal."""
    both = np.isfinite(driver).all(axis=1) & np.isfinite(other).all(axis=1)
    if not both.any():
        nan = np.full_like(np.asarray(driver, np.float64), np.nan)
        return Following(None, both, nan, nan.copy(), {name: (None, None) for name in SIGNALS})
    ref = int(np.argmax(both))
    d, a = changes_since(driver, ref), changes_since(other, ref)
    d[~both], a[~both] = np.nan, np.nan
    scores = {
        name: gain_and_correlation(d[:, k], a[:, k], min_driver_std=MIN_DRIVER_STD[name])
        for k, name in enumerate(SIGNALS)
    }
    return Following(ref, both, d, a, scores)


# --------------------------------------------------------------------------------------------- jitter


@dataclass(frozen=True)
class Jitter:
    """Mean normalised second difference of a mesh track and the number of frame triples it averages."""

    value: float | None
    triples: int


def _points(lm: np.ndarray) -> np.ndarray:
    return np.asarray(lm, dtype=np.float64)[:, :2]


def still_centres(tracks: Sequence[np.ndarray | None], threshold: float) -> np.ndarray:
    """Boolean (T,): True at frame t when the mesh moves less than ``threshold`` face sizes (mean over the
    points) both from t−1 to t and from t to t+1, i.e. the triple centred on t is still.

    ``threshold`` is per step between consecutive *used* frames: for a speed in face sizes per second
    (e.g. :data:`STILL_SPEED`) pass ``speed * frame_stride / fps``. Frames without a face, and the first
    and last frame, are never still centres.
    """
    n = len(tracks)
    step = np.full(n, np.inf)  # step[t]: motion from t-1 to t
    for t in range(1, n):
        a, b = tracks[t - 1], tracks[t]
        if a is not None and b is not None:
            step[t] = np.linalg.norm(_points(b) - _points(a), axis=1).mean() / face_size(b)
    still = np.zeros(n, dtype=bool)
    still[1:-1] = (step[1:-1] < threshold) & (step[2:] < threshold)
    return still


def landmark_jitter(tracks: Sequence[np.ndarray | None], centres: np.ndarray | None = None) -> Jitter:
    """Temporal jitter of a face-mesh track: the mean over frame triples (t−1, t, t+1) of the mean over the
    points of |p(t+1) − 2·p(t) + p(t−1)| (the second difference, i.e. acceleration), divided by the face
    size (:func:`face_size`) at t.

    A face moving at constant speed scores 0; shake and flicker score high. ``centres`` (bool per frame)
    restricts the triples to those centred where it is True — typically :func:`still_centres` of the
    *driver*, so the avatar is judged where it should be still. Triples with a missing face are skipped.
    The value is ``None`` when no triple qualifies.
    """
    n = len(tracks)
    values: list[float] = []
    for t in range(1, n - 1):
        if centres is not None and not centres[t]:
            continue
        a, b, c = tracks[t - 1], tracks[t], tracks[t + 1]
        if a is None or b is None or c is None:
            continue
        acc = _points(c) - 2.0 * _points(b) + _points(a)
        values.append(float(np.linalg.norm(acc, axis=1).mean() / face_size(b)))
    return Jitter(float(np.mean(values)) if values else None, len(values))


def jitter_comparison(
    avatar: Sequence[np.ndarray | None], driver: Sequence[np.ndarray | None], threshold: float
) -> dict[str, float | int | None]:
    """Jitter of the avatar and of the driver on the same still stretches of the driver, and their ratio.

    The driver's value is the floor set by the landmark detector's own noise on a real, still face; a
    ratio near 1 means the avatar is as steady as the person in front of the camera, a ratio of 3 that it
    shakes three times as much. ``threshold`` as in :func:`still_centres`. Keys: ``avatar``, ``driver``,
    ``ratio`` (None when undefined) and ``triples`` (how many still triples both tracks had).
    """
    if len(avatar) != len(driver):
        raise ValueError(f"tracks differ in length: avatar {len(avatar)}, driver {len(driver)}")
    centres = still_centres(driver, threshold)
    # Judge both on exactly the same triples: those where both tracks have a face in all three frames.
    both = np.array(
        [
            bool(centres[t])
            and all(avatar[k] is not None and driver[k] is not None for k in (t - 1, t, t + 1))
            for t in range(len(driver))
        ],
        dtype=bool,
    )
    a, d = landmark_jitter(avatar, both), landmark_jitter(driver, both)
    ratio = a.value / d.value if a.value is not None and d.value else None
    return {"avatar": a.value, "driver": d.value, "ratio": ratio, "triples": a.triples}
