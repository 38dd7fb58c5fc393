"""``dagan pack-data``: a compact, self-contained copy of a training set for a lent GPU machine.

A lent device gets only the working tree (64 MiB in all, the repository's own files included), has no
network and no mediapipe, and runs for minutes. So the copy it trains from must be small and must carry
everything the recipe reads besides the code: the train split's frames as JPEG (every N-th frame, N raised
until the whole copy fits ``--max-mb``), each clip's face-mesh tracks cut to the kept frames and to the
recipe's points (``landmarks478.npz``, read by :meth:`training.data.Video.landmarks` when no ``.npy`` is
there; the other points are NaN, which compresses to nothing), and face-api's landmark-68 weights, the
recipe's perceptual net, which otherwise live in a ``dagan fetch-eval-assets`` folder in $HOME.

Layout of OUT_DIR::

    pack.json                                   settings, chosen stride, counts (written first, then final)
    face_landmark_68_model-weights_manifest.json, face_landmark_68_model.bin   (when found)
    train/<clip>/00000.jpg 00001.jpg ...        kept frames, renumbered in order
    train/<clip>/landmarks478.npz               mesh (kept frames × 478 × 2, float16), points, source_frames

Deterministic: the same input and settings give byte-identical files (fixed zip timestamps, sorted
clips, no clock in the manifest). Resumable: a clip is written to a hidden folder and renamed into place;
a re-run with the same settings skips finished clips, with other settings into the same folder it stops.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dagan.errors import UserError
from dagan.media import MediaError, load_image

from .data import (
    FRAME_EXTENSIONS,
    LANDMARKS_FILE,
    LANDMARKS_PACKED,
    VIDEO_EXTENSIONS,
    _natural_key,
    read_mesh,
)

PACK_MANIFEST = "pack.json"
PACK_FORMAT = 1
FACE_ASSET_PREFIX = "face_landmark_68_model"  # face-api's landmark-68 net: manifest + weights shard
MESH_POINTS = 478
# Frames a clip must keep: the depth stage samples a target and a neighbour on each side.
MIN_KEPT_FRAMES = 3
# The size estimate comes from a few frames per clip; aim a little under the cap so the check after
# writing rarely has to raise the stride and start again.
ESTIMATE_MARGIN = 0.97
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class PackError(UserError, ValueError):
    """A dataset that cannot be packed: no train split or clips, too small a cap, a foreign OUT_DIR."""


def default_assets_dir() -> Path:
    """Where ``dagan fetch-eval-assets`` puts face-api's weights by default (``$DAGAN_EVAL_ASSETS`` wins)."""
    env = os.environ.get("DAGAN_EVAL_ASSETS")
    return Path(env) if env else Path.home() / ".cache" / "dagan" / "eval-assets"


def find_face_assets(folder: str | Path | None) -> list[Path]:
    """The ``face_landmark_68_model*`` files of an eval-assets folder (in it or its ``model/``), sorted."""
    if folder is None:
        return []
    folder = Path(folder)
    for candidate in (folder, folder / "model"):
        files = sorted(p for p in candidate.glob(f"{FACE_ASSET_PREFIX}*") if p.is_file())
        if any(p.name.endswith("-weights_manifest.json") for p in files):
            return files
    return []


@dataclass
class PackReport:
    """What ``pack_dataset`` did; ``stride`` is the one used (>= the one asked when the cap raised it)."""

    out_dir: Path
    clips: int = 0
    already_done: int = 0
    frames_in: int = 0
    frames_out: int = 0
    stride: int = 1
    bytes: int = 0
    without_tracks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Clip:
    name: str
    frames: list[Path]
    tracks: Path | None


