"""Depth against ground truth on synthetic clips (``dagan eval-depth``): a check the paper could not make.

``dagan synth`` writes the rendered face depth beside every frame (``gt.npz``: ``depth`` F×H×W, NaN off
the face). The self-supervised depth net predicts depth only up to an unknown scale, so the comparison
uses scale-free measures on face pixels: the scale-invariant log error (Eigen et al. 2014, √(mean d² −
(mean d)²) with d = log pred − log gt) and Spearman's rank correlation. The trivial baseline is a
constant depth: its scale-invariant error is the spread of log gt, and it has no rank correlation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dagan.checkpoint import CheckpointError, read_checkpoint
from dagan.errors import UserError
from dagan.media import load_image
from dagan.model import build_depth_net
from dagan.nets.depth import FaceDepthNet, disp_to_depth


def load_depth_net(checkpoint: str | Path) -> tuple[FaceDepthNet, float, float]:
    """The depth net of any checkpoint that has ``depth_net.*`` (depth-stage or full model)."""
    cfg, tensors, _ = read_checkpoint(checkpoint)
    net = build_depth_net(cfg.depth)
    state = {k[len("depth_net.") :]: v for k, v in tensors.items() if k.startswith("depth_net.")}
    if not state:
        raise CheckpointError(f"{checkpoint} has no depth_net.* tensors")
    net.load_state_dict(state)
    return net.eval(), cfg.depth.min_depth, cfg.depth.max_depth


def si_log_error(pred: np.ndarray, gt: np.ndarray) -> float:
    d = np.log(pred) - np.log(gt)
    return float(np.sqrt(max(0.0, np.mean(d**2) - np.mean(d) ** 2)))


def evaluate_depth(checkpoint: str | Path, root: str | Path, frame_stride: int = 4) -> dict:
    """Mean per-frame scores over every clip folder under ``root`` that has a ``gt.npz``."""
    net, min_depth, max_depth = load_depth_net(checkpoint)
    clips = sorted(p.parent for p in Path(root).rglob("gt.npz"))
    if not clips:
        raise UserError(f"no clip with gt.npz under {root} (make one with `dagan synth`)")
    si, const_si, rho = [], [], []
    for clip in clips:
        gt_all = np.load(clip / "gt.npz")["depth"].astype(np.float64)
        frames = sorted(p for p in clip.iterdir() if p.suffix == ".png")
        for i in range(0, len(frames), frame_stride):
            gt = gt_all[i]
            mask = np.isfinite(gt) & (gt > 0)
            if mask.sum() < 16:
                continue
            image = load_image(frames[i])
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
            if x.shape[-1] % 32:
                raise UserError(f"{frames[i]}: size {x.shape[-1]} is not a multiple of 32")
            with torch.no_grad():
                _, depth = disp_to_depth(net(x), min_depth, max_depth)
            pred = depth[0, 0].numpy().astype(np.float64)
            if pred.shape != gt.shape:
                raise UserError(f"{frames[i]}: prediction {pred.shape} vs ground truth {gt.shape}")
            p, g = pred[mask], gt[mask]
            si.append(si_log_error(p, g))
            const_si.append(si_log_error(np.full_like(g, np.median(g)), g))
            rho.append(float(spearmanr(p, g).statistic))
    if not si:
        raise UserError(f"no frame under {root} has enough face pixels with ground-truth depth")
    return {
        "frames": len(si),
        "clips": len(clips),
        "si_log": float(np.mean(si)),
        "spearman": float(np.nanmean(rho)),
        "constant_si_log": float(np.mean(const_si)),
        "constant_spearman": 0.0,
    }


def markdown(result: dict) -> str:
    return (
        "| depth | scale-invariant log error ↓ | Spearman ρ ↑ |\n|---|---|---|\n"
        f"| predicted | {result['si_log']:.4f} | {result['spearman']:.3f} |\n"
        f"| constant (baseline) | {result['constant_si_log']:.4f} | 0 (undefined) |\n"
        f"\n{result['frames']} frames of {result['clips']} clips.\n"
    )
