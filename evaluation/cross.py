"""``dagan eval-cross``: cross-identity reenactment, every photo of a folder driven by every clip of another.

Self-reenactment (``dagan eval``) rewards a model that barely moves, since the source frame is already
close to every target. A user of a live avatar always drives *someone else's* photo, where no ground-truth
frame exists. What can be measured is whether the avatar moves like the driver and still looks like the
photo, and that is what this module does, through the deployed path:

- the photo is cropped exactly as the server crops an upload (:func:`dagan.face.crop_source` at the
  engine's ``image_size``);
- every driving frame goes through one :class:`dagan.face.FaceTracker` per clip with the server's
  defaults (detection on every 3rd frame, the One-Euro box filter on the frame times of the clip); frames
  before the first face are not animated (the server shows the photo then), so the first frame with a
  face is the reference;
- the engine (:func:`engine.create_engine`, any backend/precision) animates with relative motion and
  movement-scale adaptation, the server's default session: the reference frame is the first animated
  frame, and the driving keypoints go through the session's One-Euro filter (the server's parameters,
  the scored frames' times in the clip) before they move the photo's.

The tracker sees every frame of the clip, as a server that keeps up with the camera would; ``frame_stride``
only chooses which of those frames are animated and scored (the keypoint filter then sees the clip at
fps / stride). ``smoothing=None`` turns both filters off; with ``detect_every=1`` too it is the protocol
before 2026-12-05 (the tracker's fixed box average, every frame detected, raw keypoints). Per pair
(photo × clip × method) the scores are those of :func:`score_pair`; :mod:`evaluation.cross_report`
writes the tables, CSV and contact sheets. Driver-side work (tracking, mesh, face-api expression)
depends on neither photo nor model and is done once per clip and image size.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from dagan.errors import UserError
from dagan.face import DEFAULT_DETECT_EVERY, face_landmarks_upscaled
from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter, OneEuroParams

from . import metrics as M
from . import motion
from .face_id import EXPRESSION_SIZE, RECOGNITION_SIZE, FaceAnalyzer, crop_aligned, open_analyzer

__all__ = [
    "CLIP_EXTENSIONS",
    "PAIR_KEYS",
    "PHOTO_METHOD",
    "CrossEvalError",
    "DriverClip",
    "EngineMethod",
    "PhotoMethod",
    "PhotoView",
    "evaluate_cross",
    "find_clips",
    "find_photos",
    "load_clip",
    "load_photo",
    "reread_agreement",
    "run_pairs",
    "score_pair",
    "summarise",
]

CLIP_EXTENSIONS = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PHOTO_METHOD = "photo_copy"
# How many moments of each clip the contact sheet shows (reference, widest mouth, largest head turn,
# most closed eyes; evenly spaced frames where those coincide).
SHEET_MOMENTS = 4
# Per-pair keys, in table order. The motion keys come in pairs: <signal>_corr, <signal>_gain.
PAIR_KEYS = (
    *(f"{s}_{k}" for s in motion.SIGNALS for k in ("corr", "gain")),
    "prmse",
    "expression_change_error",
    "expression_agreement",
    "identity_distance",
    "csim",
    "face_rate",
    "jitter_avatar",
    "jitter_driver",
    "jitter_ratio",
)


def measure_landmarks(image: np.ndarray) -> np.ndarray | None:
    """:func:`dagan.face.face_landmarks` of ``image``, run on a bicubic upscale to
    :data:`dagan.face.MESH_MIN_SIZE` when the image is smaller (the 128-px avatar and the driving crop it
    was made from, both alike), with x and y returned in ``image``'s own pixels: the same mesh the engine
    takes a photo's eyelids from (:func:`dagan.face.face_landmarks_upscaled`)."""
    return face_landmarks_upscaled(image)


class CrossEvalError(UserError):
    """Bad input for the cross-identity evaluation (empty folder, no usable photo or clip, bad option)."""


