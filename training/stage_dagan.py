"""Stage 2, DaGAN (paper §3.5, eq. 10): keypoint detector, generator and discriminator, F_d frozen.

The generator side (perceptual pyramid, LSGAN, feature matching, equivariance, keypoint distance) is one
DDP-wrapped module; the discriminator step follows on real and fake in one batch. See docs/training.md §3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dagan.checkpoint import load_into, read_checkpoint
from dagan.head_pose import POSE_POINTS, pitch_since, rotation_from_points
from dagan.keypoint_ops import movement_scale, relative_keypoints
from dagan.model import DaGAN
from dagan.nets.discriminator import discriminator_from_config
from dagan.nets.keypoints import Keypoints
from dagan.nod import nod_keypoints

from . import losses as L
from .config import TrainConfig
from .data import SourceDrivingDataset
from .distributed import DistInfo, unwrap
from .errors import TrainingError
from .landmark_loss import CrossMotionLoss, FaceLandmarkLoss, load_landmark_net
from .perceptual import build_perceptual_loss
from .rng import step_seed
from .stage import Stage, draw_keypoints, grid, milestone_lambda


class DaganStage(Stage):
    """Keypoint detector + generator + discriminator with the depth net frozen (paper eq. 10)."""

    name = "dagan"
    # The depth net is not here: it comes, frozen, from --depth.
    init_groups = (
        ("kp_detector.", "model.kp_detector", True),
        ("generator.", "model.generator", True),
        ("discriminator.", "discriminator", False),
    )

    def __init__(
        self, cfg: TrainConfig, device: torch.device, info: DistInfo, depth_checkpoint: str | None
    ) -> None:
        super().__init__(cfg, device, info)
        m, g = cfg.model, cfg.dagan
        torch.manual_seed(cfg.seed)
        self.model = DaGAN(m).to(device)
        if self.model.depth_net is not None:
            if depth_checkpoint:
                _, tensors, _ = read_checkpoint(depth_checkpoint)
                load_into(self.model.depth_net, tensors, "depth_net.", depth_checkpoint)
            self.model.depth_net.eval().requires_grad_(False)
        self.frozen = frozen_modules(self.model, g.frozen)
        self.discriminator = discriminator_from_config(m.discriminator).to(device)
        self.perceptual = build_perceptual_loss(
            g.vgg19_weights, g.pyramid_scales, g.face_landmark_weights
        ).to(device)
        self.landmark_loss = self.cross_loss = None
        if g.weights.face_landmarks > 0 or g.weights.cross_motion > 0:
            net = load_landmark_net(g.face_landmark_weights)
            if g.weights.face_landmarks > 0:
                self.landmark_loss = FaceLandmarkLoss(net, g.kp_landmark_points, g.kp_landmark_focus_weight)
                self.landmark_loss.to(device)
            if g.weights.cross_motion > 0:
                self.cross_loss = CrossMotionLoss(
                    net, g.kp_landmark_points, g.cross_motion_signals, g.cross_motion_gray
                )
                self.cross_loss.to(device)
        self.batch_size, self.total_steps = g.batch_size, g.steps
        self.gen_net = self._wrap(
            GeneratorObjective(
                self.model, self.discriminator, self.perceptual, cfg, self.landmark_loss, self.cross_loss
            )
        )
        self.disc_net = self._wrap(self.discriminator)
        self.gen_params = [p for p in self.gen_net.parameters() if p.requires_grad]
        self.disc_params = list(self.disc_net.parameters())
        unwrapped = unwrap(self.gen_net)
        betas = (g.beta1, g.beta2)
        groups = [
            {"params": _trainable(unwrapped.model.generator), "lr": g.lr_generator},
            {"params": _trainable(unwrapped.model.kp_detector), "lr": g.lr_kp_detector},
        ]
        self.optimizers["generator"] = torch.optim.Adam([x for x in groups if x["params"]], betas=betas)
        self.optimizers["discriminator"] = torch.optim.Adam(
            self.disc_params, lr=g.lr_discriminator, betas=betas
        )
        for name, opt in self.optimizers.items():
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(
                opt, milestone_lambda(g.lr_milestones, g.lr_gamma)
            )
        self._last: dict[str, Any] | None = None

    def dataset(self, root: str):
        w = self.cfg.dagan.weights
        g = self.cfg.dagan
        points: tuple[int, ...] = ()
        if w.reads_landmarks or g.expressive_pairs > 0:
            # the anchors first (every term reads those), then the flow loss's own points
            points = g.kp_landmark_points + (g.flow_points if w.landmark_flow > 0 else ())
        if g.reshape_nod > 0:  # last, so the terms above read their points where they always did
            points = points + POSE_POINTS
        return self._video_dataset(
            SourceDrivingDataset,
            root,
            landmark_points=points,
            expressive_pairs=g.expressive_pairs,
            focus=g.kp_landmark_focus,
        )

    def set_train(self) -> None:
        self.gen_net.train()
        self.disc_net.train()
        if self.model.depth_net is not None:
            self.model.depth_net.eval()
        for module in self.frozen:
            module.eval()

    def metadata(self):
        return {"perceptual_loss": self.perceptual.name}

    def train_step(self, batch, step):
        source = batch["source"].to(self.device, non_blocking=True)
        driving = batch["driving"].to(self.device, non_blocking=True)
        seed = step_seed(self.cfg.seed, self.info.rank, step)
        # Generator step: the discriminator is only a critic here, so its weights take no gradient
        # (which also keeps them out of the generator DDP's gradient reduction).
        self.discriminator.requires_grad_(False)
        with self.autocast():
            landmarks = None
            if "source_landmarks" in batch:  # clips with landmark tracks (the kp_landmarks prior)
                landmarks = (
                    batch["source_landmarks"].to(self.device, non_blocking=True),
                    batch["driving_landmarks"].to(self.device, non_blocking=True),
                )
            loss, logs, out = self.gen_net(source, driving, seed, landmarks)
        logs["grad_norm/generator"] = self._optimize("generator", loss, self.gen_params)
        self.discriminator.requires_grad_(True)
        w = self.cfg.dagan.weights
        if w.gan > 0 or w.feature_matching > 0 or w.cross_gan > 0:
            # Real and fake in one batch: one DDP forward per backward (InstanceNorm is per sample).
            fakes = [out["prediction"].detach()]
            if w.cross_gan > 0 and out["cross_avatar"] is not None:
                fakes.append(out["cross_avatar"])  # another person's motion: a fake too
            with self.autocast():
                scores = self.disc_net(torch.cat([driving, *fakes], dim=0))
                b = driving.shape[0]
                d_loss = L.lsgan_discriminator_loss(
                    [v[1][:b] for v in scores.values()], [v[1][b:] for v in scores.values()]
                )
            logs["discriminator"] = float(d_loss.detach())
            logs["grad_norm/discriminator"] = self._optimize("discriminator", d_loss, self.disc_params)
        logs["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
        self._last = {"source": source, "driving": driving, **out}
        return logs

    def tensors(self):
        out = dict(self.model.state_dict())
        out.update({f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()})
        return out

    def load_tensors(self, tensors, source):
        load_into(
            self.model, {k: v for k, v in tensors.items() if not k.startswith("discriminator.")}, "", source
        )
        load_into(self.discriminator, tensors, "discriminator.", source)

    def image_grid(self):
        if self._last is None:
            return None
        x = self._last
        cols = [x["source"], x["driving"], x["prediction"]]
        if x.get("depth_driving") is not None:
            cols.append(x["depth_driving"].expand(-1, 3, -1, -1))
        cols.append(draw_keypoints(x["driving"], x["kp_driving"]))
        if x.get("cross_avatar") is not None:  # the photo driven by the previous item's motion
            cols.append(x["cross_avatar"])
        return grid(cols)


class GeneratorObjective(nn.Module):
    """Generator-side loss of eq. 10 as one module (DDP-wrapped): keypoint detector + generator train,
    the frozen depth net, the discriminator (as critic) and the perceptual net are held outside the
    module's parameters so DDP only reduces what this step trains.

    forward(source, driving: B×3×H×W, seed) → (loss, logs, outputs).
    """

    def __init__(
        self,
        model: DaGAN,
        discriminator: nn.Module,
        perceptual: nn.Module,
        cfg: TrainConfig,
        landmark_loss: nn.Module | None = None,
        cross_loss: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg.dagan
        # Plain tuple attributes: not registered as submodules, so not part of this module's parameters.
        self._critics = (discriminator, perceptual)
        self._landmark_loss = (landmark_loss,)
        self._cross_loss = (cross_loss,)
        # The mask loss needs the dense motion's logits, which the generator (an engine graph, the
        # same for every backend) does not return: a hook on its mask conv keeps the latest ones.
        self._mask_logits: torch.Tensor | None = None
        if self.cfg.weights.landmark_mask > 0:
            model.generator.dense_motion_network.mask.register_forward_hook(self._keep_mask_logits)

    def _keep_mask_logits(self, _module: nn.Module, _inputs, logits: torch.Tensor) -> None:
        self._mask_logits = logits

    def _keypoints(self, image: torch.Tensor):
        depth = None
        if self.model.depth_net is not None:
            with torch.no_grad():
                depth = self.model.depth_net(image)
        return self.model.detect_keypoints(image, depth), depth

    def _cross_avatar(self, source, depth_s, kp_s, kp_d) -> tuple[torch.Tensor, torch.Tensor]:
        """Item i's photo driven by item i−1's motion since its own source frame (relative, movement
        scale adapted, as the server). Items of a batch come from random clips, so the driver is
        mostly another person. Returns (avatar B×3×H×W, the driver's index per item)."""
        order = torch.roll(torch.arange(source.shape[0], device=source.device), 1)
        reference, driver = _swap(kp_s, order), _swap(kp_d, order)
        moved = relative_keypoints(
            kp_s,
            driver,
            reference,
            movement_scale(kp_s, reference),
            jacobian_gain=self.model.config.keypoints.jacobian_gain,
        )
        avatar = self.model.generator(source, depth_s, kp_s, moved).prediction
        self._mask_logits = None  # the mask hook fired again: those logits are not the mask loss's
        return avatar, order

    def _reshaped_pair(self, source, driving, kp_s, kp_d, seed: int, pitch=None) -> torch.Tensor:
        """``weights.reshaped_pair`` (unweighted): one random smooth warp T per item (``dagan.reshape``)
        makes T(source) and T(driving), a face of another shape making the same motion; T(source) is
        driven by the unwarped frames' motion kp_d − kp_s, relative with the movement scale as the
        server drives a photo, and the avatar must be T(driving). The plain transfer (Jacobian gain 1):
        T(driving) is the motion as it happened, not as far as the engine may take it. Where T reaches
        past the frame both warped frames show its mirror: there the avatar is not charged (it is
        replaced by the target), or the generator learns to draw mirrored streaks at the frame's edge.
        ``pitch`` (B degrees, ``dagan.reshape_nod``): the driving frame's head pitch since the source
        frame's, added to T(source)'s keypoints as the engine nods a photo of another person."""
        _, perceptual = self._critics
        t = self.cfg.reshape
        gen = torch.Generator().manual_seed(seed + 1)  # not the equivariance warp's draw
        warp = L.RandomTransform(
            source.shape[0], t.sigma_affine, t.sigma_tps, t.points_tps, generator=gen, device=source.device
        )
        shaped_source, shaped_driving = warp.transform_frame(torch.cat([source, driving], 1)).chunk(2, 1)
        kp_t, depth_t = self._keypoints(shaped_source)
        moved = relative_keypoints(kp_t, kp_d, kp_s, movement_scale(kp_t, kp_s))
        if pitch is not None:
            moved = nod_keypoints(kp_t, moved, pitch.to(moved.value), self.cfg.reshape_nod)
        avatar = self.model.generator(shaped_source, depth_t, kp_t, moved).prediction
        self._mask_logits = None  # the mask hook fired again: those logits are not the mask loss's
        inside = warp.inside(*avatar.shape[-2:]).to(avatar.dtype)
        avatar = inside * avatar + (1 - inside) * shaped_driving
        return perceptual(avatar, shaped_driving)

    def forward(self, source: torch.Tensor, driving: torch.Tensor, seed: int, landmarks=None):
        discriminator, perceptual = self._critics
        w, g = self.cfg.weights, self.cfg
        flow_marks = pitch = None
        if landmarks is not None and g.reshape_nod > 0:  # the pose points come last (dataset())
            n = len(POSE_POINTS)
            pitch = head_pitches(
                landmarks[0][:, -n:],
                landmarks[1][:, -n:],
                source.shape[-2:],
                self.model.config.nod.max_degrees,
            )
            landmarks = (landmarks[0][:, :-n], landmarks[1][:, :-n])
            if landmarks[0].shape[1] == 0:  # no other term reads the tracks
                landmarks = None
        if landmarks is not None:  # the anchors (one per keypoint), then dagan.flow_points (flow loss only)
            k = len(g.kp_landmark_points)
            flow_marks = landmarks
            landmarks = (landmarks[0][:, :k], landmarks[1][:, :k])
        kp_s, depth_s = self._keypoints(source)
        kp_d, depth_d = self._keypoints(driving)
        out = self.model.generator(source, depth_s, kp_s, kp_d)
        mask_logits, self._mask_logits = self._mask_logits, None  # this forward's (the hook above)
        pred = out.prediction
        logs: dict[str, float] = {}
        terms: dict[str, torch.Tensor] = {}
        terms["perceptual"] = w.perceptual * perceptual(pred, driving)
        if w.gan > 0 or w.feature_matching > 0:
            b = driving.shape[0]
            scores = discriminator(torch.cat([driving, pred], dim=0))
            fake = [v[1][b:] for v in scores.values()]
            real_feats = [[f[:b] for f in v[0]] for v in scores.values()]
            fake_feats = [[f[b:] for f in v[0]] for v in scores.values()]
            terms["gan"] = w.gan * L.lsgan_generator_loss(fake)
            terms["feature_matching"] = w.feature_matching * L.feature_matching_loss(real_feats, fake_feats)
        if w.equivariance_value > 0 or w.equivariance_jacobian > 0:
            gen = torch.Generator().manual_seed(seed)
            tr = L.RandomTransform(
                driving.shape[0],
                g.transform.sigma_affine,
                g.transform.sigma_tps,
                g.transform.points_tps,
                generator=gen,
                device=driving.device,
            )
            kp_t, _ = self._keypoints(tr.transform_frame(driving))
            value, jac = L.equivariance_losses(kp_d.value, kp_d.jacobian, kp_t.value, kp_t.jacobian, tr)
            terms["equivariance_value"] = w.equivariance_value * value
            if jac is not None and w.equivariance_jacobian > 0:
                terms["equivariance_jacobian"] = w.equivariance_jacobian * jac
        exempt = None
        if landmarks is not None and g.kp_landmark_focus:
            exempt = _close_focus_pairs(landmarks, g.kp_landmark_focus, g.kp_distance_threshold)
        if w.kp_distance > 0:
            ls, ss = L.keypoint_distance_loss(
                kp_s.value, g.kp_distance_threshold, None if exempt is None else exempt[0]
            )
            ld, sd = L.keypoint_distance_loss(
                kp_d.value, g.kp_distance_threshold, None if exempt is None else exempt[1]
            )
            terms["kp_distance"] = w.kp_distance * (ls + ld)
            logs["kp_distance_eq13"] = float(ss + sd)
        if w.kp_landmarks > 0 and landmarks is not None:
            terms["kp_landmarks"] = w.kp_landmarks * (
                L.landmark_prior_loss(kp_s.value, landmarks[0])
                + L.landmark_prior_loss(kp_d.value, landmarks[1])
            )
        if landmarks is not None and (w.kp_landmark_motion > 0 or w.landmark_flow > 0):
            # per anchor point (the config checks the focus positions when these terms are on): the
            # expression points (eyelids, lips) count focus_weight times in both terms below
            point_w = torch.ones(kp_d.value.shape[1], device=pred.device)
            point_w[list(g.kp_landmark_focus)] = g.kp_landmark_focus_weight
        if w.kp_landmark_motion > 0 and landmarks is not None:
            terms["kp_landmark_motion"] = w.kp_landmark_motion * L.landmark_motion_loss(
                kp_s.value, kp_d.value, landmarks[0], landmarks[1], point_w
            )
        if w.landmark_flow > 0 and flow_marks is not None:
            extra = flow_marks[0].shape[1] - point_w.shape[0]
            flow_w = torch.cat([point_w, point_w.new_ones(extra)])
            terms["landmark_flow"] = w.landmark_flow * L.landmark_flow_loss(
                out.deformation, flow_marks[0], flow_marks[1], flow_w
            )
        if w.landmark_mask > 0 and landmarks is not None:
            terms["landmark_mask"] = w.landmark_mask * L.landmark_mask_loss(
                mask_logits, landmarks[1], g.kp_landmark_focus
            )
        if w.region_l1 > 0 and landmarks is not None:
            focus = landmarks[1][:, list(g.kp_landmark_focus)]
            mask = L.landmark_region_mask(focus, tuple(pred.shape[-2:]), g.region_sigma)
            terms["region_l1"] = w.region_l1 * L.region_l1_loss(pred, driving, mask)
        (landmark_loss,) = self._landmark_loss
        if landmark_loss is not None and landmarks is not None:
            terms["face_landmarks"] = w.face_landmarks * landmark_loss(pred, driving, landmarks[1])
        if w.reshaped_pair > 0:
            terms["reshaped_pair"] = w.reshaped_pair * self._reshaped_pair(
                source, driving, kp_s, kp_d, seed, pitch
            )
        (cross_loss,) = self._cross_loss
        avatar = None
        if (w.cross_motion > 0 or w.cross_gan > 0 or w.cross_chroma > 0) and source.shape[0] > 1:
            avatar, order = self._cross_avatar(source, depth_s, kp_s, kp_d)
            if cross_loss is not None and landmarks is not None:
                terms["cross_motion"] = w.cross_motion * cross_loss(
                    avatar, source, landmarks[0], landmarks[0][order], landmarks[1][order]
                )
            if w.cross_gan > 0:
                scores = discriminator(avatar)
                terms["cross_gan"] = w.cross_gan * L.lsgan_generator_loss([v[1] for v in scores.values()])
            if w.cross_chroma > 0:
                terms["cross_chroma"] = w.cross_chroma * L.chroma_range_loss(avatar, source)
        loss = sum(terms.values())
        logs.update({k: float(v.detach()) for k, v in terms.items()})
        logs["loss"] = float(loss.detach())
        logs["l1"] = float((pred.detach().float() - driving.float()).abs().mean())
        outputs = {
            "prediction": pred,
            "depth_driving": None if depth_d is None else depth_d.detach(),
            "kp_driving": kp_d.value.detach(),
            "cross_avatar": None if avatar is None else avatar.detach(),
        }
        return loss, logs, outputs


def head_pitches(source: torch.Tensor, driving: torch.Tensor, size, max_degrees: float) -> torch.Tensor:
    """B degrees: each driving frame's head pitch since its source frame's, as the engine reads a driver
    (:func:`dagan.head_pose.pitch_since`), from the :data:`dagan.head_pose.POSE_POINTS` tracks (B×9×2
    each, the keypoints' [−1, 1] frame, NaN without a face) of frames of ``size`` (H, W); 0 where either
    frame has no face, clipped to ± ``max_degrees`` as the engine clips a driver's (``nod.max_degrees``)."""
    h, w = int(size[0]), int(size[1])
    scale = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)

    def pixels(t: torch.Tensor):  # inverse of training.data's [−1, 1] mapping of pixel centres
        return ((t.detach().double().cpu() + 1) * scale + 0.5).numpy()

    out = torch.zeros(source.shape[0])
    for i, (a, b) in enumerate(zip(pixels(source), pixels(driving), strict=True)):
        ra, rb = rotation_from_points(a, (h, w)), rotation_from_points(b, (h, w))
        if ra is not None and rb is not None:
            value = pitch_since(ra, rb)
            out[i] = max(-max_degrees, min(max_degrees, value)) if math.isfinite(value) else 0.0
    return out


