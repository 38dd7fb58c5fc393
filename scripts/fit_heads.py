"""Smaller output and dense-motion heads for a trained checkpoint, distilled from its own 7×7 heads.

The output conv (``generator.final``) and the dense-motion mask/occlusion convs are 7×7 in DaGAN; on a
CPU they are the costliest single ops of a frame (docs/export.md, "Smaller heads"). This writes a copy of
``--weights`` whose config has ``generator.final_kernel_size`` and/or
``generator.dense_motion.head_kernel_size`` (``--heads``: both, output or motion) set to ``--kernel`` (5 or
3), every other tensor unchanged, the new heads found in two steps:

1. **Least squares**, head by head: on frame pairs of the training clips (each clip's first frame as the
   source, frames of it and of the next clip as drivers: self and cross-identity), the k×k conv that best
   reproduces the 7×7 head's logits from the same input features (ridge, closed form).
2. **End to end**: the heads alone (everything else frozen) trained with Adam to make the model's frames
   match the 7×7 model's (L1), ``--steps`` steps of ``--batch`` pairs: the mask heads' errors pass through
   the warp, which step 1 cannot see.

It prints the frames' PSNR against the 7×7 model on pairs of ``--check`` clips after each step.

    python scripts/fit_heads.py --weights weights/dagan-default.safetensors --data data/real128v2 \\
        --kernel 5 --steps 300 --out runs/k5.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADS = ("final", "mask", "occlusion")


def frame_pairs(split_dir: Path, per_clip: int, seed: int) -> list[tuple[Path, Path]]:
    """(source, driver) paths: per clip its first frame with ``per_clip`` frames of the next clip (another
    person, as a user drives) and ``per_clip // 2`` of its own."""
    from training.data import Video  # the training data's own frame listing (natural order)

    clips = [v.frames for v in (Video(p) for p in sorted(split_dir.iterdir()) if p.is_dir()) if v.frames]
    if len(clips) < 2:
        raise SystemExit(f"fit_heads: {split_dir} needs at least two clip folders of frames")
    rng = np.random.default_rng(seed)
    pairs = []
    for i, own in enumerate(clips):
        other = clips[(i + 1) % len(clips)]
        pairs += [
            (own[0], other[j]) for j in rng.choice(len(other), min(per_clip, len(other)), replace=False)
        ]
        pairs += [(own[0], own[j]) for j in rng.choice(len(own), min(per_clip // 2, len(own)), replace=False)]
    return pairs


def load_batch(pairs: list[tuple[Path, Path]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import cv2

    from dagan.media import load_image

    def images(paths: list[Path]) -> torch.Tensor:
        arrays = [cv2.resize(load_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    return images([p[0] for p in pairs]), images([p[1] for p in pairs])


#: --heads → the convs it shrinks (module names in :func:`head_modules`) and the config keys.
HEAD_GROUPS = {
    "both": (
        ("final", "mask", "occlusion"),
        ("generator.final_kernel_size", "generator.dense_motion.head_kernel_size"),
    ),
    "output": (("final",), ("generator.final_kernel_size",)),
    "motion": (("mask", "occlusion"), ("generator.dense_motion.head_kernel_size",)),
}


#: Each head's module path, which is also its tensors' prefix in a checkpoint.
HEAD_PATHS = {
    "final": "generator.final",
    "mask": "generator.dense_motion_network.mask",
    "occlusion": "generator.dense_motion_network.occlusion",
}


def head_modules(model: torch.nn.Module, names: tuple[str, ...] = HEADS) -> dict[str, torch.nn.Conv2d]:
    """The model's heads among ``names`` (the occlusion head is absent without an occlusion map)."""
    parent_path = {n: HEAD_PATHS[n].rpartition(".") for n in names}
    found = {n: getattr(model.get_submodule(parent), attr) for n, (parent, _, attr) in parent_path.items()}
    return {n: conv for n, conv in found.items() if conv is not None}


def least_squares_heads(teacher, student, batches, kernel: int, names=HEADS, ridge: float = 1e-3) -> None:
    """Step 1 of the module docstring, written into ``student``'s heads."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        conv.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, (i[0], o)))
        for name, conv in head_modules(teacher, names).items()
    ]
    gram: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for source, driving in batches:
                teacher(source, driving)
                for name, (x, y) in captured.items():
                    cols = F.unfold(x.double(), kernel, padding=kernel // 2).transpose(1, 2)
                    cols = torch.cat(
                        [cols.reshape(-1, cols.shape[-1]), cols.new_ones(cols.shape[0] * cols.shape[1], 1)], 1
                    )
                    target = y.double().permute(0, 2, 3, 1).reshape(-1, y.shape[1])
                    gram[name] = gram.get(name, 0) + cols.T @ cols
                    cross[name] = cross.get(name, 0) + cols.T @ target
    finally:
        for h in hooks:
            h.remove()
    for name, conv in head_modules(student, names).items():
        a = gram[name]
        sol = torch.linalg.solve(
            a + ridge * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype), cross[name]
        )
        with torch.no_grad():
            conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).float())
            conv.bias.copy_(sol[-1].float())


def psnr_against(teacher, student, batches) -> list[float]:
    out = []
    with torch.no_grad():
        for source, driving in batches:
            mse = ((teacher(source, driving).prediction - student(source, driving).prediction) ** 2).mean(
                dim=(1, 2, 3)
            )
            out += (10 * torch.log10(1 / mse.clamp(min=1e-12))).tolist()
    return out


def fit_heads(
    weights: str | Path,
    data: str | Path,
    out: str | Path,
    kernel: int = 5,
    heads: str = "both",
    steps: int = 300,
    batch: int = 8,
    per_clip: int = 6,
    lr: float = 1e-4,
    train_split: str = "train",
    check_split: str = "test",
    seed: int = 0,
    log=print,
) -> dict[str, float]:
    """The module docstring's procedure; returns the PSNRs (median) after each step and writes ``out``."""
    from dagan.checkpoint import read_checkpoint, save_checkpoint
    from dagan.model import DaGAN

    config, tensors, meta = read_checkpoint(weights)
    g = config.generator
    names = HEAD_GROUPS[heads][0]
    if g.final_kernel_size != 7 or g.dense_motion.head_kernel_size != 7:
        raise SystemExit(f"fit_heads: {weights} already has smaller heads")
    teacher = DaGAN(config).eval()
    teacher.load_state_dict(tensors)
    teacher.requires_grad_(False)
    small = config.replace(**{key: kernel for key in HEAD_GROUPS[heads][1]})
    student = DaGAN(small).eval()
    student.load_state_dict(
        {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{HEAD_PATHS[n]}." for n in names))},
        strict=False,
    )
    student.requires_grad_(False)

    torch.manual_seed(seed)
    train = frame_pairs(Path(data) / train_split, per_clip, seed)
    check = frame_pairs(Path(data) / check_split, per_clip, seed + 1)
    size = config.image_size

    def batches(pairs, n):
        return (load_batch(pairs[i : i + n], size) for i in range(0, len(pairs), n))

    t0 = time.perf_counter()
    least_squares_heads(teacher, student, batches(train, 16), kernel, names)
    check_batches = list(batches(check, 16))
    result = {"least_squares_psnr_db": float(np.median(psnr_against(teacher, student, check_batches)))}
    ls_db, ls_s = result["least_squares_psnr_db"], time.perf_counter() - t0
    log(f"least squares ({len(train)} pairs, {ls_s:.0f} s): {ls_db:.1f} dB from the 7x7 model")

    params = [p for conv in head_modules(student, names).values() for p in conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        source, driving = load_batch([train[j] for j in rng.choice(len(train), batch, replace=False)], size)
        with torch.no_grad():
            target = teacher(source, driving).prediction
        loss = (student(source, driving).prediction - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: L1 {float(loss.detach()):.5f} ({time.perf_counter() - t0:.0f} s)")
    student.requires_grad_(False)
    psnr = psnr_against(teacher, student, check_batches)
    result.update(psnr_db=float(np.median(psnr)), psnr_min_db=float(np.min(psnr)), check_pairs=len(psnr))
    log(f"after {steps} steps: {np.median(psnr):.1f} dB median, {np.min(psnr):.1f} min ({len(psnr)} pairs)")
    meta["heads"] = (
        f"{kernel}x{kernel} heads ({', '.join(names)}) distilled from the 7x7 ones by "
        f"scripts/fit_heads.py (least squares, then {steps} steps at batch {batch}): "
        f"{result['psnr_db']:.1f} dB from the 7x7 model on {len(psnr)} held-out pairs"
    )
    save_checkpoint(out, small, student, meta)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a checkpoint with 7x7 heads")
    ap.add_argument("--data", required=True, help="prepared frames: DATA/train/<clip>/ and DATA/test/<clip>/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel", type=int, choices=(3, 5), default=5)
    ap.add_argument("--heads", choices=tuple(HEAD_GROUPS), default="both", help="which 7x7 heads to shrink")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--per-clip", type=int, default=6, help="cross-identity drivers per training clip")
    args = ap.parse_args()
    fit_heads(
        args.weights, args.data, args.out, args.kernel, args.heads, args.steps, args.batch, args.per_clip
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
