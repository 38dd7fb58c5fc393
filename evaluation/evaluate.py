"""``dagan eval``: self-reenactment metrics of a checkpoint on a test folder, beside two trivial baselines.

Protocol (FOMM / DaGAN reconstruction): for every test video the first frame is the source and every
frame (every ``frame_stride``-th) is both the driving frame and the ground truth; the model animates the
source, and each output is compared with its ground-truth frame. The model runs through the inference
engine (any backend and precision, so deployed quality is measured), with absolute driving keypoints
(row ``dagan``) and/or relative motion, the server's default, whose reference pose is the first driving
frame as in a call (row ``dagan_relative``). With the source frame itself as the reference, relative
motion would equal absolute motion exactly (kp_ref = kp_s), so that would measure nothing new.

In the same run, with the same frames and the same metric code:

- ``source_copy``: output = the source frame (no motion at all). A model must beat it to have learned
  anything; it is the floor for every metric.
- ``driving_copy``: output = the driving frame passed through unchanged ("warped by nothing"). In
  self-reenactment the driving frame *is* the ground truth, so this is the ceiling, and it checks the
  pipeline: L1 = 0, SSIM = 1, AKD = 0, PRMSE = 0 and AED = 0 exactly; CSIM and expression agreement are
  the values real frames of the same person reach.

Metric keys (per method): ``l1``, ``psnr``, ``ssim`` (all frames); ``akd``, ``prmse``,
``expression_feature_error`` (frames where mediapipe finds a face in both the output and the ground truth;
``landmark_missing_rate`` = fraction of frames with a face in the ground truth but none in the output);
``aed``, ``csim``, ``expression_agreement`` (face-api networks; ``null`` when the assets are absent, or when
no frame has a face). See docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dagan.errors import UserError
from dagan.face import face_landmarks

from . import metrics as M
from .face_id import EXPRESSION_SIZE, RECOGNITION_SIZE, FaceAnalyzer, crop_aligned, open_analyzer

__all__ = [
    "METHODS",
    "METRIC_KEYS",
    "EvalDataError",
    "evaluate",
    "find_videos",
    "markdown_table",
    "write_report",
]

# Every row a report can have; a run has the rows of its modes plus both baselines.
METHODS = ("dagan", "dagan_relative", "source_copy", "driving_copy")
METRIC_KEYS = (
    "l1",
    "psnr",
    "ssim",
    "akd",
    "landmark_missing_rate",
    "prmse",
    "expression_feature_error",
    "aed",
    "csim",
    "expression_agreement",
)
# (label, better) for the markdown table.
_COLUMNS = {
    "l1": ("L1", "↓"),
    "psnr": ("PSNR dB", "↑"),
    "ssim": ("SSIM", "↑"),
    "akd": ("AKD px", "↓"),
    "landmark_missing_rate": ("missing", "↓"),
    "prmse": ("PRMSE °", "↓"),
    "expression_feature_error": ("expr. feat.", "↓"),
    "aed": ("AED", "↓"),
    "csim": ("CSIM", "↑"),
    "expression_agreement": ("expr. agree", "↑"),
}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class EvalDataError(UserError):
    """The test folder has no usable videos."""


def find_videos(root: str | os.PathLike[str]) -> list[Path]:
    """Videos of a test folder: sub-folders of frames and video files, in name order."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"test data folder {root} does not exist")
    from dagan.media import FRAME_EXTENSIONS

    videos = []
    for entry in sorted(root.iterdir()):
        if (entry.is_dir() and any(p.suffix.lower() in FRAME_EXTENSIONS for p in entry.iterdir())) or (
            entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS
        ):
            videos.append(entry)
    if not videos:
        hint = " (did you mean its test/ sub-folder?)" if (root / "test").is_dir() else ""
        raise EvalDataError(f"{root} contains no videos (folders of frames or video files){hint}")
    return videos


# ---------------------------------------------------------------------------------------- per image


@dataclass
class _Face:
    """Everything the metrics need from one image, computed once and shared between methods."""

    landmarks: np.ndarray | None
    pose: np.ndarray | None = None
    features: np.ndarray | None = None
    embedding: np.ndarray | None = None
    expression: int | None = None


