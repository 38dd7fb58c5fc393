"""Give a trained keypoint detector full-resolution detail (``keypoints.detail_channels``), then teach its
eyelid and lip keypoints to follow the face, everything else staying as it was.

Why: the detector sees the driving frame blurred down to 32×32 (``keypoints.scale_factor`` 0.25 of a
128-px crop). A blink moves an eyelid by 2–4 px of the crop, under one pixel there, and the bundled
detector's lid keypoints follow the lids' gap with r 0.39–0.47 (``dagan kp-follow``). Running the whole
detector at 64×64 costs +0.63 GFLOP per frame, over the issue's bound; the detail branch keeps the 32×32
hourglass and gives it E more input channels mixed from the 4×4 full-resolution blocks behind each of its
pixels (``dagan.nets.keypoints.KeypointDetector``): 0.05 GFLOP per frame at 8 channels (2.40 against
2.36). Measured on the bundled file in weights/README.md, "Eyelid detail" (not shipped).

1. **Widen** (:func:`widen`): a copy of ``--weights`` with ``keypoints.detail_channels`` = ``--channels``.
   The new 1×1 conv is initialised at random; every weight where its channels enter — the hourglass's
   first conv and the keypoint and Jacobian heads, which read the hourglass input through its last skip —
   is zero. The widened detector gives exactly the old keypoints (checked before training).
2. **Train the detector alone** (depth net and generator untouched): on (source, driving) pairs of the
   training clips with face-mesh tracks (the DaGAN stage's own dataset, expressive pairs included), the
   recipe's keypoint terms — each anchor keypoint's displacement against its landmark's (eyelids and lips
   weighted ``kp_landmark_focus_weight``) and the position prior — plus distillation: L1 to the old
   detector's keypoints (all but the expression keypoints) and Jacobians (all), so the keypoints the
   generator was trained with stay where they were. BatchNorm keeps its running statistics.

    python scripts/fit_detail.py --weights weights/dagan-default.safetensors --data data/real128v2 \\
        --channels 8 --steps 1500 --out runs/detail8.safetensors

``--channels 0`` trains the detector alone without the branch (what the training alone buys). It prints
the terms every 100 steps. ``dagan kp-follow`` on the test split measures the result
(lid and lip gaps against the face mesh's), ``dagan eval-cross`` the avatar.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Tensors whose input channels grow with the detail branch: the hourglass's first conv, and the heads
#: that read its input through the last skip. The old channels come first in each.
WIDENED = (
    "kp_detector.predictor.encoder.down_blocks.0.conv.weight",
    "kp_detector.kp.weight",
    "kp_detector.jacobian.weight",
)


def widen(config, tensors: dict[str, torch.Tensor], channels: int, seed: int = 0):
    """(config, tensors) of the detector with ``channels`` detail channels, computing what it computed
    before: old input channels first, the new ones' weights zero, the new 1×1 conv random."""
    from dagan.checkpoint import inference_tensors
    from dagan.model import DaGAN

    if config.keypoints.detail_channels:
        raise SystemExit("fit_detail: the weights already have a detail branch")
    if channels < 0:
        raise SystemExit("fit_detail: --channels must be >= 0")
    if channels == 0:  # no branch: the detector as it is (what the training alone buys)
        return config, dict(tensors)
    wide = config.replace(**{"keypoints.detail_channels": channels})
    torch.manual_seed(seed)
    model = DaGAN(wide)
    fresh = model.state_dict()
    out = {}
    for name, t in fresh.items():
        old = tensors.get(name)
        if old is None:
            if not name.startswith("kp_detector.detail."):
                raise SystemExit(f"fit_detail: {name} is missing from the weights")
            out[name] = t
        elif old.shape == t.shape:
            out[name] = old
        elif name in WIDENED and old.shape[0] == t.shape[0] and t.shape[1] == old.shape[1] + channels:
            grown = torch.zeros_like(t)
            grown[:, : old.shape[1]] = old
            out[name] = grown
        else:
            raise SystemExit(f"fit_detail: {name} {tuple(old.shape)} -> {tuple(t.shape)} is not a widening")
    extra = sorted(set(inference_tensors(model, tensors)) - set(fresh))
    if extra:
        raise SystemExit(f"fit_detail: the weights have tensors the model lacks: {', '.join(extra[:5])}")
    return wide, out


