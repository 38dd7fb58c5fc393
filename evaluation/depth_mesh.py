"""Depth of real faces against a reference no depth net trained on: mediapipe's face-mesh z.

Real talking-head video has no depth ground truth. mediapipe's 478-point face mesh (the project's face
module) comes with a relative depth z per landmark, from a model trained elsewhere; nothing here learns
from it. Sampled at the landmarks of a real frame, a depth map that sees the face's shape orders those
points as z does (nose tip nearest, cheeks and jaw further back), so the per-frame Spearman rank
correlation between predicted depth and z measures it, scale-free as self-supervised depth must be.

A blob in the middle of the face would already order points roughly right, so the report carries that
baseline beside the nets: depth = distance of each landmark from the face's centre in the image. A
depth net earns its place only where it beats the blob.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dagan.errors import UserError
from dagan.media import FRAME_EXTENSIONS, load_image
from dagan.nets.depth import disp_to_depth

from .depth_gt import load_depth_net


def _clip_frames(root: Path) -> list[list[Path]]:
    """Frame lists of every clip folder under ``root`` (a folder of frames itself, or of clip folders)."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    clips = []
    for folder in folders:
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
        if frames:
            clips.append(frames)
    return clips


def _sample(depth: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of an H×W map at pixel coordinates xy (N×2, mediapipe's pixel convention)."""
    h, w = depth.shape
    x = np.clip(xy[:, 0] - 0.5, 0, w - 1.001)
    y = np.clip(xy[:, 1] - 0.5, 0, h - 1.001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    top = depth[y0, x0] * (1 - fx) + depth[y0, x0 + 1] * fx
    bottom = depth[y0 + 1, x0] * (1 - fx) + depth[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def mesh_reference(root: str | Path, frame_stride: int = 8, max_frames_per_clip: int = 20) -> list[dict]:
    """Mesh landmarks (x, y, z) of every ``frame_stride``-th frame of each clip under ``root``.

    Computed once and shared by every checkpoint compared (mediapipe is the slow part)."""
    from dagan.face import face_landmarks

    root = Path(root)
    clips = _clip_frames(root) if root.is_dir() else []
    if not clips:
        raise UserError(f"no frames under {root} (expected a prepared dataset split such as ROOT/test)")
    out = []
    for frames in clips:
        for path in frames[::frame_stride][:max_frames_per_clip]:
            image = load_image(path)
            marks = face_landmarks(image)
            if marks is not None:
                out.append({"path": path, "image": image, "mesh": marks})
    if not out:
        raise UserError(f"mediapipe found no face in the frames under {root}")
    return out


def spearman_to_mesh(
    reference: Sequence[dict], checkpoint: str | Path | None, image_size: int | None = None
) -> list[float]:
    """Per-frame Spearman ρ between predicted depth at the 478 landmarks and mediapipe's z.

    ``checkpoint`` None gives the centre-distance baseline. Frames are resized to the net's size."""
    import cv2

    net = None
    if checkpoint is not None:
        net, min_depth, max_depth = load_depth_net(checkpoint)
    rhos = []
    for item in reference:
        image, mesh = item["image"], item["mesh"]
        h, w = image.shape[:2]
        if net is None:
            centre = mesh[:, :2].mean(axis=0)
            pred = np.linalg.norm(mesh[:, :2] - centre, axis=1)
        else:
            size = image_size or h
            x = (
                cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                if (h, w) != (size,) * 2
                else image
            )
            t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255.0
            with torch.no_grad():
                _, depth = disp_to_depth(net(t), min_depth, max_depth)
            scale = np.array([size / w, size / h], np.float32)
            pred = _sample(depth[0, 0].numpy().astype(np.float64), mesh[:, :2] * scale)
        rhos.append(float(spearmanr(pred, mesh[:, 2]).statistic))
    return rhos


def evaluate_depth_mesh(
    checkpoints: dict[str, str | Path | None],
    root: str | Path,
    frame_stride: int = 8,
    max_frames_per_clip: int = 20,
    image_size: int | None = None,
) -> dict:
    """Median and mean per-frame ρ for each named checkpoint (None = the centre-distance baseline)."""
    reference = mesh_reference(root, frame_stride, max_frames_per_clip)
    rows = {}
    for name, ckpt in checkpoints.items():
        if ckpt is not None and image_size is None:
            from dagan.checkpoint import read_checkpoint

            size = read_checkpoint(ckpt)[0].image_size
        else:
            size = image_size
        rhos = np.array(spearman_to_mesh(reference, ckpt, size))
        rows[name] = {
            "median": float(np.nanmedian(rhos)),
            "mean": float(np.nanmean(rhos)),
            "p10": float(np.nanpercentile(rhos, 10)),
        }
    return {"frames": len(reference), "rows": rows}


def markdown_mesh(result: dict) -> str:
    lines = [
        "| depth | Spearman ρ vs mesh z, median ↑ | mean | 10th percentile |",
        "|---|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['median']:.3f} | {r['mean']:.3f} | {r['p10']:.3f} |")
    lines.append(f"\n{result['frames']} frames; ρ per frame over the 478 mesh landmarks.\n")
    return "\n".join(lines) + "\n"