def _analyse(
    images: list[np.ndarray], analyzer: FaceAnalyzer | None, fallback: list[_Face] | None = None
) -> list[_Face]:
    """Landmarks, head pose, expression features and (with an analyzer) face-api outputs of uint8 images.

    When an image has no face, its identity crop uses the landmarks of the matching ``fallback`` image
    (the ground truth: in self-reenactment the output should be where the ground truth is), so AED and CSIM
    still judge a blurry output instead of silently dropping it.
    """
    faces: list[_Face] = []
    for image in images:
        lm = face_landmarks(image)
        face = _Face(lm)
        if lm is not None:
            face.pose = M.head_pose(lm, image.shape[:2])
            face.features = M.expression_features(lm)
        faces.append(face)
    if analyzer is None:
        return faces
    idx, rec, exp = [], [], []
    for i, (image, face) in enumerate(zip(images, faces, strict=True)):
        lm = face.landmarks if face.landmarks is not None else (fallback[i].landmarks if fallback else None)
        if lm is None:
            continue
        idx.append(i)
        rec.append(crop_aligned(image, lm, RECOGNITION_SIZE))
        if analyzer.expression is not None:
            exp.append(crop_aligned(image, lm, EXPRESSION_SIZE))
    if idx:
        embeddings = analyzer.embed_crops(rec)
        probs = analyzer.expressions_crops(exp) if exp else None
        for k, i in enumerate(idx):
            faces[i].embedding = embeddings[k]
            if probs is not None:
                faces[i].expression = int(np.argmax(probs[k]))
    return faces


@dataclass
class _Accumulator:
    """Per-frame values of one method, summarised at the end."""

    l1: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    akd: list[float] = field(default_factory=list)
    pose_sq: list[float] = field(default_factory=list)
    feat_err: list[float] = field(default_factory=list)
    aed: list[float] = field(default_factory=list)
    csim: list[float] = field(default_factory=list)
    agree: list[float] = field(default_factory=list)
    truth_faces: int = 0
    missing: int = 0

    def add(self, out: np.ndarray, truth: np.ndarray, f_out: _Face, f_truth: _Face, f_source: _Face) -> None:
        self.l1.append(M.l1(out, truth))
        self.psnr.append(M.psnr(out, truth))
        self.ssim.append(M.ssim(out, truth))
        if f_truth.landmarks is not None:
            self.truth_faces += 1
            if f_out.landmarks is None:
                self.missing += 1
            else:
                self.akd.append(M.akd(f_out.landmarks, f_truth.landmarks))
                diff = M.angle_difference(f_out.pose, f_truth.pose)
                self.pose_sq.extend((diff**2).tolist())
                self.feat_err.append(float(np.abs(f_out.features - f_truth.features).mean()))
        if f_out.embedding is not None and f_truth.embedding is not None:
            self.aed.append(float(np.linalg.norm(f_out.embedding - f_truth.embedding)))
        if f_out.embedding is not None and f_source.embedding is not None:
            a, b = f_out.embedding, f_source.embedding
            cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            self.csim.append(min(max(cos, -1.0), 1.0))
        if f_out.expression is not None and f_truth.expression is not None:
            self.agree.append(float(f_out.expression == f_truth.expression))

    def summary(self) -> dict[str, float | None]:
        def mean(values: list[float]) -> float | None:
            finite = [v for v in values if math.isfinite(v)]
            return float(np.mean(finite)) if finite else None

        prmse = mean(self.pose_sq)
        return {
            "l1": mean(self.l1),
            "psnr": mean(self.psnr),
            "ssim": mean(self.ssim),
            "akd": mean(self.akd),
            "landmark_missing_rate": self.missing / self.truth_faces if self.truth_faces else None,
            "prmse": math.sqrt(prmse) if prmse is not None else None,
            "expression_feature_error": mean(self.feat_err),
            "aed": mean(self.aed),
            "csim": mean(self.csim),
            "expression_agreement": mean(self.agree),
        }


# ------------------------------------------------------------------------------------------- running


def _read_frames(path: Path, size: int, max_frames: int | None, stride: int) -> list[np.ndarray]:
    from dagan.media import VideoReader

    frames: list[np.ndarray] = []
    with VideoReader(path) as reader:
        for i, frame in enumerate(reader):
            if i % stride:
                continue
            if frame.shape[:2] != (size, size):
                interp = cv2.INTER_AREA if max(frame.shape[:2]) > size else cv2.INTER_LINEAR
                frame = cv2.resize(frame, (size, size), interpolation=interp)
            frames.append(frame)
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames


# Frames per second assumed for a test clip's frames (prepared clips are frame folders without a rate):
# the sessions' clock (``Session.frame_time``), one reading per batch, so a score does not depend on how
# fast the machine animates.
CLIP_FPS = 30.0

MODES = ("absolute", "relative")
# The result row of each animation mode ("dagan" keeps its name from the absolute-only reports).
MODE_METHODS = {"absolute": "dagan", "relative": "dagan_relative"}