def detector_loss(kp_s, kp_d, t_s, t_d, lm_s, lm_d, cfg, distill: float):
    """The recipe's keypoint terms on both frames, plus distillation to the old detector (``t_*``)."""
    from training import losses as L

    g, w = cfg.dagan, cfg.dagan.weights
    k = kp_s.value.shape[1]
    point_w = torch.ones(k)
    point_w[list(g.kp_landmark_focus)] = g.kp_landmark_focus_weight
    keep = torch.ones(k, dtype=torch.bool)
    keep[list(g.kp_landmark_focus)] = False  # the expression keypoints are free to follow the face
    terms = {
        "kp_landmark_motion": w.kp_landmark_motion
        * L.landmark_motion_loss(kp_s.value, kp_d.value, lm_s, lm_d, point_w),
        "kp_landmarks": w.kp_landmarks
        * (L.landmark_prior_loss(kp_s.value, lm_s) + L.landmark_prior_loss(kp_d.value, lm_d)),
        "distill": distill
        * sum(
            (a.value[:, keep] - b.value[:, keep]).abs().mean() + (a.jacobian - b.jacobian).abs().mean()
            for a, b in ((kp_s, t_s), (kp_d, t_d))
        ),
    }
    return sum(terms.values()), {n: float(v.detach()) for n, v in terms.items()}


def fit_detail(
    weights: str | Path,
    data: str | Path,
    out: str | Path,
    recipe: str | Path,
    channels: int = 8,
    steps: int = 1500,
    batch: int = 16,
    lr: float = 2e-4,
    distill: float = 10.0,
    seed: int = 0,
    log=print,
) -> None:
    """The module docstring's procedure; writes ``out`` (inference tensors, the metadata of ``weights``
    with a ``detail`` line)."""
    from dagan.checkpoint import inference_tensors, load_into, load_model, read_checkpoint, save_checkpoint
    from dagan.model import DaGAN
    from dagan.nets.keypoints import Keypoints
    from training.config import load_train_config
    from training.data import SourceDrivingDataset

    config, tensors, meta = read_checkpoint(weights)
    cfg = load_train_config(recipe)
    g = cfg.dagan
    teacher = load_model(weights).requires_grad_(False)
    wide, wide_tensors = widen(config, tensors, channels, seed)
    student = DaGAN(wide).eval().requires_grad_(False)
    load_into(student, inference_tensors(student, wide_tensors), source=str(weights))

    with torch.no_grad():  # step 1's promise: the widened detector computes what the old one did
        probe = torch.rand(
            2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed)
        )
        depth = teacher.estimate_depth(probe)
        gap = (
            student.detect_keypoints(probe, depth).value - teacher.detect_keypoints(probe, depth).value
        ).abs()
        if float(gap.max()) > 1e-5:
            raise SystemExit(
                f"fit_detail: the widened detector moved the keypoints by {float(gap.max()):.2e}"
            )

    dataset = SourceDrivingDataset(
        data,
        "train",
        config.image_size,
        repeats=max(1, steps * batch // 50),
        seed=seed,
        landmark_points=g.kp_landmark_points,
        expressive_pairs=g.expressive_pairs,
        focus=g.kp_landmark_focus,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=1, drop_last=True
    )
    params = list(student.kp_detector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    t0, step, sums = time.perf_counter(), 0, {}
    while step < steps:
        for item in loader:
            if step >= steps:
                break
            with torch.no_grad():
                frames = torch.cat([item["source"], item["driving"]])
                depth = teacher.estimate_depth(frames)
                t_kp = teacher.detect_keypoints(frames, depth)
            kp = student.detect_keypoints(frames, depth)
            b = item["source"].shape[0]
            halves = [
                (Keypoints(k.value[:b], k.jacobian[:b]), Keypoints(k.value[b:], k.jacobian[b:]))
                for k in (kp, t_kp)
            ]
            (kp_s, kp_d), (t_s, t_d) = halves
            loss, terms = detector_loss(
                kp_s, kp_d, t_s, t_d, item["source_landmarks"], item["driving_landmarks"], cfg, distill
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for n, v in terms.items():
                sums[n] = sums.get(n, 0.0) + v
            if step % 100 == 0 or step == steps:
                n = 100 if step % 100 == 0 else step % 100
                shown = ", ".join(f"{k} {v / n:.4f}" for k, v in sums.items())
                log(f"step {step}/{steps}: {shown} ({time.perf_counter() - t0:.0f} s)")
                sums = {}
    student.requires_grad_(False)
    meta = dict(meta)
    what = f"widened by {channels} full-resolution detail channels and trained" if channels else "trained"
    meta["detail"] = (
        f"keypoint detector {what} alone {steps} steps at batch {batch} (scripts/fit_detail.py: the "
        f"keypoint terms of {Path(recipe).name}, distillation {distill:g} to the detector before)"
    )
    save_checkpoint(out, wide, student, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a trained checkpoint without a detail branch")
    ap.add_argument("--data", required=True, help="prepared frames with face-mesh tracks: DATA/train/<clip>/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default=str(ROOT / "training" / "recipes" / "live-128.yaml"),
                    help="the training recipe whose keypoint terms and anchors to use")  # fmt: skip
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--distill", type=float, default=10.0, help="weight of the L1 to the old detector")
    args = ap.parse_args()
    fit_detail(
        args.weights, args.data, args.out, args.recipe, args.channels, args.steps, args.batch, args.lr,
        args.distill,
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
