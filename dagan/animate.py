"""Offline animation: a source photo driven by a video, written as an mp4 (``dagan animate``).

Uses the same pieces as the live service: the shared face module crops the source and tracks the
driver's face, and the engine caches the source once and runs only the per-frame path. Like
:mod:`dagan.cli`, this is the application layer: it may import ``engine``; the core of ``dagan/`` may not.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .checkpoint import CheckpointError, checkpoint_metadata
from .errors import UserError
from .face import DrivingCropper, source_crop
from .media import MediaError, VideoReader, VideoWriter, load_image

DEFAULT_CHECKPOINT_ENV = "DAGAN_CHECKPOINT"
# The bundled default weights (see weights/ and its model card).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "dagan-default.safetensors"


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """The checkpoint to use: the argument, then $DAGAN_CHECKPOINT, then the bundled default weights."""
    if checkpoint:
        return Path(checkpoint)
    if os.environ.get(DEFAULT_CHECKPOINT_ENV):
        return Path(os.environ[DEFAULT_CHECKPOINT_ENV])
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    raise CheckpointError(
        f"no trained weights found (the bundled {DEFAULT_CHECKPOINT} is missing): pass --checkpoint PATH "
        f"(or set ${DEFAULT_CHECKPOINT_ENV}); `dagan init-checkpoint` writes an UNTRAINED one that only "
        "exercises the pipeline"
    )


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch's intra-op threads (None keeps torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def warn_if_untrained(path: Path) -> bool:
    """Say loudly when a checkpoint holds random weights, so nobody mistakes its output for a result."""
    if checkpoint_metadata(path).get("trained") == "false":
        print(
            f"warning: {path} holds UNTRAINED random weights: the video shows the pipeline running, "
            "not a real avatar",
            file=sys.stderr,
        )
        return True
    return False


def colorize_depth(depth_u8: np.ndarray) -> np.ndarray:
    """H×W uint8 depth visualisation → H×W×3 RGB with a perceptual colour map."""
    return cv2.cvtColor(cv2.applyColorMap(depth_u8, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def compose_row(panels: list[np.ndarray], panel_size: int) -> np.ndarray:
    """Side-by-side panels, each resized to panel_size² (nearest when enlarging small test models)."""
    out = []
    for p in panels:
        if p.ndim == 2:
            p = colorize_depth(p)
        if p.shape[0] != panel_size:
            interp = cv2.INTER_NEAREST if p.shape[0] < panel_size else cv2.INTER_AREA
            p = cv2.resize(p, (panel_size, panel_size), interpolation=interp)
        out.append(p)
    return np.concatenate(out, axis=1)


@dataclass
class AnimateReport:
    frames: int
    lost_face_frames: int
    out: Path
    fps: float


def animate_video(
    source: str | Path,
    driving: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    relative: bool = True,
    show_depth: bool = False,
    device: str = "auto",
    crop: bool = True,
    max_frames: int | None = None,
    progress: bool = True,
    adapt_scale: bool = True,
    threads: int | None = None,
) -> AnimateReport:
    """Animate ``source`` with ``driving`` into ``out``; raises MediaError / NoFaceError / CheckpointError.

    Motion is relative by default (every command's default: ``dagan animate``, ``demo``, ``cam`` and
    ``serve``), with movement-scale adaptation unless ``adapt_scale`` is False. ``threads`` sets torch's
    intra-op thread count (on a loaded 2-core machine one thread was several times faster than the
    default, which oversubscribes the cores)."""
    from engine import create_engine

    set_threads(threads)

    source_image = load_image(source)
    ckpt = resolve_checkpoint(checkpoint)
    reader = VideoReader(driving)  # fails early on a missing or unreadable video
    with reader:
        engine = create_engine(ckpt, device=device)
        warn_if_untrained(ckpt)
        size = engine.image_size
        source_face = source_crop(source_image, size, crop)
        session = engine.set_source(source_face, relative=relative, adapt_scale=adapt_scale)
        panel = max(size, 256)
        cropper = DrivingCropper(size, crop)
        total = reader.frame_count if reader.frame_count and reader.frame_count > 0 else None
        if max_frames is not None and total is not None:
            total = min(total, max_frames)
        frames = lost = 0
        with VideoWriter(out, fps=reader.fps) as writer:
            bar = tqdm(total=total, unit="frame", desc="animate", disable=not progress, file=sys.stderr)
            for frame in reader:
                if max_frames is not None and frames >= max_frames:
                    break
                driving_crop = cropper(frame)
                lost += not cropper.face_found
                result = engine.animate(driving_crop, return_depth=show_depth)
                panels = [source_face, driving_crop, result.image]
                if show_depth and session.source_depth is not None and result.driving_depth is not None:
                    panels += [session.source_depth, result.driving_depth]
                writer.write(compose_row(panels, panel))
                frames += 1
                bar.update(1)
            bar.close()
            if frames == 0:
                raise MediaError(f"{driving} contains no frames")
    return AnimateReport(frames=frames, lost_face_frames=lost, out=Path(out), fps=reader.fps)
