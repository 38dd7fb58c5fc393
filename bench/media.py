"""The driving video of the server benchmarks: a real face photo moved like a head in front of a webcam,
encoded once to VP8 packets that every benchmark client replays (so a client costs packetisation, not an
encoder, and leaves the server its CPU). The GIL measurement decodes the same kind of packets.
"""

from __future__ import annotations

import fractions
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .paths import REAL_FACES

FPS = 25
WIDTH, HEIGHT = 640, 480
#: Where :func:`face_photo` looks first unless told (``--photos``).
PHOTOS = REAL_FACES / "photos"


def face_photo(photos: str | Path = PHOTOS) -> np.ndarray:
    """A real face photo: the first readable ``*.jpg`` in ``photos``, else the bundled astronaut sample."""
    folder = Path(photos)
    for path in sorted(folder.glob("*.jpg")) if folder.is_dir() else []:
        image = cv2.imread(str(path))
        if image is not None:
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    from dagan.samples import astronaut

    return astronaut()


def moving_face_frames(
    photo: np.ndarray, n: int = 50, width: int = WIDTH, height: int = HEIGHT
) -> list[np.ndarray]:
    """``n`` frames (one loop) of the photo on a width×height canvas, shifted, turned and zoomed smoothly
    (a head moving about ±8 % of the frame, ±8°, ±6 % size; the loop closes without a jump)."""
    scale = 0.9 * height / photo.shape[0]
    frames = []
    for i in range(n):
        phase = 2 * math.pi * i / n
        dx, dy = 0.08 * width * math.sin(phase), 0.05 * height * math.sin(2 * phase)
        angle, zoom = 8.0 * math.sin(phase + 1.0), scale * (1.0 + 0.06 * math.cos(phase))
        m = cv2.getRotationMatrix2D((photo.shape[1] / 2, photo.shape[0] / 2), angle, zoom)
        m[0, 2] += width / 2 - photo.shape[1] / 2 + dx
        m[1, 2] += height / 2 - photo.shape[0] / 2 + dy
        frames.append(cv2.warpAffine(photo, m, (width, height), borderMode=cv2.BORDER_REFLECT))
    return frames


def vp8_packets(frames: list[np.ndarray], bitrate: int = 800_000, fps: int = FPS) -> list[Any]:
    """Encode RGB frames to VP8 packets (first a keyframe) with libvpx's realtime settings."""
    import av
    import av.video.frame

    from server.pipeline import rgb_to_video_frame

    h, w = frames[0].shape[:2]
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = w, h, "yuv420p"
    codec.bit_rate = bitrate
    codec.time_base = fractions.Fraction(1, fps)
    codec.gop_size = len(frames)
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    packets = []
    for i, rgb in enumerate(frames):
        vf = rgb_to_video_frame(rgb)
        vf.pts = i
        if i == 0:
            vf.pict_type = av.video.frame.PictureType.I
        packets += codec.encode(vf)
    packets += codec.encode(None)
    return packets


def encode_vp8(frames: list[np.ndarray], bitrate: int = 900_000, fps: int = FPS) -> list[bytes]:
    """One VP8 packet per frame, the first a keyframe and the loop a single GOP (so every loop restarts
    on a keyframe and a receiver can join at any loop)."""
    packets = vp8_packets(frames, bitrate=bitrate, fps=fps)
    if len(packets) != len(frames):
        raise RuntimeError(f"VP8 encoder gave {len(packets)} packets for {len(frames)} frames")
    return [bytes(p) for p in packets]