def _modes(mode: str) -> tuple[str, ...]:
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise EvalDataError(f"--mode must be absolute, relative or both, got {mode!r}")
    return (mode,)


#: ``--backend`` value for the engine `dagan serve` would run (see :func:`_engine`).
SERVED = "served"


def _engine(
    checkpoint: str | os.PathLike[str] | None,
    backend: str,
    device: str,
    precision: str,
    threads: int | None,
):
    """The deployed inference path for ``checkpoint`` (default: $DAGAN_CHECKPOINT, then the bundled
    weights), with torch (and onnxruntime) limited to ``threads`` CPU threads when given.

    ``backend`` :data:`SERVED` is the engine `dagan serve` would pick for these weights on ``device``
    (:func:`engine.select.default_engine`: on a CPU the fastest backend and precision that hold quality,
    prepared and cached on first use), so an evaluation can score what users get; ``precision`` must
    then be left at fp32 (the choice is the server's)."""
    from dagan.checkpoint import resolve_checkpoint
    from engine import create_engine

    path = resolve_checkpoint(str(checkpoint) if checkpoint is not None else None)
    if threads is not None:
        if threads < 1:
            raise EvalDataError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if backend == SERVED:
        from engine.select import default_engine

        if precision != "fp32":
            raise EvalDataError(f"--backend {SERVED} picks the precision itself; leave --precision out")
        engine, _ = default_engine(path, device=device, threads=threads or 1, progress=False, measure=False)
        return path, engine
    options = {"threads": threads} if backend == "onnxruntime" and threads is not None else {}
    return path, create_engine(path, backend=backend, device=device, precision=precision, **options)