def _warn(message: str) -> None:
    print(f"dagan: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- input


def find_photos(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files of ``folder`` in name order; an error when it is missing or has none."""
    root = Path(folder)
    if not root.is_dir():
        raise CrossEvalError(f"photo folder {root} does not exist")
    photos = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    if not photos:
        raise CrossEvalError(f"{root} contains no photos ({'/'.join(PHOTO_EXTENSIONS)} files)")
    return photos


def find_clips(folder: str | os.PathLike[str]) -> list[Path]:
    """Driving clips of ``folder`` in name order: video files and sub-folders of frames."""
    from dagan.media import FRAME_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise CrossEvalError(f"clip folder {root} does not exist")
    clips = [
        p
        for p in sorted(root.iterdir())
        if (p.is_file() and p.suffix.lower() in CLIP_EXTENSIONS)
        or (p.is_dir() and any(f.suffix.lower() in FRAME_EXTENSIONS for f in p.iterdir()))
    ]
    if not clips:
        raise CrossEvalError(
            f"{root} contains no driving clips ({'/'.join(CLIP_EXTENSIONS)} files or folders of frames)"
        )
    return clips


@dataclass
class PhotoView:
    """A photo as one engine sees it: the server's crop at ``image_size`` and its face analysis."""

    name: str
    crop: np.ndarray
    landmarks: np.ndarray
    signals: np.ndarray
    features: np.ndarray
    embedding: np.ndarray | None = None
    expression: int | None = None


def _identity(
    analyzer: FaceAnalyzer | None,
    images: Sequence[np.ndarray],
    landmarks: Sequence[np.ndarray | None],
    embed: bool = True,
) -> tuple[list[np.ndarray | None], list[int | None]]:
    """face-api descriptors (with ``embed``) and expression classes of the faces at ``landmarks`` (None
    where there is no face, or without an analyzer / its expression model)."""
    n = len(images)
    emb: list[np.ndarray | None] = [None] * n
    exp: list[int | None] = [None] * n
    if analyzer is None:
        return emb, exp
    want_exp = analyzer.expression is not None
    idx: list[int] = []
    rec: list[np.ndarray] = []
    ex: list[np.ndarray] = []
    for i, (image, lm) in enumerate(zip(images, landmarks, strict=True)):
        if lm is None:
            continue
        try:
            r = crop_aligned(image, lm, RECOGNITION_SIZE) if embed else None
            e = crop_aligned(image, lm, EXPRESSION_SIZE) if want_exp else None
        except ValueError:  # the face box lies outside the image
            continue
        idx.append(i)
        if r is not None:
            rec.append(r)
        if e is not None:
            ex.append(e)
    for start in range(0, len(idx), 32):
        part = idx[start : start + 32]
        if embed:
            vectors = analyzer.embed_crops(rec[start : start + 32])
            for k, i in enumerate(part):
                emb[i] = vectors[k]
        if want_exp:
            probs = analyzer.expressions_crops(ex[start : start + 32])
            for k, i in enumerate(part):
                exp[i] = int(np.argmax(probs[k]))
    return emb, exp


def load_photo(path: Path, size: int, analyzer: FaceAnalyzer | None, detector: Any = None) -> PhotoView:
    """Crop a photo as the server does and analyse the crop. Raises :class:`dagan.face.NoFaceError` when
    the detector finds no face, or mediapipe no face mesh in the crop (nothing could be scored)."""
    from dagan.face import crop_source
    from dagan.media import load_image

    crop, _ = crop_source(load_image(path), out_size=size, detector=detector)
    return photo_view(path.stem, crop, analyzer)


def photo_view(name: str, crop: np.ndarray, analyzer: FaceAnalyzer | None) -> PhotoView:
    """Analyse a ready crop as a source photo (:func:`load_photo`'s second half; ``--self`` gives it a
    clip's first crop). Raises :class:`dagan.face.NoFaceError` without a face mesh in it."""
    from dagan.face import NoFaceError

    lm = measure_landmarks(crop)
    if lm is None:
        raise NoFaceError(f"mediapipe finds no face mesh in the {crop.shape[0]}×{crop.shape[1]} crop")
    emb, exp = _identity(analyzer, [crop], [lm])
    return PhotoView(
        name=name,
        crop=crop,
        landmarks=lm,
        signals=motion.frame_signals(lm, crop.shape[:2]),
        features=M.expression_features(lm),
        embedding=emb[0],
        expression=exp[0],
    )


@dataclass
class DriverClip:
    """One driving clip at one crop size: the crops the engine gets and their analysis (all cached)."""

    name: str
    path: Path
    fps: float
    frame_stride: int
    crops: list[np.ndarray]
    frame_index: list[int]  # index of each used frame in the clip
    detected: list[bool]  # the tracker's detector found a face in that frame (else: the last box)
    landmarks: list[np.ndarray | None]
    signals: np.ndarray  # (T, 5), NaN without a face mesh
    features: list[np.ndarray | None]
    expression: list[int | None]
    lead_without_face: int  # frames before the first face (not animated, as in the server)

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def frame_times(self) -> list[float]:
        """Each used frame's time in the clip (s): the keypoint filter's clock."""
        return [i / self.fps for i in self.frame_index]

    @property
    def still_threshold(self) -> float:
        """Per-step stillness threshold (face sizes) for this clip's frame rate and stride."""
        return motion.STILL_SPEED * self.frame_stride / self.fps

    def moments(self, count: int = SHEET_MOMENTS) -> list[tuple[int, str]]:
        """(frame, label) pairs for the contact sheet: :func:`pick_moments` of this clip's signals."""
        return pick_moments(self.signals, count)


def pick_moments(signals: np.ndarray, count: int = SHEET_MOMENTS) -> list[tuple[int, str]]:
    """(frame, label) pairs, in frame order, from a driver's (T, 5) signals (NaN without a face mesh):
    the reference frame, the widest mouth, the largest head turn and the most closed eyes (changes since
    the reference), topped up with evenly spaced frames where those coincide or are undefined."""
    n = len(signals)
    chosen: dict[int, str] = {0: "ref"}
    finite = np.isfinite(signals).all(axis=1)
    if finite.any():
        delta = motion.changes_since(signals, int(np.argmax(finite)))
        delta[~finite] = np.nan
        picks = (
            (int(np.nanargmax(delta[:, 3])), "mouth"),
            (int(np.nanargmax(np.abs(delta[:, 0]))), "yaw"),
            (int(np.nanargmin(delta[:, 4])), "eyes"),
        )
        for t, label in picks:
            chosen.setdefault(t, label)
    for t in np.linspace(0, n - 1, count + 2)[1:-1].round().astype(int):
        if len(chosen) >= min(count, n):
            break
        chosen.setdefault(int(t), f"#{int(t)}")
    return sorted(chosen.items())[:count]


def load_clip(
    path: Path,
    size: int,
    analyzer: FaceAnalyzer | None,
    frame_stride: int = 1,
    max_frames: int | None = None,
    smoothing: OneEuroParams | None = DEFAULT_PARAMS,
    detect_every: int = DEFAULT_DETECT_EVERY,
) -> DriverClip | None:
    """Track and crop a driving clip as the server does (detection every ``detect_every`` frames, the
    One-Euro box filter ``smoothing`` on the clip's frame times; None: the tracker's fixed average), and
    analyse the used crops.

    Returns ``None`` when the tracker finds no face in any frame. An unreadable clip raises
    :class:`dagan.media.MediaError` (one line naming the file)."""
    from dagan.face import tracked_crops
    from dagan.media import VideoReader

    crops: list[np.ndarray] = []
    index: list[int] = []
    detected: list[bool] = []
    first: int | None = None
    with VideoReader(path) as reader:
        fps = float(reader.fps)
        # the frames before the first face are left out: the server shows the photo until then and takes
        # the reference later
        with contextlib.closing(tracked_crops(reader, fps, size, detect_every, smoothing)) as tracked:
            for frame in tracked:
                if first is None:
                    first = frame.index
                if (frame.index - first) % frame_stride:
                    continue
                crops.append(frame.crop)
                index.append(frame.index)
                detected.append(frame.detected)
                if max_frames is not None and len(crops) >= max_frames:
                    break
    if first is None:
        return None
    landmarks = [measure_landmarks(c) for c in crops]
    _, expression = _identity(analyzer, crops, landmarks, embed=False)
    return DriverClip(
        name=path.stem if path.is_file() else path.name,
        path=path,
        fps=fps,
        frame_stride=frame_stride,
        crops=crops,
        frame_index=index,
        detected=detected,
        landmarks=landmarks,
        signals=motion.signal_track(landmarks, (size, size)),
        features=[M.expression_features(lm) if lm is not None else None for lm in landmarks],
        expression=expression,
        lead_without_face=first,
    )


# --------------------------------------------------------------------------------------------- methods


class EngineLike(Protocol):
    """What :class:`EngineMethod` needs of an engine (:class:`engine.Engine`, or a test double). Its
    sessions take the attributes ``kp_filter`` and ``frame_time`` (:class:`engine.base.Session`)."""

    image_size: int

    def new_session(self, source_image: np.ndarray, relative: bool = False) -> Any: ...

    def animate_batch(self, sessions: list[Any], frames: list[np.ndarray]) -> list[Any]: ...


@dataclass
class EngineMethod:
    """A model animated through an engine, in a server-default session (relative motion, adapted scale,
    the driving keypoints One-Euro filtered with ``smoothing``; None: raw)."""

    name: str
    engine: EngineLike
    checkpoint: str = ""
    batch_size: int = 8
    smoothing: OneEuroParams | None = None

    @property
    def image_size(self) -> int:
        return int(self.engine.image_size)

    def animate(
        self, photo: np.ndarray, frames: Sequence[np.ndarray], times: Sequence[float] | None = None
    ) -> Iterator[list[np.ndarray]]:
        """Output frames in batches. The first frame goes alone, so it becomes the session's reference
        pose before any other frame is animated, exactly as the first camera frame of a call does.

        With ``smoothing`` the session's keypoint filter needs the frames one at a time, in order, each
        with its time (``times``, seconds; default 30 fps): a batch of one session's frames would give
        the filter one clock reading for all of them. Batches are then of one frame."""
        session = self.engine.new_session(photo, relative=True)
        if self.smoothing is not None:
            session.kp_filter = OneEuroFilter(self.smoothing)
            times = times if times is not None else [i / 30.0 for i in range(len(frames))]
            for frame, t in zip(frames, times, strict=True):
                session.frame_time = t
                yield [self.engine.animate_batch([session], [frame])[0].image]
            return
        done = 0
        while done < len(frames):
            n = 1 if done == 0 else self.batch_size
            chunk = list(frames[done : done + n])
            yield [r.image for r in self.engine.animate_batch([session] * len(chunk), chunk)]
            done += len(chunk)


@dataclass
class PhotoMethod:
    """The baseline "output = the photo": never moves (gains 0) and is the photo itself (identity perfect)."""

    name: str = PHOTO_METHOD
    image_size: int = 0
    checkpoint: str = ""


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class AvatarTrack:
    """What the scores need of the avatar's frames."""

    landmarks: list[np.ndarray | None]
    signals: np.ndarray
    features: list[np.ndarray | None]
    embedding: list[np.ndarray | None]
    expression: list[int | None]


def analyse_outputs(
    frames: Sequence[np.ndarray], photo: PhotoView, analyzer: FaceAnalyzer | None
) -> AvatarTrack:
    """Mesh, signals and face-api outputs of avatar frames. Where mediapipe finds no face, the identity
    crop is taken where the photo's face is (the avatar at rest), so a blurred face still gets judged."""
    size = frames[0].shape[:2] if frames else photo.crop.shape[:2]
    landmarks = [measure_landmarks(f) for f in frames]
    fallback = [lm if lm is not None else photo.landmarks for lm in landmarks]
    emb, exp = _identity(analyzer, frames, fallback)
    return AvatarTrack(
        landmarks=landmarks,
        signals=motion.signal_track(landmarks, size),
        features=[M.expression_features(lm) if lm is not None else None for lm in landmarks],
        embedding=emb,
        expression=exp,
    )


def photo_track(photo: PhotoView, n: int) -> AvatarTrack:
    """The "output = photo" avatar: the photo's analysis repeated (the same image gives the same mesh)."""
    return AvatarTrack(
        landmarks=[photo.landmarks] * n,
        signals=np.tile(photo.signals, (n, 1)),
        features=[photo.features] * n,
        embedding=[photo.embedding] * n,
        expression=[photo.expression] * n,
    )


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def score_pair(photo: PhotoView, clip: DriverClip, avatar: AvatarTrack) -> dict[str, Any]:
    """Every per-pair score (see docs/evaluation.md, "Cross-identity") of one avatar track.

    Changes are taken since the reference frame: the first frame where both driver and avatar have a face
    mesh (normally frame 0, the engine's reference).

    - ``<signal>_gain`` / ``_corr``: :func:`motion.gain_and_correlation` of avatar vs driver change (None
      where the driver's change has a std below :data:`motion.MIN_DRIVER_STD`: nothing to follow).
    - ``prmse``: RMS over the frames after the reference and the three angles of (avatar change − driver
      change), degrees.
    - ``expression_change_error``: mean absolute difference of the six geometric expression-feature
      changes.
    - ``expression_agreement``: share of frames where face-api's 7-class expression of avatar and driver
      agree.
    - ``identity_distance`` / ``csim``: face-api descriptor distance / cosine between the photo and each
      avatar frame, averaged.
    - ``face_rate``: share of avatar frames with a face mesh.
    - ``jitter_*``: :func:`motion.jitter_comparison` (on the driver's still stretches).
    """
    n = len(clip)
    out: dict[str, Any] = {k: None for k in PAIR_KEYS}
    out["frames"] = n
    faces = [lm is not None for lm in avatar.landmarks]
    out["face_rate"] = sum(faces) / n if n else None
    followed = motion.follow(clip.signals, avatar.signals)
    out["motion_frames"] = int(followed.both.sum())
    if followed.reference is not None:
        ref, both, d, a = followed.reference, followed.both, followed.driver, followed.other
        out["reference_frame"] = ref
        for name, (gain, corr) in followed.scores.items():
            out[f"{name}_gain"], out[f"{name}_corr"] = gain, corr
        later = both.copy()
        later[ref] = False
        if later.any():
            k = len(motion.ANGLE_SIGNALS)
            err = M.angle_difference(a[later, :k], d[later, :k])
            out["prmse"] = float(np.sqrt(np.mean(err**2)))
            fd_ref, fa_ref = clip.features[ref], avatar.features[ref]
            assert fd_ref is not None and fa_ref is not None
            errors = [
                float(np.abs((avatar.features[t] - fa_ref) - (clip.features[t] - fd_ref)).mean())
                for t in np.flatnonzero(later)
            ]
            out["expression_change_error"] = _mean(errors)
    agree = [
        float(e_a == e_d)
        for e_a, e_d in zip(avatar.expression, clip.expression, strict=True)
        if e_a is not None and e_d is not None
    ]
    out["expression_agreement"] = _mean(agree)
    if photo.embedding is not None:
        p = photo.embedding
        dist, cos = [], []
        for e in avatar.embedding:
            if e is None:
                continue
            dist.append(float(np.linalg.norm(e - p)))
            cos.append(float(np.clip(e @ p / max(np.linalg.norm(e) * np.linalg.norm(p), 1e-12), -1, 1)))
        out["identity_distance"], out["csim"] = _mean(dist), _mean(cos)
    jitter = motion.jitter_comparison(avatar.landmarks, clip.landmarks, clip.still_threshold)
    out["jitter_avatar"], out["jitter_driver"] = jitter["avatar"], jitter["driver"]
    out["jitter_ratio"], out["still_triples"] = jitter["ratio"], jitter["triples"]
    return out


# The driver's crops are read again after a trip through this fraction of their side (area down, bicubic
# up) for :func:`reread_agreement`: issue 18's check that the measure sees a motion at all.
REREAD_SCALE = 0.5


def reread_agreement(clip: DriverClip, scale: float = REREAD_SCALE) -> dict[str, float | None]:
    """How far the measure itself follows each of this driver's signals: per signal, the correlation of
    the change since the reference measured on the driver's crops degraded through ``scale`` of their
    side and back against the change measured on the crops themselves (None where the driver barely
    moves it, as for the pairs).

    Why: a signal the driver hardly moves (a talker who nods by 1°) is read with noise of its own size,
    and an avatar can hardly be expected to follow it better than the measure follows the driver's own
    frames a little blurred: read a pair's r against this."""
    if not clip.crops:
        return {name: None for name in motion.SIGNALS}
    h, w = clip.crops[0].shape[:2]
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    landmarks = [
        measure_landmarks(
            cv2.resize(
                cv2.resize(c, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC
            )
        )
        for c in clip.crops
    ]
    again = motion.signal_track(landmarks, (h, w))
    return {name: corr for name, (_, corr) in motion.follow(clip.signals, again).scores.items()}


def clip_summary(clip: DriverClip) -> dict[str, Any]:
    """What the driver itself does: how much each signal moves (std of its change), how often a face is
    found, how many still triples it has, and its own mesh jitter there; and how well the measure follows
    each signal on the driver's own frames (``<signal>_reread_corr``, :func:`reread_agreement`). A driver
    whose mouth hardly moves cannot show whether the avatar's does: read the mouth columns against
    ``mouth_std`` and ``mouth_reread_corr``."""
    finite = np.isfinite(clip.signals).all(axis=1)
    row: dict[str, Any] = {
        "clip": clip.name,
        "frames": len(clip),
        "fps": clip.fps,
        "lead_without_face": clip.lead_without_face,
        "tracker_face_rate": float(np.mean(clip.detected)) if clip.detected else None,
        "mesh_face_rate": float(finite.mean()) if len(clip) else None,
    }
    if finite.any():
        delta = motion.changes_since(clip.signals, int(np.argmax(finite)))[finite]
        for k, name in enumerate(motion.SIGNALS):
            row[f"{name}_std"] = float(delta[:, k].std())
    for name, r in reread_agreement(clip).items():
        row[f"{name}_reread_corr"] = r
    centres = motion.still_centres(clip.landmarks, clip.still_threshold)
    jitter = motion.landmark_jitter(clip.landmarks, centres)
    row["still_triples"], row["jitter"] = jitter.triples, jitter.value
    return row


def summarise(pairs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median and mean over pairs of every :data:`PAIR_KEYS` value, per method (``None`` values, e.g. a
    correlation of an avatar that never moves, are left out; ``n`` counts the pairs behind each key)."""
    result: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = [p for p in pairs if p["method"] == method]
        median, mean, count = {}, {}, {}
        for key in PAIR_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            median[key] = float(np.median(values)) if values else None
            mean[key] = float(np.mean(values)) if values else None
            count[key] = len(values)
        result[method] = {"pairs": len(rows), "median": median, "mean": mean, "n": count}
    return result


# --------------------------------------------------------------------------------------------- running


@dataclass
class PairRun:
    """Everything a run produced: per-pair rows, contact-sheet tiles, the inputs actually used."""

    pairs: list[dict[str, Any]] = field(default_factory=list)
    # sheet[method][(photo, clip)] = [(frame index, label, avatar image)]
    sheet: dict[str, dict[tuple[str, str], list[tuple[int, str, np.ndarray]]]] = field(default_factory=dict)
    photos: dict[int, list[PhotoView]] = field(default_factory=dict)
    clips: dict[int, list[DriverClip]] = field(default_factory=dict)


def run_pairs(
    methods: Sequence[EngineMethod | PhotoMethod],
    photos: dict[int, list[PhotoView]],
    clips: dict[int, list[DriverClip]],
    analyzer: FaceAnalyzer | None,
    progress: bool = True,
    own_clip_only: bool = False,
) -> PairRun:
    """Animate and score every photo × clip pair with every method (``own_clip_only``: only the pairs
    of a photo and the clip of the same name, self-reenactment).

    ``photos``/``clips`` are keyed by image size (a baseline checkpoint of another size gets its own
    crops; the photo baseline uses the first engine's size, or its own ``image_size``). The bar counts
    animated frames."""
    from tqdm import tqdm

    run = PairRun(photos=photos, clips=clips)

    def paired(photo: PhotoView, clip: DriverClip) -> bool:
        return not own_clip_only or photo.name == clip.name

    total = sum(
        len(c)
        for m in methods
        if isinstance(m, EngineMethod)
        for p in photos[m.image_size]
        for c in clips[m.image_size]
        if paired(p, c)
    )
    bar = tqdm(total=total, desc="eval-cross", unit="frame", disable=not progress)
    try:
        for method in methods:
            size = method.image_size
            tiles = run.sheet.setdefault(method.name, {})
            for photo in photos[size]:
                for clip in (c for c in clips[size] if paired(photo, c)):
                    bar.set_postfix_str(f"{method.name}: {photo.name} × {clip.name}", refresh=False)
                    if isinstance(method, PhotoMethod):
                        avatar = photo_track(photo, len(clip))
                    else:
                        frames: list[np.ndarray] = []
                        for batch in method.animate(photo.crop, clip.crops, clip.frame_times):
                            frames.extend(batch)
                            bar.update(len(batch))
                        if len(frames) != len(clip):
                            raise CrossEvalError(
                                f"{method.name} returned {len(frames)} frames for {len(clip)} driving frames"
                            )
                        avatar = analyse_outputs(frames, photo, analyzer)
                        tiles[(photo.name, clip.name)] = [(t, lab, frames[t]) for t, lab in clip.moments()]
                    row = {"method": method.name, "photo": photo.name, "clip": clip.name}
                    row.update(score_pair(photo, clip, avatar))
                    run.pairs.append(row)
    finally:
        bar.close()
    return run


def every_nth(k: int) -> str:
    """'every frame', 'every 2nd frame', 'every 3rd frame', 'every 11th frame'."""
    if k == 1:
        return "every frame"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"every {k}{suffix} frame"


def _method_names(checkpoints: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Row names for baseline checkpoints: the file (or folder) stem, made unique."""
    names: list[str] = []
    for ckpt in checkpoints:
        base = Path(ckpt).name
        for suffix in (".safetensors", ".pt", ".pth"):
            base = base.removesuffix(suffix)
        name, k = base or "baseline", 2
        while name in names or name in ("dagan", PHOTO_METHOD):
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def evaluate_cross(
    photos_dir: str | os.PathLike[str] | None,
    clips_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    baseline_checkpoints: Sequence[str | os.PathLike[str]] = (),
    backend: str = "torch",
    precision: str = "fp32",
    device: str = "auto",
    threads: int | None = None,
    frame_stride: int = 1,
    max_frames: int | None = None,
    batch_size: int = 8,
    smoothing: OneEuroParams | None = DEFAULT_PARAMS,
    detect_every: int = DEFAULT_DETECT_EVERY,
    assets: str | os.PathLike[str] | None = None,
    use_identity: bool = True,
    progress: bool = True,
    engines: Sequence[tuple[str, EngineLike, str]] | None = None,
    self_reenact: bool = False,
) -> tuple[dict[str, Any], PairRun]:
    """Run the cross-identity protocol; returns (JSON-ready result, the run with its sheet tiles).

    The main checkpoint (default: ``$DAGAN_CHECKPOINT``, then the bundled weights) is row ``dagan``; each
    ``baseline_checkpoints`` entry is a row named after its file; ``photo_copy`` (output = the photo) is
    always there. ``engines`` replaces the checkpoints by ready (name, engine, label) triples, for tests.
    ``smoothing`` and ``detect_every`` are the server's motion settings (its defaults: the One-Euro filter
    on the crop box and the keypoints, detection on every 3rd frame); ``smoothing=None`` turns the filters
    off. ``self_reenact`` (``--self``, no ``photos_dir``): each clip drives its own first scored crop,
    the same measures on self-reenactment: the reference is then the photo itself, so the motion moved is
    the driver's own and what is scored is what the generator makes of it (mouth and eyes it cannot
    open or close there, it cannot for another face either).
    Photos without a face are skipped with a warning and counted; so are clips without one. A folder
    without photos or clips, an unreadable photo or clip, or nothing left to evaluate is an error.
    """

    from .evaluate import _engine

    if frame_stride < 1 or batch_size < 1 or detect_every < 1:
        raise CrossEvalError("--frame-stride, --batch-size and --detect-every must be >= 1")
    if max_frames is not None and max_frames < 3:
        raise CrossEvalError("--max-frames must be >= 3 (gains need a few frames)")
    if self_reenact == (photos_dir is not None):
        raise CrossEvalError("eval-cross needs --photos DIR, or --self (each clip drives its own photo)")
    photo_paths = [] if photos_dir is None else find_photos(photos_dir)
    clip_paths = find_clips(clips_dir)
    from dagan.media import VideoReader

    for c in clip_paths:  # fail on an unreadable clip now, not after minutes of work
        VideoReader(c).close()

    methods: list[EngineMethod | PhotoMethod] = []
    if engines is None:
        path, main = _engine(checkpoint, backend, device, precision, threads)
        methods.append(EngineMethod("dagan", main, str(path), batch_size, smoothing))
        for name, ckpt in zip(_method_names(baseline_checkpoints), baseline_checkpoints, strict=True):
            bpath, eng = _engine(ckpt, backend, device, precision, threads)
            methods.append(EngineMethod(name, eng, str(bpath), batch_size, smoothing))
    else:
        if not engines:
            raise CrossEvalError("evaluate_cross needs at least one engine")
        methods.extend(EngineMethod(n, e, label, batch_size, smoothing) for n, e, label in engines)
    first = methods[0]
    assert isinstance(first, EngineMethod)
    main_size = first.image_size
    methods.append(PhotoMethod(image_size=main_size))
    sizes = sorted({m.image_size for m in methods})

    notes: list[str] = [
        "relative motion as the server runs it (movement-scale adaptation; the first animated frame is the "
        "reference); photos cropped as the server crops an upload, driving frames by its FaceTracker "
        f"(face detection on {every_nth(detect_every)}); "
        + (
            f"the crop box and the driving keypoints One-Euro filtered as the server does (min cutoff "
            f"{smoothing.min_cutoff:g} Hz, beta {smoothing.beta:g}; the keypoint filter on the scored "
            "frames' times in the clip)"
            if smoothing is not None
            else "no motion filtering (raw keypoints, the tracker's fixed box average)"
        ),
        "gain: least-squares slope with intercept of the avatar's change since the reference frame against "
        "the driver's; r: Pearson correlation; both on frames where both have a face mesh",
    ]
    analyzer, folder, why = open_analyzer(use_identity, assets, device)
    if why is not None:
        notes.append(f"identity_distance, csim and expression_agreement are null: {why}")

    skipped_photos: list[dict[str, str]] = []
    photos: dict[int, list[PhotoView]] = {s: [] for s in sizes}
    from dagan.face import FaceDetector, NoFaceError

    with FaceDetector() as detector:
        for p in photo_paths:
            try:
                views = {s: load_photo(p, s, analyzer, detector) for s in sizes}
            except NoFaceError as exc:
                reason = str(exc).split(";")[0]
                _warn(f"skipping photo {p.name}: {reason}")
                skipped_photos.append({"photo": p.name, "reason": reason})
                continue
            for s, view in views.items():
                photos[s].append(view)
    if not photos[sizes[0]] and not self_reenact:
        raise CrossEvalError(
            f"no photo in {photos_dir} has a face that can be used ({len(photo_paths)} tried)"
        )

    skipped_clips: list[dict[str, str]] = []
    clips: dict[int, list[DriverClip]] = {s: [] for s in sizes}
    from tqdm import tqdm

    for c in tqdm(clip_paths, desc="driving clips", unit="clip", disable=not progress):
        loaded = {
            s: load_clip(c, s, analyzer, frame_stride, max_frames, smoothing, detect_every) for s in sizes
        }
        if any(v is None or len(v) < 3 for v in loaded.values()):
            reason = "no face found in any frame" if any(v is None for v in loaded.values()) else "< 3 frames"
            _warn(f"skipping clip {c.name}: {reason}")
            skipped_clips.append({"clip": c.name, "reason": reason})
            continue
        for s, clip in loaded.items():
            assert clip is not None
            clips[s].append(clip)
    if not clips[sizes[0]]:
        raise CrossEvalError(f"no clip in {clips_dir} has a face to drive with ({len(clip_paths)} tried)")

    if self_reenact:  # each clip's own first scored crop is its photo
        for i, clip in enumerate(clips[sizes[0]]):
            try:
                views = {s: photo_view(clip.name, clips[s][i].crops[0], analyzer) for s in sizes}
            except NoFaceError as exc:
                _warn(f"skipping clip {clip.name} as its own photo: {exc}")
                skipped_photos.append({"photo": clip.name, "reason": str(exc)})
                continue
            for s, view in views.items():
                photos[s].append(view)
        if not photos[sizes[0]]:
            raise CrossEvalError(f"no clip in {clips_dir} has a first frame with a face mesh")

    run = run_pairs(methods, photos, clips, analyzer, progress=progress, own_clip_only=self_reenact)
    names = [m.name for m in methods]
    result: dict[str, Any] = {
        "protocol": (
            "self-reenactment: each clip drives its own first frame, relative motion (server default)"
            if self_reenact
            else "cross-identity, relative motion (server default)"
        ),
        "self_reenact": self_reenact,
        "photos_dir": None if photos_dir is None else str(photos_dir),
        "clips_dir": str(clips_dir),
        "methods": {m.name: m.checkpoint or "output = the photo crop" for m in methods},
        "backend": str(getattr(first.engine, "backend", backend)),
        "precision": str(getattr(first.engine, "precision", precision)),
        "threads": threads,
        "frame_stride": frame_stride,
        "max_frames": max_frames,
        "smoothing": (
            None if smoothing is None else {"min_cutoff": smoothing.min_cutoff, "beta": smoothing.beta}
        ),
        "detect_every": detect_every,
        "image_size": main_size,
        "photos": [v.name for v in photos[main_size]],
        "clips": [clip_summary(c) for c in clips[main_size]],
        "skipped_photos": skipped_photos,
        "skipped_clips": skipped_clips,
        "identity_assets": str(folder) if analyzer is not None else None,
        "still_speed": motion.STILL_SPEED,
        "summary": summarise(run.pairs, names),
        "pairs": run.pairs,
        "notes": notes,
    }
    return result, run
