"""Small helpers every layer shares, so each exists once: cache keys, image↔tensor conversion (one
rounding) and device resolution.

- Cache keys: :func:`file_sha256` (a file's content hash) and :func:`cache_key` (a folder name derived
  from everything that makes a cached artefact valid). The ONNX export cache, the TensorRT engine cache
  and the Docker entrypoint's engine folders all use them.
- Images: :func:`images_to_tensor` (uint8 H×W×3 → float B×3×S×S on a device, one batched upload through
  pinned memory on CUDA), :func:`tensor_to_uint8` / :func:`tensor_to_images` (float [0, 1] → uint8,
  rounded half up on the device) and :func:`depth_to_images`. The engine and the evaluation use the same
  functions, so a metric measures exactly the pixels the engine serves.
- :func:`resolve_device`: ``auto`` / ``cpu`` / ``cuda[:N]`` → a :class:`torch.device`, with a clear
  error when CUDA is asked for and absent.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError


class DeviceError(UserError, RuntimeError):
    """A device that was asked for and is not usable here."""


# -- cache keys ----------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(*parts: str | int | float | bool | None, label: str | None = None) -> str:
    """A cache folder name that changes whenever any of ``parts`` does: the first 16 hex digits of the
    SHA-256 of their JSON list, prefixed by a filesystem-safe ``label`` (``"NVIDIA L4-trt10.7"`` →
    ``"NVIDIA_L4-trt10.7-<hash>"``) when one is given, so a person listing the cache sees what each
    folder is for. Pass what invalidates the artefact: the weights' :func:`file_sha256`, the GPU model,
    runtime versions, precision, batch profile."""
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:16]
    if label is None:
        return digest
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")
    return f"{slug}-{digest}" if slug else digest


# -- devices -------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when PyTorch sees a GPU, else the CPU; anything else as given, checked."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but PyTorch sees no CUDA GPU here")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from exc


# -- images <-> tensors --------------------------------------------------------------------------------
def check_image(image: np.ndarray, what: str, error: type[Exception] = UserError) -> np.ndarray:
    """Validate an H×W×3 uint8 image with a message a caller can show as is."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise error(f"{what} must be an H×W×3 RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise error(f"{what} must be uint8, got {image.dtype}")
    return image


class Uploader:
    """Batched host→device upload of uint8 images: one copy per batch, through a reused pinned buffer on
    CUDA (``non_blocking``, ordered on the current stream), a plain view on the CPU.

    The pinned buffer is reused across calls; before it is overwritten the previous copy out of it is
    waited for (a CUDA event), so a caller never races its own earlier upload.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._done: torch.cuda.Event | None = None

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """Same-shaped H×W×3 uint8 images → B×H×W×3 uint8 tensor on the device."""
        host = np.stack(images) if len(images) > 1 else images[0][None]
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(host))
        if self._pinned is None or self._pinned.numel() < host.size:
            self._pinned = torch.empty(host.size, dtype=torch.uint8).pin_memory()
            self._done = None
        if self._done is not None:
            self._done.synchronize()
        buf = self._pinned[: host.size].view(host.shape)
        buf.numpy()[...] = host
        out = buf.to(self.device, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(self.device))
        return out


def images_to_tensor(
    images: list[np.ndarray],
    what: str,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    uploader: Uploader | None = None,
    error: type[Exception] = UserError,
) -> torch.Tensor:
    """H×W×3 uint8 images → B×3×size×size in [0, 1] on ``device``: one batched upload (per shape when
    the sizes differ), then conversion and antialiased bilinear resizing on the device."""
    for img in images:
        check_image(img, what, error)
    upload = uploader or Uploader(device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.shape, []).append(i)
    parts: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
    for idx in groups.values():
        t = upload([np.ascontiguousarray(images[i]) for i in idx]).to(device)
        t = t.permute(0, 3, 1, 2).to(dtype) / 255.0
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        for j, i in enumerate(idx):
            parts[i] = t[j : j + 1]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def corner_axes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """A face part's frame from its two corners (x, y in pixels, either order): the image-left corner,
    the corner-to-corner width, and the unit vectors along the part (left to right) and across it
    (downwards in the image). The one definition the eyes' and the mouth's warps share."""
    if a[0] > b[0]:
        a, b = b, a
    width = max(float(np.linalg.norm(b - a)), 1e-6)
    axis = (b - a) / width
    normal = np.array([-axis[1], axis[0]])
    if normal[1] < 0:
        normal = -normal
    return a, width, axis, normal


def pixel_box(points: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The pixel rows and columns (y0, y1, x0, x1; end exclusive, inside a size×size frame) that hold
    ``points`` (N×2, x and y in pixels), with a pixel to spare: the region a local warp of the frame
    computes (:mod:`dagan.blink`, :mod:`dagan.mouth`)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    x0, y0 = max(int(lo[0]) - 1, 0), max(int(lo[1]) - 1, 0)
    x1, y1 = min(int(hi[0]) + 2, size), min(int(hi[1]) + 2, size)
    return y0, max(y1, y0), x0, max(x1, x0)


def sample_at(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``image`` (1×C×H×W, any float dtype) sampled in float32 at ``grid`` (1×h×w×2, grid_sample's
    [-1, 1] over the whole frame, align_corners=True; on any device): the region a local warp's grid
    covers (:mod:`dagan.blink`, :mod:`dagan.mouth`), bilinear, the frame's border repeated outside."""
    return F.grid_sample(
        image.float(), grid.to(image.device), mode="bilinear", padding_mode="border", align_corners=True
    )


def tensor_to_uint8(t: torch.Tensor) -> torch.Tensor:
    """B×3×H×W float in [0, 1] → B×H×W×3 uint8 on the same device: clamp, ×255, round half up.
    The one rounding every consumer of model outputs (engine, evaluation) uses."""
    return (t.float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


def tensor_to_images(t: torch.Tensor) -> list[np.ndarray]:
    """B×3×H×W in [0, 1] → H×W×3 uint8 arrays (rounded on the device, one download)."""
    return list(tensor_to_uint8(t).cpu().numpy())


def depth_to_images(depth: torch.Tensor) -> list[np.ndarray]:
    """B×1×H×W → per-image min–max normalised uint8 maps (near = bright), for display only."""
    d = depth.float().flatten(1)
    lo, hi = d.min(1, keepdim=True).values, d.max(1, keepdim=True).values
    d = ((d - lo) / (hi - lo).clamp_min(1e-6)).view_as(depth)
    return [img[..., 0] for img in tensor_to_images(d)]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child process we started: SIGTERM, then SIGKILL if it has not exited within ``timeout``
    seconds, and reap it either way (no zombie, no leaked server between tests or benchmark runs)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