def evaluate(
    checkpoint: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    *,
    assets: str | os.PathLike[str] | None = None,
    use_identity: bool = True,
    max_videos: int | None = None,
    max_frames: int | None = None,
    frame_stride: int = 1,
    batch_size: int = 8,
    device: str = "auto",
    backend: str = "torch",
    precision: str = "fp32",
    mode: str = "both",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the self-reenactment protocol through the inference engine; returns a JSON-ready dict
    (``metrics[method][key]``, counts, notes).

    The model's frames come from :func:`engine.create_engine` (``backend``/``precision``, e.g.
    onnxruntime or TensorRT fp16), fed the uint8 frames a client would send and returning the uint8
    frames a user sees, so what is scored is what is deployed, rounded by the engine's one conversion.
    ``mode``: ``absolute``, ``relative`` (the server's default: the first driving frame is the
    reference pose) or ``both`` (one row each, beside the same baselines). ``assets`` given explicitly
    must exist; otherwise missing assets make the identity metrics ``null`` with a note.
    ``use_identity=False`` skips them on purpose."""
    from tqdm import tqdm

    if frame_stride < 1 or batch_size < 1:
        raise EvalDataError("--frame-stride and --batch-size must be >= 1")
    modes = _modes(mode)
    videos = find_videos(data)[:max_videos] if max_videos else find_videos(data)
    path, engine = _engine(checkpoint, backend, device, precision, threads)
    size = int(engine.image_size)
    notes: list[str] = [
        "landmark metrics use mediapipe 0.10.21 face-mesh landmarks; expression features are geometric "
        "(mediapipe 0.10.21 has no offline blendshapes)"
    ]
    if "relative" in modes:
        notes.append(
            "dagan_relative: relative motion as the server runs it: the first driving frame (the clip's "
            "second used frame) is the reference pose, with movement-scale adaptation; reference_pose "
            "scores the output at that pose against the source frame"
        )
    analyzer, folder, why = open_analyzer(use_identity, assets, device)
    if why is not None:
        notes.append(f"aed, csim and expression_agreement are null: {why}")
    elif analyzer is not None and analyzer.expression is None:
        notes.append("expression_agreement is null: face_expression_model not in the assets folder")

    methods = [MODE_METHODS[m] for m in modes] + ["source_copy", "driving_copy"]
    acc = {m: _Accumulator() for m in methods}
    reference_pose: dict[str, list[float]] = {"l1": [], "psnr": [], "ssim": []}
    n_frames = 0
    clips = [(v, _read_frames(v, size, max_frames, frame_stride)) for v in videos]
    bar = tqdm(
        total=sum(max(0, len(f) - 1) for _, f in clips), desc="eval", unit="frame", disable=not progress
    )
    for _video, frames in clips:
        if not frames:
            continue
        # The first frame is the source; it is not scored, since reconstructing the source itself is
        # trivial and would give "output = source" a perfect (100 dB) frame in every clip.
        source, driving = frames[0], frames[1:]
        f_source = _analyse([source], analyzer)
        f_source = f_source[0]
        sessions = {m: engine.new_session(source, relative=m == "relative") for m in modes}
        for start in range(0, len(driving), batch_size):
            truth = driving[start : start + batch_size]
            f_truth = _analyse(truth, analyzer)
            for m, session in sessions.items():
                # The clip's clock, not the wall clock: a stream's blink state learns the driver's
                # open eyes over its first half second, which on the wall clock would hold more or
                # fewer frames as the machine is faster or busier (scores that moved with the load).
                session.frame_time = (start + 1) * frame_stride / CLIP_FPS
                if session.relative and session.reference is None:
                    # As in a call: the first driving frame is the reference pose, where the output
                    # should be the source itself (scored against it as reference_pose).
                    first = engine.animate_batch([session], truth[:1])[0].image
                    reference_pose["l1"].append(M.l1(first, source))
                    reference_pose["psnr"].append(M.psnr(first, source))
                    reference_pose["ssim"].append(M.ssim(first, source))
                    rest = engine.animate_batch([session] * (len(truth) - 1), truth[1:]) if truth[1:] else []
                    outputs = [first] + [r.image for r in rest]
                else:
                    outputs = [r.image for r in engine.animate_batch([session] * len(truth), truth)]
                f_out = _analyse(outputs, analyzer, fallback=f_truth)
                for k in range(len(truth)):
                    acc[MODE_METHODS[m]].add(outputs[k], truth[k], f_out[k], f_truth[k], f_source)
            for k in range(len(truth)):
                acc["source_copy"].add(source, truth[k], f_source, f_truth[k], f_source)
                acc["driving_copy"].add(truth[k], truth[k], f_truth[k], f_truth[k], f_source)
            n_frames += len(truth)
            bar.update(len(truth))
    bar.close()
    summaries = {m: a.summary() for m, a in acc.items()}
    for method, values in summaries.items():
        if values["akd"] is None and acc[method].truth_faces:
            notes.append(
                f"{method}: akd, prmse and expression_feature_error are null: mediapipe found no face in any "
                "of its outputs (landmark_missing_rate = 1)"
            )
    result = {
        "checkpoint": str(path),
        "data": str(data),
        "backend": engine.backend,
        "precision": str(getattr(engine, "precision", precision)),
        "modes": list(modes),
        "threads": threads,
        "videos": len(clips),
        "frames": n_frames,
        "frame_stride": frame_stride,
        "image_size": size,
        "identity_assets": str(folder) if analyzer is not None else None,
        "metrics": summaries,
        "notes": notes,
    }
    if reference_pose["psnr"]:
        result["reference_pose"] = {k: float(np.mean(v)) for k, v in reference_pose.items()}
    return result


# ------------------------------------------------------------------------------------------- reports


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key in ("psnr", "akd", "prmse"):
        return f"{value:.2f}"
    return f"{value:.4f}" if key == "l1" else f"{value:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The metrics as a markdown table: one row per method, arrows saying which way is better."""
    keys = list(METRIC_KEYS)
    head = "| method | " + " | ".join(f"{_COLUMNS[k][0]} {_COLUMNS[k][1]}" for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = [head, rule]
    for method, values in result["metrics"].items():
        rows.append(f"| {method} | " + " | ".join(_fmt(k, values.get(k)) for k in keys) + " |")
    engine = f"{result.get('backend', 'torch')} {result.get('precision', 'fp32')}"
    lines = [
        f"Self-reenactment on {result['videos']} videos, {result['frames']} frames ({result['data']}), "
        f"checkpoint {result['checkpoint']}, engine {engine}.",
        "",
        *rows,
        "",
    ]
    pose = result.get("reference_pose")
    if pose:
        lines += [
            "At the reference pose (relative, the first driving frame: the output should be the source): "
            f"PSNR {pose['psnr']:.2f} dB, L1 {pose['l1']:.4f}, SSIM {pose['ssim']:.3f} against the source.",
            "",
        ]
    lines += [
        *(f"- {note}" for note in result.get("notes", [])),
    ]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(
    result: dict[str, Any], json_path: str | os.PathLike[str] | None, md_path: str | os.PathLike[str] | None
) -> None:
    """Write the JSON (strict: no NaN/inf) and markdown reports, each atomically."""
    from dagan.checkpoint import atomic_write

    if json_path is not None:
        text = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"
        atomic_write(json_path, lambda p: Path(p).write_text(text))
    if md_path is not None:
        table = markdown_table(result)
        atomic_write(md_path, lambda p: Path(p).write_text(table))