def _swap(kp: Keypoints, order: torch.Tensor) -> Keypoints:
    return Keypoints(kp.value[order], None if kp.jacobian is None else kp.jacobian[order])


def frozen_modules(model: DaGAN, paths: tuple[str, ...]) -> list[nn.Module]:
    """Take the gradient off the modules named by ``dagan.frozen``; the stage keeps them in eval mode.

    Raises TrainingError for a path the model does not have, naming what it has at the top level."""
    modules = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            top = ", ".join(n for n, _ in model.generator.named_children())
            raise TrainingError(
                f"dagan.frozen: the model has no module {path!r}; kp_detector, generator or one of "
                f"generator.{{{top}}} (or a path below them)"
            ) from None
        module.requires_grad_(False)
        modules.append(module)
    if modules and not _trainable(model.generator) + _trainable(model.kp_detector):
        raise TrainingError("dagan.frozen leaves nothing to train: free at least one module")
    return modules


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _close_focus_pairs(
    landmarks: tuple[torch.Tensor, torch.Tensor], focus: tuple[int, ...], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame (source, driving), B×K×K: pairs of focus keypoints whose landmarks lie closer than the
    eq. 13 threshold (L1). Those pairs (upper and lower lip, the two lids of an eye) are exempt from the
    keypoint distance loss, which would otherwise push them off the points the prior anchors them to."""
    out = []
    for marks in landmarks:
        k = marks.shape[1]
        is_focus = torch.zeros(k, dtype=torch.bool, device=marks.device)
        is_focus[list(focus)] = True
        dist = (marks[:, :, None, :] - marks[:, None, :, :]).abs().sum(-1)  # NaN where a point is missing
        close = torch.nan_to_num(dist, nan=float("inf")) < threshold
        out.append(close & is_focus.view(1, k, 1) & is_focus.view(1, 1, k))
    return out[0], out[1]
