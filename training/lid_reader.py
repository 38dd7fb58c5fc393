"""``dagan train lids``: teach a model's lid reader (:mod:`dagan.nets.lid_reader`) how open the eyes are.

Data: prepared clips with face-mesh tracks (``dagan prepare`` + ``dagan landmarks``: frames ``*.png``
and ``landmarks478.npy`` per clip). For every frame the model's own keypoint detector places the two
eye patches exactly as the engine will (:func:`~dagan.nets.lid_reader.eye_patches`), and the mesh's
eye opening of that eye (lid gap over eye width, as :func:`evaluation.motion.eye_opening` measures it)
is the target. Only the reader learns; every other tensor of the ``--init`` file is copied unchanged.

A few CPU-minutes: patches are cut once (uint8, ~2.3 kB per frame), then the small net trains on them
with contrast, colour, shift, noise, zoom, turn and blur augmentation. Held-out clips (``--test``) are
scored the way the reader is used: the correlation of its reading with the mesh's within each clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dagan.nets.lid_reader import LidReader, eye_patches

# Face-mesh (upper lid, lower lid, corner, corner) of each eye: the opening is gap / width.
MESH_EYES = ((159, 145, 33, 133), (386, 374, 362, 263))


class LidDataError(ValueError):
    """No usable clip (frames with face-mesh tracks) under the data folder."""


@dataclass
class LidSet:
    """Eye patches N×2×3×rows×cols (uint8), mesh openings N×2 (image-left eye first), clip ids N."""

    patches: np.ndarray
    openings: np.ndarray
    clips: np.ndarray

    def __len__(self) -> int:
        return len(self.openings)


def mesh_openings(landmarks: np.ndarray) -> np.ndarray:
    """T×478×2 tracks → T×2 eye openings, the image-left eye first."""
    lm = np.asarray(landmarks, dtype=np.float64)
    out, centres = [], []
    for up, lo, c0, c1 in MESH_EYES:
        gap = np.linalg.norm(lm[:, up, :2] - lm[:, lo, :2], axis=-1)
        width = np.linalg.norm(lm[:, c0, :2] - lm[:, c1, :2], axis=-1)
        out.append(gap / np.maximum(width, 1e-6))
        centres.append(0.5 * (lm[:, c0, 0] + lm[:, c1, 0]))
    openings = np.stack(out, axis=1)
    swap = centres[0] > centres[1]  # the subject's right eye is normally the image-left one
    openings[swap] = openings[swap][:, ::-1]
    return openings


def clip_dirs(root: str | Path) -> list[Path]:
    """Prepared clips under ``root`` (or ``root`` itself) that have frames and a mesh track."""
    root = Path(root)
    found = [d for d in sorted([root, *root.rglob("*")]) if d.is_dir() and (d / "landmarks478.npy").is_file()]
    return [d for d in found if any(d.glob("*.png"))]


@torch.inference_mode()
def collect(model: nn.Module, root: str | Path, batch: int = 64, progress: bool = True) -> LidSet:
    """Cut every frame's eye patches where ``model``'s keypoints put them (CPU, fp32)."""
    import imageio.v3 as iio
    from tqdm import tqdm

    dirs = clip_dirs(root)
    if not dirs:
        raise LidDataError(f"no prepared clip with frames and landmarks478.npy under {root}")
    lids = model.lid_reader.lids
    patches, openings, clips = [], [], []
    for ci, d in enumerate(
        tqdm(dirs, desc=f"eye patches {Path(root).name}", unit="clip", disable=not progress)
    ):
        tracks = np.load(d / "landmarks478.npy").astype(np.float32)
        files = sorted(d.glob("*.png"))[: len(tracks)]
        for i in range(0, len(files), batch):
            frames = np.stack([iio.imread(f)[..., :3] for f in files[i : i + batch]])
            images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
            kp = model.driving_keypoints(images)[0].value
            cut = eye_patches(images, kp, lids)
            patches.append((cut * 255).round().clamp(0, 255).to(torch.uint8).numpy())
        openings.append(mesh_openings(tracks[: len(files)]))
        clips.append(np.full(len(files), ci))
    return LidSet(np.concatenate(patches), np.concatenate(openings).astype(np.float32), np.concatenate(clips))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast, brightness, colour balance, a shift of up to 1 row and 2 columns, then per patch a zoom
    of ±15 %, a turn of ±8° and a shift of ±5 % (where the detected keypoints put a patch varies from
    person to person), a slight blur on half of them (webcams and compression), and noise.

    The reader has 41 k parameters and about 37 people to learn from: it fits the training clips almost
    exactly (per-clip r 0.96) whatever it is given, so what it reads held out rests on these: held-out
    r 0.68 and 0.75 in two draws without the zoom, turn and blur, 0.73–0.76 in three with them
    (docs/training.md, "Blinks")."""
    b = x.shape[0]
    x = x * (0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen)) + 0.1 * (
        torch.rand(b, 1, 1, 1, generator=gen) - 0.5
    )
    x = x * (0.9 + 0.2 * torch.rand(b, 3, 1, 1, generator=gen))
    dy = int(torch.randint(-1, 2, (1,), generator=gen))
    dx = int(torch.randint(-2, 3, (1,), generator=gen))
    x = torch.roll(x, (dy, dx), (2, 3))
    x = x + 0.02 * torch.randn(x.shape, generator=gen)
    scale = 1 + 0.15 * (2 * torch.rand(b, generator=gen) - 1)
    turn = math.radians(8.0) * (2 * torch.rand(b, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(b, 2, generator=gen) - 1)
    aspect = x.shape[3] / x.shape[2]  # the affine grid's units are per axis: keep the turn a turn
    theta = torch.stack(
        [
            torch.stack([scale * torch.cos(turn), -scale * torch.sin(turn) / aspect, shift[:, 0]], dim=1),
            torch.stack([scale * torch.sin(turn) * aspect, scale * torch.cos(turn), shift[:, 1]], dim=1),
        ],
        dim=1,
    )  # b×2×3
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None] / 16).expand(3, 1, 3, 3).contiguous()
    blurred = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    soft = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).to(x.dtype)
    return soft * blurred + (1 - soft) * x