def _clips(root: Path) -> tuple[list[_Clip], list[str]]:
    """Frame-folder clips of ROOT/train in training order, and the entries skipped (with why)."""
    folder = root / "train"
    if not folder.is_dir():
        raise PackError(f"{folder} does not exist: expected a prepared dataset DATA_ROOT/train/<clip>/")
    clips, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            skipped.append(f"{entry.name} (a video file: convert it with `dagan prepare`)")
            continue
        if not entry.is_dir():
            continue
        frames = sorted(
            (p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
            key=lambda p: _natural_key(p.name),
        )
        if len(frames) < MIN_KEPT_FRAMES:
            skipped.append(f"{entry.name} ({len(frames)} frames)")
            continue
        tracks = next((t for t in (entry / LANDMARKS_FILE, entry / LANDMARKS_PACKED) if t.is_file()), None)
        clips.append(_Clip(entry.name, frames, tracks))
    if not clips:
        raise PackError(f"{folder} has no clip folders with >= {MIN_KEPT_FRAMES} frames")
    return clips, skipped


def _jpeg(path: Path, quality: int) -> bytes:
    rgb = load_image(path)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MediaError(f"{path}: JPEG encoding failed")
    return buf.tobytes()


def _kept(n: int, stride: int) -> list[int]:
    return list(range(0, n, stride))


def _estimate(clips: Sequence[_Clip], quality: int, samples: int = 4) -> list[float]:
    """Mean JPEG bytes per frame of each clip, from ``samples`` evenly spaced frames."""
    out = []
    for clip in clips:
        n = len(clip.frames)
        idx = sorted({round(i) for i in np.linspace(0, n - 1, min(n, samples))})
        out.append(float(np.mean([len(_jpeg(clip.frames[i], quality)) for i in idx])))
    return out


def _tracks_bytes_guess(frames: int, points: int) -> int:
    # float16 x/y per kept point and frame, deflated a little; the NaN columns cost next to nothing.
    return 1024 + frames * (points * 4 + 16)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` with fixed zip timestamps, so the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def _packed_tracks(clip: _Clip, kept: list[int], points: Sequence[int]) -> tuple[bytes | None, str | None]:
    """The clip's ``landmarks478.npz`` bytes for the kept frames and points, or (None, why not)."""
    if clip.tracks is None:
        return None, "no landmark tracks"
    try:
        mesh, had = read_mesh(clip.tracks)
    except (OSError, ValueError, UserError) as exc:
        return None, f"unreadable tracks ({exc})"
    if mesh.ndim != 3 or mesh.shape[0] != len(clip.frames) or mesh.shape[1:] != (MESH_POINTS, 2):
        return None, f"tracks of shape {mesh.shape} for {len(clip.frames)} frames"
    if had is not None and not set(points) <= set(had.tolist()):
        return None, "packed tracks without the requested points"
    out = np.full((len(kept), MESH_POINTS, 2), np.nan, np.float16)
    cols = list(points)
    out[:, cols] = mesh[np.asarray(kept)][:, cols].astype(np.float16)
    return (
        _npz_bytes(
            {
                "mesh": out,
                "points": np.asarray(cols, np.int16),
                "source_frames": np.asarray(kept, np.int32),
            }
        ),
        None,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack_dataset(
    data_root: str | Path,
    out_dir: str | Path,
    *,
    stride: int = 1,
    quality: int = 90,
    max_mb: float = 36.0,
    points: Sequence[int] | None = None,
    assets: str | Path | None = None,
    progress: bool = True,
) -> PackReport:
    """Pack ``data_root``'s train split into ``out_dir`` (see the module docstring); returns a report.

    ``stride``: keep every N-th frame, raised (with a note) until the estimate, and then the written
    total, fits ``max_mb`` MiB (JPEG frames + tracks + face assets + manifest). ``points``: the face-mesh
    points whose tracks are kept (default: the training config's ``dagan.kp_landmark_points``,
    ``EXPRESSION_MESH_POINTS``, the points a recipe's ``dagan.flow_points`` reads, and the head pose's
    ``dagan.head_pose.POSE_POINTS``, which ``dagan.reshape_nod`` reads).
    ``assets``: a folder holding ``face_landmark_68_model*`` (default: :func:`default_assets_dir`);
    missing assets are a note, not an error, since a run may not use the face perceptual loss.
    """
    from tqdm import tqdm

    from dagan.head_pose import POSE_POINTS

    from .config import EXPRESSION_MESH_POINTS, DaganStageConfig

    root, out = Path(data_root), Path(out_dir)
    if stride < 1:
        raise PackError("--frame-stride must be >= 1")
    if not 1 <= quality <= 100:
        raise PackError("--quality must be in 1..100")
    if max_mb <= 0:
        raise PackError("--max-mb must be > 0")
    default = (*DaganStageConfig().kp_landmark_points, *EXPRESSION_MESH_POINTS, *POSE_POINTS)
    pts = sorted({int(p) for p in (points if points is not None else default)})
    if not pts or not all(0 <= p < MESH_POINTS for p in pts):
        raise PackError(f"--points must be face-mesh indices 0..{MESH_POINTS - 1}")
    clips, skipped = _clips(root)
    assets_dir = Path(assets) if assets is not None else default_assets_dir()
    asset_files = find_face_assets(assets_dir)
    cap = int(max_mb * 1024 * 1024)
    request = {
        "source": str(root.resolve()),
        "frame_stride": stride,
        "quality": quality,
        "max_mb": max_mb,
        "points": pts,
        "clips": [c.name for c in clips],
    }
    report = PackReport(out, skipped=skipped)
    manifest_path = out / PACK_MANIFEST

    chosen: int | None = None
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackError(f"{manifest_path} is unreadable ({exc}): remove {out} and pack again") from exc
        if old.get("format") != PACK_FORMAT or old.get("request") != request:
            raise PackError(
                f"{out} holds a pack made with other settings or from another dataset: remove it, or "
                "choose another OUT_DIR"
            )
        chosen = int(old["stride"])
    elif out.exists() and any(out.iterdir()):
        raise PackError(f"{out} exists and is not a `dagan pack-data` folder: choose an empty or new OUT_DIR")

    fixed = sum(p.stat().st_size for p in asset_files) + 4096  # assets + manifest
    if chosen is None:
        per_frame = _estimate(clips, quality)
        longest = max(len(c.frames) for c in clips)
        s = stride
        while True:
            est = fixed + sum(
                math.ceil(len(c.frames) / s) * b + _tracks_bytes_guess(math.ceil(len(c.frames) / s), len(pts))
                for c, b in zip(clips, per_frame, strict=True)
            )
            if est <= cap * ESTIMATE_MARGIN:
                break
            if math.ceil(longest / (s + 1)) < MIN_KEPT_FRAMES:
                raise PackError(
                    f"the train split does not fit in {max_mb:g} MB even at frame stride {s} (about "
                    f"{est / 2**20:.1f} MB): raise --max-mb or lower --quality"
                )
            s += 1
        if s != stride:
            report.notes.append(
                f"frame stride raised from {stride} to {s} to fit {max_mb:g} MB "
                f"(estimated {est / 2**20:.1f} MB)"
            )
        chosen = s

    while True:
        report.stride = chosen
        _write_manifest(manifest_path, request, chosen, None)
        done = _write_clips(out, clips, chosen, quality, pts, cap - fixed, report, progress, tqdm)
        if done:
            break
        # The estimate was short: start again one stride coarser (rare; deterministic all the same).
        report.notes.append(f"the pack passed {max_mb:g} MB at frame stride {chosen}: trying {chosen + 1}")
        shutil.rmtree(out / "train", ignore_errors=True)
        report.already_done = report.clips = report.frames_in = report.frames_out = 0
        report.without_tracks = []
        chosen += 1
        if math.ceil(max(len(c.frames) for c in clips) / chosen) < MIN_KEPT_FRAMES:
            raise PackError(
                f"the train split does not fit in {max_mb:g} MB: raise --max-mb or lower --quality"
            )

    short = [c.name for c in clips if len(_kept(len(c.frames), chosen)) < MIN_KEPT_FRAMES]
    if short:
        report.notes.append(
            f"{len(short)} clips keep fewer than {MIN_KEPT_FRAMES} frames at stride {chosen}, too few for "
            f"the depth stage (it skips them): {', '.join(short[:5])}"
        )
    for f in asset_files:
        target = out / f.name
        if not target.is_file() or target.stat().st_size != f.stat().st_size:
            _write_atomic(target, f.read_bytes())
        report.assets.append(f.name)
    if not asset_files:
        report.notes.append(
            f"no {FACE_ASSET_PREFIX}* files in {assets_dir} (or its model/): the pack has no face-api "
            "landmark weights (run `dagan fetch-eval-assets` and pack again, or pass --assets DIR)"
        )
    summary = {
        "clips": report.clips,
        "frames_in": report.frames_in,
        "frames_out": report.frames_out,
        "without_tracks": report.without_tracks,
        "skipped": report.skipped,
        "face_landmark_weights": bool(asset_files),
    }
    _write_manifest(manifest_path, request, chosen, summary)
    report.bytes = _dir_bytes(out)
    return report


def _write_manifest(path: Path, request: dict, stride: int, summary: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": PACK_FORMAT, "request": request, "stride": stride, "complete": summary is not None}
    if summary is not None:
        data.update(summary)
    _write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def _write_clips(
    out: Path,
    clips: Sequence[_Clip],
    stride: int,
    quality: int,
    points: Sequence[int],
    budget: int,
    report: PackReport,
    progress: bool,
    tqdm,
) -> bool:
    """Write every clip not yet there; False as soon as the total passes ``budget`` bytes."""
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    total = 0
    bar = tqdm(clips, unit="clip", desc=f"pack (stride {stride})", disable=not progress)
    try:
        for clip in bar:
            target = train / clip.name
            kept = _kept(len(clip.frames), stride)
            report.frames_in += len(clip.frames)
            if target.is_dir():  # finished by an earlier run with the same settings
                total += _dir_bytes(target)
                report.already_done += 1
                report.clips += 1
                report.frames_out += len(kept)
                if not (target / LANDMARKS_PACKED).is_file():
                    report.without_tracks.append(f"{clip.name} (packed earlier without tracks)")
                if total > budget:
                    return False
                continue
            tmp = train / f".{clip.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for k, i in enumerate(kept):
                data = _jpeg(clip.frames[i], quality)
                (tmp / f"{k:05d}.jpg").write_bytes(data)
                total += len(data)
            tracks, why = _packed_tracks(clip, kept, points)
            if tracks is None:
                report.without_tracks.append(f"{clip.name} ({why})")
            else:
                (tmp / LANDMARKS_PACKED).write_bytes(tracks)
                total += len(tracks)
            if total > budget:
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            os.replace(tmp, target)
            report.clips += 1
            report.frames_out += len(kept)
    finally:
        bar.close()
    return True


def print_report(report: PackReport) -> None:
    """The one-paragraph summary ``dagan pack-data`` prints (notes and warnings to stderr)."""
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.skipped:
        skipped = "; ".join(report.skipped[:5])
        print(f"warning: skipped {len(report.skipped)} entries: {skipped}", file=sys.stderr)
    if report.without_tracks:
        print(
            f"warning: {len(report.without_tracks)} clips have no usable landmark tracks (the keypoint prior "
            "skips them): " + ", ".join(report.without_tracks[:5]),
            file=sys.stderr,
        )
    print(
        f"packed {report.clips} clips ({report.already_done} already done), {report.frames_out} of "
        f"{report.frames_in} frames (stride {report.stride}), {len(report.assets)} face-api files, "
        f"{report.bytes / 2**20:.1f} MB in {report.out_dir}"
    )


# Face-mesh points the smoke clips place on their drawn features (the default keypoint anchors).
_SMOKE_FEATURES = {
    159: (-0.35, -0.25),  # upper / lower lid, left eye
    145: (-0.35, -0.15),
    386: (0.35, -0.25),  # upper / lower lid, right eye
    374: (0.35, -0.15),
    1: (0.0, 0.1),  # nose tip
    61: (-0.3, 0.45),  # mouth corners
    291: (0.3, 0.45),
    13: (0.0, 0.4),  # inner upper / lower lip
    14: (0.0, 0.5),
    152: (0.0, 0.95),  # chin
    234: (-0.9, 0.1),  # cheeks at the jaw
    454: (0.9, 0.1),
    105: (-0.4, -0.5),  # brows
    334: (0.4, -0.5),
    10: (0.0, -0.9),  # forehead
}


def write_smoke_dataset(root: str | Path, clips: int = 2, frames: int = 16, size: int = 128) -> Path:
    """A tiny dataset of drawn faces (moving head, blinking eyes, opening mouth) with mesh tracks.

    For the CPU smoke mode of ``scripts/gpu_train.sh`` and its test: that mode must run where neither
    mediapipe nor any face photo is at hand (a bare device machine, CI), yet go through the same path
    as the real run — prepared layout, ``dagan pack-data``, the landmark prior. Deterministic. 16 frames:
    packed at stride 2, a clip must still hold the recipe's depth neighbours (±6 frames → ±3 of the pack).
    """
    root = Path(root)
    rng = np.random.default_rng(0)
    template = rng.uniform(-0.8, 0.8, (MESH_POINTS, 2))  # points not drawn: somewhere on the face
    for p, xy in _SMOKE_FEATURES.items():
        template[p] = xy
    for c in range(clips):
        clip = root / "train" / f"smoke{c}"
        clip.mkdir(parents=True, exist_ok=True)
        mesh = np.zeros((frames, MESH_POINTS, 2), np.float16)
        for f in range(frames):
            t = 2 * math.pi * f / frames
            cx, cy = size * (0.5 + 0.06 * math.sin(t + c)), size * (0.5 + 0.04 * math.cos(t))
            rx, ry = size * 0.28, size * 0.36
            mouth, lid = 0.5 + 0.5 * math.sin(2 * t), 1.0 if f % 5 else 0.15
            img = np.full((size, size, 3), (60 + 40 * c, 90, 120), np.uint8)
            cv2.ellipse(img, (int(cx), int(cy)), (int(rx), int(ry)), 0, 0, 360, (150, 180, 225), -1)
            for ex in (-0.35, 0.35):
                e = (int(cx + ex * rx), int(cy - 0.2 * ry))
                cv2.ellipse(
                    img, e, (int(0.12 * rx), max(1, int(0.06 * ry * lid))), 0, 0, 360, (40, 30, 30), -1
                )
            m = (int(cx), int(cy + 0.45 * ry))
            cv2.ellipse(img, m, (int(0.3 * rx), max(1, int(0.1 * ry * mouth))), 0, 0, 360, (40, 40, 140), -1)
            cv2.imwrite(str(clip / f"{f:05d}.png"), img)
            pts = template.copy()
            pts[[159, 386], 1] = -0.2 - 0.05 * lid
            pts[[145, 374], 1] = -0.2 + 0.05 * lid
            pts[13, 1], pts[14, 1] = 0.45 - 0.1 * mouth, 0.45 + 0.1 * mouth
            mesh[f, :, 0] = cx + pts[:, 0] * rx
            mesh[f, :, 1] = cy + pts[:, 1] * ry
        np.save(clip / LANDMARKS_FILE, mesh)
    return root
