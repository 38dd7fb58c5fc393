"""Paste-back on the engine's device: the per-frame half of :mod:`dagan.paste` in torch, fed with the
prediction before it leaves the device.

:func:`dagan.paste.paste` (OpenCV, CPU) and :class:`Paster` here share one :class:`~dagan.paste.PastePlan`
(framing, mask, resampling matrix, colour ring), so both produce the same picture (within a level of
rounding). On a GPU the torch version saves the download of the crop and the CPU blend: the framed photo
stays on the device, the avatar is resampled into it by ``grid_sample`` and the finished frame is
downloaded once. On the CPU OpenCV was measured faster than torch for the same work (docs/server.md,
"Paste-back"), so a :class:`Paster` on a CPU engine calls :func:`dagan.paste.paste`; that is also the path
of backends whose output is a numpy image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dagan.paste import MAX_COLOUR_OFFSET, PastePlan
from dagan.paste import paste as paste_cpu

from .base import Engine, FrameResult, Session, check_batch


class Paster:
    """Pastes one stream's avatar frames into its framed photo, on ``device`` or with OpenCV.

    ``on_device`` (default: True for a non-CPU device): keep the plan's tensors on the device and paste
    torch predictions there. Calling it with a numpy image always takes the OpenCV path.
    """

    def __init__(
        self, plan: PastePlan, device: torch.device | str = "cpu", on_device: bool | None = None
    ) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.on_device = self.device.type != "cpu" if on_device is None else bool(on_device)
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.plan.size

    def _prepare(self) -> dict[str, torch.Tensor]:
        """The plan as device tensors (once): background, mask over the ROI, the sampling grid of the
        ROI in the avatar, the colour ring and the source crop."""
        if self._tensors is None:
            p, dev = self.plan, self.device
            x0, y0, x1, y1 = p.roi
            m = p.matrix
            # grid_sample with align_corners=False: pixel index u ↔ normalised (2u + 1) / side − 1.
            xs = torch.arange(x1 - x0, dtype=torch.float64)
            ys = torch.arange(y1 - y0, dtype=torch.float64)
            gx = (2 * (m[0, 0] * xs + m[0, 2]) + 1) / p.avatar_side - 1
            gy = (2 * (m[1, 1] * ys + m[1, 2]) + 1) / p.avatar_side - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()
            self._tensors = {
                "background": torch.from_numpy(p.background).to(dev),
                "mask": torch.from_numpy(p.mask).to(dev)[..., None],
                "grid": grid.to(dev),
                "ring": torch.from_numpy(p.ring).to(dev),
                "source": torch.from_numpy(p.source_crop).to(dev).float(),
            }
        return self._tensors

    def paste_tensor(self, prediction: torch.Tensor) -> torch.Tensor:
        """A 3×n×n prediction in (0, 1) on the device → the H×W×3 uint8 frame, on the device."""
        t = self._prepare()
        p = self.plan
        x0, y0, x1, y1 = p.roi
        avatar = (prediction.float().clamp(0, 1) * 255).round().permute(1, 2, 0)  # n×n×3, as uint8 levels
        w = t["ring"]
        total = w.sum()
        diff = t["source"] - avatar
        offset = ((diff * w[..., None]).sum(dim=(0, 1)) / total.clamp_min(1e-6)).clamp(
            -MAX_COLOUR_OFFSET, MAX_COLOUR_OFFSET
        )
        a = (avatar + offset).clamp(0, 255).permute(2, 0, 1)[None]  # 1×3×n×n
        if p.avatar_side != p.model_side:
            a = F.interpolate(a, size=(p.avatar_side, p.avatar_side), mode="area")
        warped = F.grid_sample(a, t["grid"], mode="bilinear", padding_mode="border", align_corners=False)
        warped = warped[0].permute(1, 2, 0)  # h×w×3
        out = t["background"].clone()
        region = out[y0:y1, x0:x1].float()
        blended = region + t["mask"] * (warped - region)
        out[y0:y1, x0:x1] = blended.round().clamp(0, 255).to(torch.uint8)
        return out

    def __call__(self, avatar: np.ndarray | torch.Tensor) -> np.ndarray:
        """The frame for one avatar: a numpy uint8 image (OpenCV path) or a device prediction."""
        if isinstance(avatar, torch.Tensor):
            if not self.on_device:
                from dagan.helpers import tensor_to_images

                return paste_cpu(self.plan, tensor_to_images(avatar[None])[0])
            with torch.inference_mode():
                return self.paste_tensor(avatar.to(self.device)).cpu().numpy()
        return paste_cpu(self.plan, avatar)


def animate_pictures(
    engine: Engine,
    sessions: list[Session],
    frames: list[np.ndarray],
    pasters: list[Paster | None],
    return_depth: bool = False,
) -> list[FrameResult]:
    """:meth:`Engine.animate_batch`, with each item whose paster works on the device pasted there, from
    the prediction before its download (``FrameResult.picture``); other items come back as crops, for
    the caller to paste with OpenCV where it suits it (the server: on its media threads)."""
    check_batch(sessions, frames)
    on_device = [p is not None and p.on_device for p in pasters]
    if not any(on_device) or not hasattr(engine, "predict_batch"):
        return engine.animate_batch(sessions, frames, return_depth=return_depth)
    from dagan.helpers import depth_to_images, tensor_to_images

    prediction, depth = engine.predict_batch(sessions, frames)
    images = tensor_to_images(prediction)
    depths = depth_to_images(depth) if (return_depth and depth is not None) else [None] * len(images)
    out = []
    with torch.inference_mode():
        for i, (img, dep) in enumerate(zip(images, depths, strict=True)):
            picture = None
            if on_device[i]:
                picture = pasters[i].paste_tensor(prediction[i]).cpu().numpy()
            out.append(FrameResult(img, dep, picture))
    return out
