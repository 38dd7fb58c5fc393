"""Offline animation: a source photo driven by a video, written as an mp4 (``dagan animate``).

Uses the same pieces as the live service: the shared face module crops the source and tracks the
driver's face, and the engine caches the source once and runs only the per-frame path. An application
(:mod:`commands`): it uses the library layers ``dagan``, ``export`` and ``engine``, and nothing imports it
but the ``dagan`` dispatcher (:mod:`commands.cli`).

Two outputs: the comparison row ``source | driving | result`` (the default), or with ``full_picture``
the avatar pasted back into the whole photo (:mod:`dagan.paste`), at the photo's resolution or fitted to
``output_size``. Motion is steadied by the One-Euro filters on the crop box and the keypoints
(:mod:`dagan.smoothing`), as in ``dagan cam`` and ``dagan serve``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dagan.checkpoint import resolve_checkpoint, warn_if_untrained
from dagan.errors import UserError
from dagan.face import DrivingCropper, locate_source, prepare_source
from dagan.media import MediaError, VideoReader, VideoWriter, colorize_depth, load_image
from dagan.paste import plan_paste
from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter, OneEuroParams
from engine.base import check_mouth_gain
from engine.paste import Paster, animate_pictures
from engine.select import cpu_cores, default_engine


def set_threads(threads: int | None) -> None:
    """``--threads N``: torch's intra-op threads (None keeps torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


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
    full_picture: bool = False,
    output_size: tuple[int, int] | None = None,
    mask: str = "ellipse",
    smoothing: OneEuroParams | None = DEFAULT_PARAMS,
    auto_neutral: float = 0.0,
    backend: str = "auto",
    precision: str | None = None,
    mouth_gain: float | None = None,
) -> AnimateReport:
    """Animate ``source`` with ``driving`` into ``out``; raises MediaError / NoFaceError / CheckpointError.

    Motion is relative by default (every command's default: ``dagan animate``, ``demo``, ``cam`` and
    ``serve``), with movement-scale adaptation unless ``adapt_scale`` is False. ``threads`` sets torch's
    intra-op thread count (on a loaded 2-core machine one thread was several times faster than the
    default, which oversubscribes the cores).

    ``full_picture`` (implied by ``output_size``, width × height): write the avatar pasted back into the
    photo with the ``mask`` (:data:`dagan.paste.MASKS`) instead of the comparison row; with
    ``show_depth`` the driving depth is appended at the picture's height. ``smoothing``: the One-Euro
    parameters of the crop-box and keypoint filters (None: unfiltered). ``auto_neutral`` > 0: choose the
    reference pose automatically over that many seconds of the video (relative motion only).
    ``mouth_gain``: how far the avatar's lips open, times the driver's
    (:attr:`engine.base.Session.mouth_gain`; None: the model's own)."""
    set_threads(threads)
    full_picture = full_picture or output_size is not None
    if full_picture and not crop:
        raise UserError("the full picture needs the face found in the photo: drop --no-crop")

    source_image = load_image(source)
    ckpt = resolve_checkpoint(checkpoint)
    reader = VideoReader(driving)  # fails early on a missing or unreadable video
    with reader:
        # on a CPU the fastest engine that holds quality, prepared on first use (engine.select); offline,
        # inference may use every core (decode, tracking and encode run between frames, not beside them)
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else False
        engine, choice = default_engine(
            ckpt, backend, device, precision, threads=threads or cpu_cores(), progress=say, measure=False
        )
        if progress:
            print(f"engine: {choice.describe()}", file=sys.stderr)
        warn_if_untrained(ckpt)
        size = engine.image_size
        paster = None
        if full_picture:
            face = locate_source(source_image)
            source_face = face.crop_box.crop(source_image, size)
            plan = plan_paste(source_image, face, source_face, output_size, mask)
            paster = Paster(plan, getattr(engine, "device", "cpu"))
        else:
            source_face = prepare_source(source_image, size, crop)
        session = engine.set_source(source_face, relative=relative, adapt_scale=adapt_scale)
        session.mouth_gain = check_mouth_gain(mouth_gain, bool(engine.mouth_keypoints))
        if smoothing is not None:
            session.kp_filter = OneEuroFilter(smoothing, rate=reader.fps)
        if auto_neutral > 0 and relative:
            session.choose_neutral_automatically(auto_neutral)
        panel = max(size, 256)
        cropper = DrivingCropper(size, crop, box_filter=smoothing)
        total = reader.frame_count if reader.frame_count and reader.frame_count > 0 else None
        if max_frames is not None and total is not None:
            total = min(total, max_frames)
        frames = lost = 0
        with VideoWriter(out, fps=reader.fps) as writer:
            bar = tqdm(total=total, unit="frame", desc="animate", disable=not progress, file=sys.stderr)
            for frame in reader:
                if max_frames is not None and frames >= max_frames:
                    break
                t = frames / reader.fps  # the video's clock, whatever the speed of this machine
                driving_crop = cropper(frame, t)
                lost += not cropper.face_found
                session.frame_time = t
                result = animate_pictures(engine, [session], [driving_crop], [paster], show_depth)[0]
                if paster is not None:
                    picture = result.picture if result.picture is not None else paster(result.image)
                    if show_depth and result.driving_depth is not None:
                        depth = compose_row([result.driving_depth], picture.shape[0])
                        picture = np.concatenate([picture, depth], axis=1)
                    writer.write(picture)
                else:
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
