"""Stage 1, face depth (paper §3.2): F_d and the pose/intrinsics net F_p learn by view synthesis.

F_d(I_i) and F_p(I_i ‖ I_j) rebuild the target frame I_i from each neighbouring frame I_j; the loss is
monodepth2's (SSIM + L1 photometric error, per-pixel minimum reprojection, auto-masking, edge-aware
smoothness), averaged over the decoder's scales. See docs/training.md §2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dagan.checkpoint import load_into, read_checkpoint
from dagan.model import DaGAN, build_depth_net
from dagan.nets.depth import disp_to_depth
from dagan.nets.pose import PoseNet, inverse_warp, transformation_matrix

from . import losses as L
from .config import TrainConfig
from .data import ConsecutiveFramesDataset
from .distributed import DistInfo
from .errors import TrainingError
from .rng import step_seed
from .stage import Stage, grid, milestone_lambda


class DepthStage(Stage):
    """Self-supervised face depth: F_d(I_i) and F_p(I_i ‖ I_j) rebuild I_i from each neighbour I_j."""

    name = "depth"
    init_groups = (("depth_net.", "depth_net", True), ("pose_net.", "pose_net", False))

    def __init__(self, cfg: TrainConfig, device: torch.device, info: DistInfo) -> None:
        super().__init__(cfg, device, info)
        m, d = cfg.model, cfg.depth
        model = DaGAN(m)
        if model.depth_net is None:
            raise TrainingError("the model config uses no depth (keypoints.use_depth and attention both off)")
        self.depth_net = model.depth_net.to(device)
        self.pose_net = PoseNet(width=m.pose.encoder_width).to(device)
        self.batch_size, self.total_steps = d.batch_size, d.steps
        teacher = load_teacher(d.teacher, device) if d.distill > 0 else None
        self.net = self._wrap(DepthObjective(self.depth_net, self.pose_net, cfg, teacher))
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.params = params
        self.optimizers["depth"] = torch.optim.Adam(params, lr=d.lr)
        self.schedulers["depth"] = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers["depth"], milestone_lambda(d.lr_milestones, d.lr_gamma)
        )
        self._last: dict[str, torch.Tensor] | None = None

    def dataset(self, root: str):
        return self._video_dataset(ConsecutiveFramesDataset, root, offsets=self.cfg.depth.source_offsets)

    def set_train(self) -> None:
        self.net.train()

    def train_step(self, batch, step):
        target = batch["target"].to(self.device, non_blocking=True)
        sources = batch["sources"].to(self.device, non_blocking=True)
        noise_seed = step_seed(self.cfg.seed, self.info.rank, step)
        with self.autocast():
            loss, logs, vis = self.net(target, sources, noise_seed)
        logs["grad_norm"] = self._optimize("depth", loss, self.params)
        logs["lr"] = self.optimizers["depth"].param_groups[0]["lr"]
        self._last = {"target": target, "source": sources[:, -1], **vis}
        return logs

    def tensors(self):
        out = {f"depth_net.{k}": v for k, v in self.depth_net.state_dict().items()}
        out.update({f"pose_net.{k}": v for k, v in self.pose_net.state_dict().items()})
        return out

    def load_tensors(self, tensors, source):
        load_into(self.depth_net, tensors, "depth_net.", source)
        load_into(self.pose_net, tensors, "pose_net.", source)

    def image_grid(self):
        if self._last is None:
            return None
        x = self._last
        disp = x["disp"].float()
        disp = disp / disp.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        cols = [x["target"], x["source"], x["warped"], disp.expand(-1, 3, -1, -1)]
        return grid(cols)


def load_teacher(path: str, device: torch.device) -> nn.Module:
    """The frozen depth net of checkpoint ``path``, built from that checkpoint's own config (a teacher
    may run at another ``input_scale`` than the student)."""
    if not path:
        raise TrainingError("depth.distill > 0 needs depth.teacher (a checkpoint with depth_net.* tensors)")
    config, tensors, _ = read_checkpoint(path)
    if not any(k.startswith("depth_net.") for k in tensors):
        raise TrainingError(f"depth.teacher {path} has no depth_net.* tensors")
    net = build_depth_net(config.depth)
    load_into(net, tensors, "depth_net.", path)
    return net.to(device).eval().requires_grad_(False)


class DepthObjective(nn.Module):
    """The depth-stage loss as one module, so DDP sees a single forward per step.

    forward(target B×3×H×W, sources B×S×3×H×W, noise_seed) → (loss, logs, images). For every decoder
    scale s the disparity is upsampled to H×W (monodepth2), turned into depth, each source is warped
    into the target view with F_p's motion and intrinsics, and the minimum-reprojection / auto-masked
    photometric loss plus the edge-aware smoothness (at the decoder's own resolution, weight /2^s) is
    averaged over scales. With a ``teacher`` (distillation), ``depth.distill`` × the mean absolute
    difference of the full-resolution disparities is added.
    """

    def __init__(
        self, depth_net: nn.Module, pose_net: nn.Module, cfg: TrainConfig, teacher: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.depth_net = depth_net
        self.pose_net = pose_net
        self.teacher = teacher
        self.cfg = cfg.depth
        self.min_depth, self.max_depth = cfg.model.depth.min_depth, cfg.model.depth.max_depth

    def forward(self, target: torch.Tensor, sources: torch.Tensor, noise_seed: int):
        b, s, c, h, w = sources.shape
        disps = self.depth_net.forward_multiscale(target)
        flat_sources = sources.transpose(0, 1).reshape(s * b, c, h, w)  # source-major
        pose = self.pose_net(target.repeat(s, 1, 1, 1), flat_sources)
        motion = transformation_matrix(pose.axisangle.float(), pose.translation.float())
        intrinsics = pose.intrinsics.float()
        gen = torch.Generator().manual_seed(noise_seed)
        src_list = [sources[:, j].float() for j in range(s)]
        total = target.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        warped0 = mask0 = full0 = None
        for scale in sorted(disps):
            disp = disps[scale].float()
            full = (
                disp
                if disp.shape[-2:] == (h, w)
                else F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False)
            )
            _, depth = disp_to_depth(full, self.min_depth, self.max_depth)
            warped = inverse_warp(flat_sources.float(), depth.repeat(s, 1, 1, 1), motion, intrinsics).view(
                s, b, c, h, w
            )
            warped_list = [warped[j] for j in range(s)]
            photo, mask = L.reprojection_loss(
                warped_list,
                src_list,
                target.float(),
                alpha=self.cfg.ssim_alpha,
                min_reprojection=self.cfg.min_reprojection,
                automask=self.cfg.automask,
                generator=gen,
            )
            small = (
                target
                if disp.shape[-1] == w
                else F.interpolate(target.float(), size=disp.shape[-2:], mode="area")
            )
            smooth = L.edge_aware_smoothness(disp, small)
            total = total + photo + self.cfg.smoothness * smooth / (2**scale)
            logs[f"photometric/s{scale}"] = float(photo.detach())
            if scale == 0:
                logs["smoothness"] = float(smooth.detach())
                warped0, mask0, full0 = warped_list[-1], mask, full
        loss = total / len(disps)
        if self.teacher is not None:
            with torch.no_grad():
                target_disp = self.teacher(target).float()
            distill = (full0 - target_disp).abs().mean()
            loss = loss + self.cfg.distill * distill
            logs["distill"] = float(distill.detach())
        logs["loss"] = float(loss.detach())
        logs["automask_kept"] = float(mask0.mean())
        vis = {"warped": warped0.detach(), "disp": full0.detach()}
        return loss, logs, vis
