"""Portraits -> identities -> clips on disk, in the training layout with ground truth beside the frames.

Layout (what ``training.data`` reads; it only looks at the PNG frames)::

    ROOT/synth.json                        identities, train/test split, held-out names, skip counts
    ROOT/train/<identity>-c<k>/000000.png  frames of clip k of a training identity
    ROOT/train/<identity>-c<k>/gt.npz      per-frame ground truth (see GT_FIELDS)
    ROOT/train/<identity>-c<k>/meta.json   identity, seeds, camera intrinsics, frame count, units
    ROOT/test/<identity>-c<k>/...          held-out identities only (never in train/)

A clip is a pure function of (seed, identity name, clip index): its random generator is seeded with
``SeedSequence([seed, crc32(name), clip])``, so adding portraits does not change the other clips.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError
from .mesh import MeshFitError, fit_head_mesh
from .motion import ExpressionRig, MotionConfig, sample_trajectory
from .render import render_head

__all__ = [
    "GENERATOR",
    "GT_FIELDS",
    "IMAGE_EXTENSIONS",
    "CollectReport",
    "Identity",
    "SynthError",
    "choose_test_identities",
    "collect_identities",
    "render_clip",
    "source_yaw",
    "write_dataset",
]

GENERATOR = "dagan synth"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_FACE_PX = 100.0
MAX_SOURCE_YAW = 60.0
GT_FIELDS = {
    "R": "(F, 3, 3) float64 head rotation: camera point = R @ head point + t",
    "t": "(F, 3) float64 head translation, mm",
    "K": "(3, 3) float64 camera intrinsics, pixels",
    "depth": "(F, H, W) float16 camera z of the face surface in mm, NaN off the face",
    "landmarks": "(F, 478, 2) float32 mediapipe landmarks in pixels (pixel (i, j) covers [j, j+1)×[i, i+1))",
    "landmarks3d": "(F, 478, 3) float32 camera-frame landmarks, mm",
    "visible": "(F, 478) bool landmark not occluded by the mesh",
    "mesh_head": "(478, 3) float32 neutral landmarks in the head frame, mm",
    "yaw": "(F,) float32 degrees; R = Rz(roll) Ry(yaw) Rx(pitch)",
    "pitch": "(F,) float32 degrees",
    "roll": "(F,) float32 degrees",
    "mouth": "(F,) float32 mouth opening in [0, 1]",
    "blink": "(F,) float32 eye closure in [0, 1]",
}


class SynthError(UserError, ValueError):
    """Bad input for ``dagan synth`` (missing portraits, no usable face, unknown test identity, ...)."""


@dataclass
class Identity:
    """A face to animate: its square crop (the texture) and where it came from."""

    name: str
    texture: np.ndarray
    source: str
    box: dict[str, float] | None = None
    landmarks: np.ndarray | None = None


@dataclass
class CollectReport:
    identities: list[Identity] = field(default_factory=list)
    images: int = 0
    skipped_small: int = 0  # faces smaller than min_face
    skipped_no_face: list[str] = field(default_factory=list)  # images without any detected face
    skipped_no_mesh: int = 0  # detected faces where the 478-point mesh could not be fitted
    skipped_turned: int = 0  # near-profile faces (see source_yaw)
    unreadable: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "images": self.images,
            "identities": len(self.identities),
            "skipped_small_faces": self.skipped_small,
            "skipped_images_without_face": len(self.skipped_no_face),
            "images_without_face": self.skipped_no_face,
            "skipped_no_mesh": self.skipped_no_mesh,
            "skipped_turned_faces": self.skipped_turned,
            "unreadable": self.unreadable,
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "face"


def _image_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise SynthError(f"portrait folder or image not found: {path}")
    return files


def source_yaw(landmarks: np.ndarray) -> float:
    """Rough yaw (degrees) of a fitted face from where the nose tip sits between the two sides of the face
    oval, after undoing the roll of the eye line. mediapipe's z flattens turned faces too much to be used
    for this; the 2D ratio overestimates moderate turns but tells a near-profile face (the far half of the
    face unseen, so turning it towards the camera smears it) from a usable one."""
    lm = np.asarray(landmarks, dtype=np.float64)[:, :2]
    eye = lm[263] - lm[33]
    a = -math.atan2(eye[1], eye[0])
    x = lm @ np.array([math.cos(a), -math.sin(a)])
    ratio = (x[1] - x[234]) / max(x[454] - x[234], 1e-6)
    return math.degrees(math.asin(float(np.clip(2 * ratio - 1, -1, 1))))


def collect_identities(
    portraits: Sequence[str | Path] = (),
    builtin: bool = False,
    size: int = 256,
    min_face: float = MIN_FACE_PX,
    progress: bool = False,
    max_yaw: float = MAX_SOURCE_YAW,
) -> CollectReport:
    """Every usable face becomes an identity, cropped VoxCeleb-style to size×size.

    Group photos give one identity per face (named ``<image stem>-<k>``, k counting faces left to right);
    faces whose detector box is narrower than ``min_face`` pixels, and near-profile faces
    (|:func:`source_yaw`| > ``max_yaw``), are skipped and counted.
    """
    from tqdm import tqdm

    from ..face import FaceDetector, face_landmarks, square_box
    from ..media import MediaError, load_image
    from ..samples import astronaut, grace_hopper

    report = CollectReport()
    sources: list[tuple[str, str, object]] = []
    if builtin:
        sources += [
            ("astronaut", "dagan.samples.astronaut", astronaut),
            ("grace_hopper", "dagan.samples.grace_hopper", grace_hopper),
        ]
    for f in _image_files(portraits):
        sources.append((_slug(f.stem), str(f), f))
    taken: set[str] = set()
    with FaceDetector() as detector:
        for stem, origin, src in tqdm(sources, desc="portraits", unit="img", disable=not progress):
            try:
                image = src() if callable(src) else load_image(src)
            except (MediaError, OSError, ValueError) as exc:
                report.unreadable.append(f"{origin}: {exc}")
                continue
            report.images += 1
            faces = detector.detect(image)
            if not faces:
                report.skipped_no_face.append(origin)
                continue
            faces = sorted(faces, key=lambda d: d.center[0])
            for k, det in enumerate(faces):
                if max(det.width, det.height) < min_face:
                    report.skipped_small += 1
                    continue
                box = square_box(det, image.shape)
                crop = box.crop(image, size)
                landmarks = face_landmarks(crop)
                if landmarks is None:
                    report.skipped_no_mesh += 1
                    continue
                if abs(source_yaw(landmarks)) > max_yaw:
                    report.skipped_turned += 1
                    continue
                name = stem if len(faces) == 1 else f"{stem}-{k}"
                base, n = name, 2
                while name in taken:
                    name, n = f"{base}_{n}", n + 1
                taken.add(name)
                report.identities.append(Identity(name, crop, origin, box.to_dict(), landmarks))
    return report


def choose_test_identities(names: Sequence[str], spec: str | int | None, seed: int) -> list[str]:
    """Held-out identities: a comma-separated list of names, a count N (picked by ``seed``), or by default
    about 15% of the identities (at least one when there are two or more)."""
    names = list(names)
    if spec is None or spec == "":
        count = 0 if len(names) < 2 else max(1, round(0.15 * len(names)))
    elif isinstance(spec, int) or str(spec).strip().isdigit():
        count = int(spec)
    else:
        wanted = [s.strip() for s in str(spec).split(",") if s.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SynthError(f"unknown test identities {unknown}; identities are: {', '.join(names)}")
        return sorted(set(wanted))
    if count >= len(names) and names:
        raise SynthError(f"--test-identities {count} leaves no training identity (there are {len(names)})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
    return sorted(rng.choice(sorted(names), size=count, replace=False).tolist()) if count else []


def clip_rng(seed: int, name: str, clip: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode()), clip]))


def render_clip(
    mesh_and_rig: tuple, num_frames: int, rng: np.random.Generator, cfg: MotionConfig, on_frame=None
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Render one clip: (frames as uint8 RGB, ground-truth arrays keyed as in :data:`GT_FIELDS`)."""
    mesh, rig = mesh_and_rig
    traj = sample_trajectory(num_frames, rng, cfg)
    frames, gt = [], {k: [] for k in ("R", "t", "depth", "landmarks", "landmarks3d", "visible")}
    for i in range(num_frames):
        f = render_head(
            mesh,
            rig,
            traj.rotation(i),
            shift=tuple(traj.shift[i]),
            scale=float(traj.scale[i]),
            mouth=float(traj.mouth[i]),
            blink=float(traj.blink[i]),
            gain=traj.gain[i],
            light_dir=traj.light_dir[i],
            light=float(traj.light[i]),
        )
        frames.append(f.image)
        gt["R"].append(f.rotation)
        gt["t"].append(f.translation)
        gt["depth"].append(f.depth.astype(np.float16))
        gt["landmarks"].append(f.landmarks)
        gt["landmarks3d"].append(f.landmarks3d)
        gt["visible"].append(f.visible)
        if on_frame is not None:
            on_frame()
    out = {k: np.stack(v) for k, v in gt.items()}
    out["K"] = mesh.camera.K
    out["mesh_head"] = ((mesh.rest[:478] - mesh.pivot) * mesh.mm_per_unit).astype(np.float32)
    for k in ("yaw", "pitch", "roll", "mouth", "blink"):
        out[k] = np.asarray(getattr(traj, k), dtype=np.float32)
    return frames, out