def score(reader: LidReader, data: LidSet) -> dict[str, float]:
    """Median over clips and eyes (where the mesh's opening varies, std ≥ 0.02) of the correlation and
    the slope of the reading against the mesh's; mean absolute error over every frame."""
    reader.eval()
    with torch.inference_mode():
        x = torch.from_numpy(data.patches).float().div(255).flatten(0, 1)
        pred = (
            torch.cat([reader.read_patches(x[i : i + 4096]) for i in range(0, len(x), 4096)])
            .view(-1, 2)
            .numpy()
        )
    rs, gains = [], []
    for c in np.unique(data.clips):
        m = data.clips == c
        for e in range(2):
            y, p = data.openings[m, e], pred[m, e]
            if y.std() < 0.02:
                continue
            a, b = p - p.mean(), y - y.mean()
            rs.append(float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12)))
            gains.append(float((a * b).sum() / ((b * b).sum() + 1e-12)))
    return {
        "clip_r": float(np.median(rs)) if rs else float("nan"),
        "clip_gain": float(np.median(gains)) if gains else float("nan"),
        "mae": float(np.abs(pred - data.openings).mean()),
        "eyes_scored": len(rs),
    }


def train_reader(
    reader: LidReader,
    data: LidSet,
    steps: int = 3000,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> LidReader:
    """Fit ``reader`` to ``data`` (smooth L1 on the opening, one-cycle Adam); returns it in eval mode."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(data.patches).flatten(0, 1)  # uint8, 2N×3×r×c
    y = torch.from_numpy(data.openings).flatten()
    opt = torch.optim.Adam(reader.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    reader.train()
    bar = tqdm(range(steps), desc="train lid reader", unit="step", disable=not progress)
    for _ in bar:
        i = torch.randint(0, len(x), (batch,), generator=gen)
        pred = reader.read_patches(_augment(x[i].float() / 255, gen))
        loss = nn.functional.smooth_l1_loss(pred, y[i], beta=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return reader.eval()


def train_lids(
    init: str | Path,
    data: str | Path,
    out: str | Path,
    keypoints: tuple[int, ...],
    test: str | Path | None = None,
    steps: int = 3000,
    progress: bool = True,
) -> dict[str, float]:
    """``--init`` weights + a lid reader on ``keypoints`` trained on ``data`` → ``out`` (the same file
    with the reader's tensors and ``blink.keypoints`` in its config). Returns the held-out score (or {})."""
    from dagan.checkpoint import read_checkpoint, save_checkpoint
    from dagan.model import DaGAN

    config, tensors, metadata = read_checkpoint(init)
    config = config.replace(**{"blink.keypoints": list(keypoints)})
    model = DaGAN(config)
    own = {k: v for k, v in tensors.items() if not k.startswith("lid_reader.")}
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in own.items() if k in model.state_dict()}})
    model.eval()
    train_set = collect(model, data, progress=progress)
    reader = train_reader(model.lid_reader, train_set, steps=steps, progress=progress)
    result = score(reader, collect(model, test, progress=progress)) if test else {}
    state = {**own, **{f"lid_reader.{k}": v for k, v in reader.state_dict().items()}}
    save_checkpoint(out, config, state, extra_metadata=metadata)
    return result