def _is_synth_video(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError):
        return False


def write_dataset(
    root: str | Path,
    report: CollectReport,
    test_identities: str | int | None = None,
    clips_per_identity: int = 4,
    frames: int = 64,
    seed: int = 0,
    motion: MotionConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Render every identity's clips into ``root`` (layout in the module docstring); returns the summary
    that is also written to ROOT/synth.json."""
    from tqdm import tqdm

    if clips_per_identity < 1 or frames < 1:
        raise SynthError("--clips-per-identity and --frames must be at least 1")
    if not report.identities:
        raise SynthError("no usable face found in the portraits (see the skip counts above)")
    root = Path(root)
    cfg = motion or MotionConfig()
    names = [idt.name for idt in report.identities]
    held_out = choose_test_identities(names, test_identities, seed)
    for split in ("train", "test"):
        d = root / split
        if d.is_dir() and any(d.iterdir()):
            if not overwrite:
                raise SynthError(
                    f"{d} is not empty; use --overwrite to replace the clips written by dagan synth"
                )
            for v in d.iterdir():
                if v.is_dir() and _is_synth_video(v):
                    shutil.rmtree(v)

    meshes = []
    for idt in report.identities:
        try:
            mesh = fit_head_mesh(idt.texture, idt.landmarks, name=idt.name)
        except MeshFitError:
            report.skipped_no_mesh += 1
            continue
        meshes.append((idt, mesh, ExpressionRig(mesh)))
    if not meshes:
        raise SynthError("no face mesh could be fitted to any portrait")

    start = time.perf_counter()
    total = len(meshes) * clips_per_identity * frames
    videos: dict[str, list[str]] = {"train": [], "test": []}
    with tqdm(total=total, desc="synth", unit="frame", disable=not progress) as bar:
        for idt, mesh, rig in meshes:
            split = "test" if idt.name in held_out else "train"
            for clip in range(clips_per_identity):
                video = f"{idt.name}-c{clip}"
                out = root / split / video
                out.mkdir(parents=True, exist_ok=True)
                imgs, gt = render_clip((mesh, rig), frames, clip_rng(seed, idt.name, clip), cfg, bar.update)
                for i, img in enumerate(imgs):
                    cv2.imwrite(str(out / f"{i:06d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                np.savez_compressed(out / "gt.npz", **gt)
                meta = {
                    "generator": GENERATOR,
                    "identity": idt.name,
                    "source": idt.source,
                    "face_box": idt.box,
                    "split": split,
                    "seed": seed,
                    "clip": clip,
                    "frames": frames,
                    "fps": cfg.fps,
                    "size": mesh.camera.size,
                    "camera": {"K": mesh.camera.K.tolist(), "focal_px": mesh.camera.focal},
                    "units": "mm (scaled so the pupils are 63 mm apart)",
                    "motion": cfg.to_dict(),
                    "mesh": {
                        "vertices": mesh.num_vertices,
                        "triangles": len(mesh.triangles),
                        "triangulation": "mediapipe FACEMESH_TESSELATION 3-cliques + eye/mouth fans + rings",
                    },
                    "gt_fields": GT_FIELDS,
                }
                (out / "meta.json").write_text(json.dumps(meta, indent=1))
                videos[split].append(video)
    elapsed = time.perf_counter() - start
    summary = {
        "generator": GENERATOR,
        "seed": seed,
        "frames_per_clip": frames,
        "clips_per_identity": clips_per_identity,
        "size": meshes[0][1].camera.size,
        "train_identities": sorted(i.name for i, _, _ in meshes if i.name not in held_out),
        "test_identities": held_out,
        "videos": videos,
        "frames_written": total,
        "seconds": round(elapsed, 2),
        "frames_per_second": round(total / elapsed, 1) if elapsed > 0 else math.inf,
        **report.summary(),
    }
    (root / "synth.json").write_text(json.dumps(summary, indent=1))
    return summary
