"""The training config: one YAML file for both stages, validated as strictly as the model config.

It follows :mod:`dagan.config` exactly (frozen dataclasses, unknown keys and wrong types are errors naming
the full key path) and builds itself with its public :func:`dagan.config.build_dataclass` and
:func:`dagan.config.to_plain`. The ``model`` key holds the *model* config — a preset name
(``vox-256``, ``tiny``), a path to a model YAML, or the model config inline — and is resolved with
:func:`dagan.config.load_config`, so the same network definition ends up embedded in every checkpoint.

Defaults are the paper's (λP = 10, λG = 1, λE = 10, λD = 10, Pe α = 0.8, keypoint distance threshold
0.2, pyramid scales 256/128/64/32 for 256×256 images) and FOMM's where the paper defers to it
(augmentation strengths, Adam β = (0.5, 0.999), lr 2e-4, TPS/affine transform scales).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dagan.config import ConfigError, ModelConfig, build_dataclass, load_config, set_dotted, to_plain

PRECISIONS = ("fp32", "bf16", "fp16")


# The face-mesh points of the inner upper and lower lip: what model.keypoints.mouth_keypoints must be
# anchored to when the landmark prior trains them (the lip-opening gain pushes them apart).
INNER_LIPS = (13, 14)


@dataclass(frozen=True)
class AugmentConfig:
    """FOMM-style augmentation, applied identically to every frame drawn from one video."""

    flip: bool = True  # horizontal flip with probability 0.5
    brightness: float = 0.1  # factor drawn from [1 − b, 1 + b]
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.1  # hue shift drawn from [−h, h] of a full turn


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # dataset root holding train/<video>/ and test/<video>/
    repeats: int = 75  # each video is visited this many times per epoch (FOMM's num_repeats for vox)
    workers: int = 2  # DataLoader worker processes per training process
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class DepthStageConfig:
    """Stage 1: self-supervised face depth (paper §3.2) with monodepth2's loss machinery."""

    steps: int = 100_000
    batch_size: int = 12
    lr: float = 1e-4
    lr_milestones: tuple[int, ...] = ()  # steps at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    # Frame offsets of the source frames relative to the target frame I_i; (1,) is the paper's pair
    # (I_i, I_i+1); (-1, 1) adds I_i-1 so the per-pixel minimum reprojection can pick the unoccluded one.
    source_offsets: tuple[int, ...] = (-1, 1)
    ssim_alpha: float = 0.8  # paper eq. 5 (monodepth2 uses 0.85)
    smoothness: float = 1e-3  # edge-aware smoothness weight (divided by 2^scale)
    min_reprojection: bool = True  # per-pixel minimum over source frames (else the mean)
    automask: bool = True  # ignore pixels that an unwarped source explains better (static pixels)
    # Distillation from a trained depth net (a checkpoint with depth_net.* tensors and its own config):
    # ``distill`` × mean |D − D_teacher| on the full-resolution disparities is added to the
    # photometric loss. What a cheaper variant (model.depth.input_scale < 1) trains with, so the
    # keypoint detector and the attention downstream keep seeing the depth they were trained on.
    teacher: str = ""
    distill: float = 0.0


# mediapipe face-mesh points that bound the face for the face-landmark loss (training/landmark_loss.py):
# left and right cheek at the jaw, forehead top, chin.
FACE_BOX_POINTS = (234, 454, 10, 152)

# The face-mesh points the cross-identity term reads on the driver (training/landmark_loss.py): inner
# lips (13 upper, 14 lower), the lids of both eyes (159 / 145, 386 / 374) and the nose tip (1).
CROSS_MESH_POINTS = (13, 14, 159, 145, 386, 374, 1)

# The face-mesh points ``dagan.flow_points`` is meant for: mediapipe's lip contours (outer and inner,
# 40), both eyes' lid contours (32), and the chin and jaw below the mouth that drop when it opens (13).
# `dagan pack-data` keeps these tracks by default beside the anchors, so a packed copy serves a recipe
# that reads any of them.
EXPRESSION_MESH_POINTS: tuple[int, ...] = (
    # lips
    0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181,
    185, 191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415,
    # the subject's left eye, then the right
    249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466,
    7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246,
    # below the lower lip, the chin, the jaw
    18, 200, 199, 175, 152, 148, 176, 149, 150, 377, 400, 378, 379,
)  # fmt: skip


@dataclass(frozen=True)
class LossWeights:
    perceptual: float = 10.0  # λP
    gan: float = 1.0  # λG, LSGAN generator term
    feature_matching: float = 10.0  # discriminator feature matching, per discriminator layer (FOMM)
    equivariance_value: float = 10.0  # λE on keypoint positions (paper eq. 12)
    equivariance_jacobian: float = 10.0  # λE on the local affine Jacobians (FOMM; 0 disables)
    kp_distance: float = 10.0  # λD (paper eq. 13), applied to source and driving keypoints
    # Optional keypoint prior: L1 between the K keypoints and the K face-mesh landmarks
    # dagan.kp_landmark_points, tracked beside the frames (<clip>/landmarks478.npy, `dagan landmarks`);
    # 0 = the paper's purely unsupervised keypoints.
    kp_landmarks: float = 0.0
    # The prior on motion: L1 between each keypoint's source→driving displacement and its landmark's,
    # the quantity relative motion transfers to another face; focus points count focus_weight times.
    kp_landmark_motion: float = 0.0
    # L1 of the prediction weighted towards the driving frame's mouth and eyes (Gaussians of width
    # dagan.region_sigma at the focus landmarks), so the small motions that carry expression are not
    # drowned by the rest of the face.
    region_l1: float = 0.0
    # L1 between face-api's 68 landmarks on the prediction and on the driving frame, both cropped by the
    # driving frame's face box (training/landmark_loss.py): the mouth's and eyes' positions themselves.
    # In fractions of the box (0.01 ≈ 1 px of a 100-px face): ~100 makes it count. Needs
    # dagan.face_landmark_weights and the box points (10, 152, 234, 454) among kp_landmark_points.
    face_landmarks: float = 0.0
    # L1 between the generator's backward flow sampled at the driving frame's landmarks and the source
    # frame's landmarks: where the warp must fetch each lip, lid and face point from. The motion masks
    # otherwise let a lip be carried by a mouth-corner or nose keypoint, so a lip keypoint that moves
    # does not open the warp (docs/training.md, "Keypoint prior"); focus points count focus_weight times.
    landmark_flow: float = 0.0
    # −log of the motion mask's weight for keypoint k at its anchor landmark in the driving frame, over
    # the focus points (eyelids, mouth): the lips and lids take their own keypoints' motion instead of a
    # mouth-corner's or the nose's (training.losses.landmark_mask_loss). ~1 makes it count.
    landmark_mask: float = 0.0
    # The cross-identity term: each item's photo is also driven by another item's motion (relative, with
    # movement-scale adaptation, as the server runs it), and face-api's landmarks on that avatar must
    # move from the photo's by what the driver's face-mesh landmarks moved: mouth opening, eye opening,
    # nose tip, in fractions of each face's box (training.landmark_loss.CrossMotionLoss). One more
    # generator pass per step. Needs dagan.face_landmark_weights, and CROSS_MESH_POINTS and the box
    # points among kp_landmark_points; ~100 makes it count.
    cross_motion: float = 0.0
    # LSGAN on that cross-identity avatar: the discriminator also sees it as a fake and the generator is
    # charged (1 − D(avatar))². Without it the cross term is scored by face-api alone, which a generator
    # can fool by painting a coloured blob where a mouth should open (weights/README.md, "The
    # cross-identity term"); feature matching needs a real frame of the same pose, so it is left out.
    # Makes the cross-identity pass on its own when cross_motion is 0.
    cross_gan: float = 0.0
    # The cross-identity avatar's chroma (Cb, Cr) must stay between neutral and the photo's own colours
    # near each pixel, ± 0.02 (training.losses.chroma_range_loss): the colour blobs that fooled face-api
    # cost, a dark mouth, teeth and the photo's lips do not. Mean over pixels: ~1e4 makes it count.
    # Makes the cross-identity pass when the terms above are 0.
    cross_chroma: float = 0.0
    # The reshaped pair: the item's source and driving frames both warped by one random smooth warp T
    # (dagan.reshape: another face shape that moves exactly as this one), T(source) driven by the
    # unwarped frames' motion (relative, movement scale adapted, as the server drives a photo of another
    # person), and the avatar scored against T(driving) with the perceptual loss: a cross-identity pair
    # with a ground truth, for a generator that tears a face whose keypoints got another face's turn.
    # One more generator pass per step; ~10 (the perceptual weight) makes it count as much as the frame
    # itself. Measured on the bundled file, not shipped (weights/README.md, "Reshaped pairs and the torn
    # turn").
    reshaped_pair: float = 0.0

    @property
    def reads_landmarks(self) -> bool:
        """Whether a term reads the face-mesh tracks (the keypoint prior and the terms beside it)."""
        prior = (
            self.kp_landmarks,
            self.kp_landmark_motion,
            self.region_l1,
            self.face_landmarks,
            self.cross_motion,
        )
        return any(v > 0 for v in (*prior, self.landmark_flow, self.landmark_mask))


@dataclass(frozen=True)
class TransformConfig:
    """Random transforms for the equivariance loss: affine + thin-plate spline (FOMM's scales)."""

    sigma_affine: float = 0.05
    sigma_tps: float = 0.005
    points_tps: int = 5


@dataclass(frozen=True)
class DaganStageConfig:
    """Stage 2: keypoint detector + generator + discriminator, depth net frozen (paper §3.5, eq. 10)."""

    steps: int = 150_000
    batch_size: int = 16
    lr_generator: float = 2e-4
    lr_kp_detector: float = 2e-4
    lr_discriminator: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    weights: LossWeights = field(default_factory=LossWeights)
    # Image pyramid of the perceptual loss, as fractions of image_size (256/128/64/32 at 256).
    pyramid_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    # Local torchvision-format VGG19 weights (vgg19-dcbb9e9d.pth or a safetensors copy). Empty: no
    # ImageNet VGG available, the documented substitute loss is used and training says so loudly.
    vgg19_weights: str = ""
    # face-api's landmark-68 model (a `dagan fetch-eval-assets` folder or its manifest): the perceptual
    # term uses its features when no VGG19 is configured (training/perceptual.py).
    face_landmark_weights: str = ""
    kp_distance_threshold: float = 0.2
    # Face-mesh points (mediapipe indices) the keypoint prior anchors keypoint k to, one per keypoint:
    # upper/lower eyelid of each eye (blinks), nose tip, mouth corners, inner upper/lower lip (mouth
    # opening), chin, both cheeks at the jaw (yaw), both brows, forehead.
    kp_landmark_points: tuple[int, ...] = (
        159,
        145,
        386,
        374,
        1,
        61,
        291,
        13,
        14,
        152,
        234,
        454,
        105,
        334,
        10,
    )
    # Positions in kp_landmark_points of the expression points (eyelids, mouth): weighted in the motion
    # prior, centres of the region loss, and exempt from eq. 13 among themselves when their landmarks
    # are closer than the threshold (eq. 13 would push an upper and a lower lip keypoint apart).
    kp_landmark_focus: tuple[int, ...] = (0, 1, 2, 3, 5, 6, 7, 8)
    kp_landmark_focus_weight: float = 4.0
    # Face-mesh points where weights.landmark_flow also reads the warp, beside the anchors above (each
    # counts 1, an anchor 1 or focus_weight). The 15 anchors hold one point per lip; the other lip and
    # lid pixels may still be carried by a mouth-corner keypoint. E.g. EXPRESSION_MESH_POINTS.
    flow_points: tuple[int, ...] = ()
    region_sigma: float = 0.08  # in the [−1, 1] frame (0.08 ≈ 5 px at 128 px)
    # Share of (source, driving) pairs whose driving frame is the most different in expression (focus
    # landmarks) of 8 random frames of the clip; 0 = uniform pairs, as the paper.
    expressive_pairs: float = 0.0
    # Submodules of the model that keep the weights they start with (--init): no gradient, and eval mode
    # so their BatchNorm statistics stay too. Module paths under kp_detector or generator, e.g.
    # [kp_detector, generator.image_encoder]: a fine-tune that should teach one part (the motion
    # network) without the rest drifting away from what it already does well.
    frozen: tuple[str, ...] = ()
    # weights.cross_motion's four signals: mouth opening, eye opening, nose tip x, nose tip y (weighted
    # mean). The nose reads head motion, but sliding the face satisfies it as well as turning it.
    cross_motion_signals: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # face-api reads the cross-identity avatar and its photo as luminance: a colour blob on the mouth
    # then no longer fools it (training.landmark_loss.CrossMotionLoss).
    cross_motion_gray: bool = False
    transform: TransformConfig = field(default_factory=TransformConfig)
    # weights.reshaped_pair's warp: how far another face's shape may be from this one's. Affine 0.1: width
    # and height ±10 %, a roll of a few degrees, a shift of 5 % of the frame; the spline bends the
    # features' layout by a few pixels, as FOMM's equivariance warp does.
    reshape: TransformConfig = field(
        default_factory=lambda: TransformConfig(sigma_affine=0.1, sigma_tps=0.005, points_tps=5)
    )
    # The engine's nod inside the reshaped pair: T(source)'s transferred keypoints are nodded, as the
    # engine nods a photo of another person (dagan.nod.nod_keypoints over the bump, this gain; the
    # bundled model's nod.gain is 2), by the head pitch between the unwarped source and driving frames,
    # read from their face-mesh tracks as the engine reads a driver (dagan.head_pose). Why: the keypoints
    # do not carry a nod to another face, the engine adds one, and the generator has never been shown
    # keypoints nodded that way beside a frame that really nods. 0: off. Needs weights.reshaped_pair
    # and the tracks of dagan.head_pose.POSE_POINTS.
    reshape_nod: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    depth: DepthStageConfig = field(default_factory=DepthStageConfig)
    dagan: DaganStageConfig = field(default_factory=DaganStageConfig)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    grad_clip: float = 0.0  # max global gradient norm per optimizer; 0 disables clipping
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # older step checkpoints are deleted
    log_every: int = 20  # TensorBoard scalars
    image_every: int = 500  # TensorBoard image grids
    device: str = "auto"  # auto | cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)
    sync_batchnorm: bool = True  # SyncBatchNorm for multi-GPU runs (not available on CPU/gloo)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainConfig:
        """Copy with dotted-path overrides, e.g. ``replace(**{"dagan.batch_size": 4})``."""
        return train_config_from_dict(set_dotted(self.to_dict(), changes, kind=_KIND))


_KIND = "training config"  # error messages say "unknown training config key: ..."


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a plain dict (e.g. parsed YAML); missing keys take the defaults above."""
    if not isinstance(data, dict):
        raise ConfigError(f"training config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    model_source = data.pop("model", "vox-256")
    if not isinstance(model_source, str | dict):
        raise ConfigError("model: expected a preset name, a model YAML path or a mapping")
    try:
        model = load_config(model_source)
    except ConfigError as exc:
        raise ConfigError(f"model: {exc}") from exc
    rest = build_dataclass(TrainConfig, data)
    cfg = dataclasses.replace(rest, model=model)
    _check_semantics(cfg)
    return cfg


def load_train_config(
    source: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A training YAML path, a dict, or None (all defaults), then dotted ``overrides`` on top."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"training config {source} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: training config must be a mapping")
    if overrides:
        # Overrides of model.* keys need the model section as a full dict first.
        if any(k.startswith("model.") for k in overrides):
            data["model"] = load_config(data.get("model", "vox-256")).to_dict()
        data = set_dotted(train_config_from_dict(data).to_dict(), overrides, kind=_KIND)
    return train_config_from_dict(data)


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value parsed as YAML (``4``, ``1e-4``, ``true``, ``[1, 2]``, text)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def _check_semantics(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
    need(cfg.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
    need(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(cfg.log_every >= 1, "log_every", "must be >= 1")
    need(cfg.image_every >= 1, "image_every", "must be >= 1")
    need(cfg.data.repeats >= 1, "data.repeats", "must be >= 1")
    need(cfg.data.workers >= 0, "data.workers", "must be >= 0")
    a = cfg.data.augment
    for key, v in (("brightness", a.brightness), ("contrast", a.contrast), ("saturation", a.saturation)):
        need(0 <= v < 1, f"data.augment.{key}", "must be in [0, 1)")
    need(0 <= a.hue <= 0.5, "data.augment.hue", "must be in [0, 0.5]")
    d = cfg.depth
    need(d.steps >= 1, "depth.steps", "must be >= 1")
    need(d.batch_size >= 1, "depth.batch_size", "must be >= 1")
    need(d.lr > 0, "depth.lr", "must be > 0")
    need(0 <= d.ssim_alpha <= 1, "depth.ssim_alpha", "must be in [0, 1]")
    need(d.smoothness >= 0, "depth.smoothness", "must be >= 0")
    need(d.distill >= 0, "depth.distill", "must be >= 0")
    need(d.distill == 0 or bool(d.teacher), "depth.teacher", "depth.distill > 0 needs a teacher checkpoint")
    need(
        len(d.source_offsets) >= 1 and all(o != 0 for o in d.source_offsets),
        "depth.source_offsets",
        "needs at least one non-zero frame offset",
    )
    g = cfg.dagan
    need(g.steps >= 1, "dagan.steps", "must be >= 1")
    need(g.batch_size >= 1, "dagan.batch_size", "must be >= 1")
    for key in ("lr_generator", "lr_kp_detector", "lr_discriminator"):
        need(getattr(g, key) > 0, f"dagan.{key}", "must be > 0")
    need(0 <= g.beta1 < 1 and 0 <= g.beta2 < 1, "dagan.beta1", "betas must be in [0, 1)")
    need(
        len(g.pyramid_scales) >= 1 and all(0 < s <= 1 for s in g.pyramid_scales),
        "dagan.pyramid_scales",
        "needs scales in (0, 1]",
    )
    need(g.kp_distance_threshold >= 0, "dagan.kp_distance_threshold", "must be >= 0")
    for name, t in (("transform", g.transform), ("reshape", g.reshape)):
        need(t.points_tps >= 2, f"dagan.{name}.points_tps", "must be >= 2")
        need(t.sigma_affine >= 0 and t.sigma_tps >= 0, f"dagan.{name}", "sigmas must be >= 0")
    for key, value in dataclasses.asdict(g.weights).items():
        need(value >= 0, f"dagan.weights.{key}", "must be >= 0")
    need(g.reshape_nod >= 0, "dagan.reshape_nod", "must be >= 0")
    if g.reshape_nod > 0:
        need(
            g.weights.reshaped_pair > 0,
            "dagan.reshape_nod",
            "nods the reshaped pair: needs weights.reshaped_pair > 0",
        )
        need(
            not cfg.data.augment.flip,
            "dagan.reshape_nod",
            "reads the head pose from named mesh points, which a mirror swaps: set data.augment.flip false",
        )
    w = g.weights
    if w.face_landmarks > 0:
        need(
            bool(g.face_landmark_weights),
            "dagan.face_landmark_weights",
            "weights.face_landmarks needs face-api's landmark-68 net: a `dagan fetch-eval-assets` folder",
        )
        need(
            all(p in g.kp_landmark_points for p in FACE_BOX_POINTS),
            "dagan.kp_landmark_points",
            "weights.face_landmarks boxes the face by mesh points 10, 152, 234 and 454: include them",
        )
    need(
        len(g.cross_motion_signals) == 4
        and all(v >= 0 for v in g.cross_motion_signals)
        and sum(g.cross_motion_signals) > 0,
        "dagan.cross_motion_signals",
        "four weights >= 0 (mouth, eyes, nose x, nose y), not all 0",
    )
    if w.cross_motion > 0:
        need(
            bool(g.face_landmark_weights),
            "dagan.face_landmark_weights",
            "weights.cross_motion reads the avatar with face-api's landmark-68 net: a "
            "`dagan fetch-eval-assets` folder",
        )
        need(
            all(p in g.kp_landmark_points for p in (*FACE_BOX_POINTS, *CROSS_MESH_POINTS)),
            "dagan.kp_landmark_points",
            f"weights.cross_motion reads mesh points {sorted({*FACE_BOX_POINTS, *CROSS_MESH_POINTS})}: "
            "include them",
        )
    if w.reads_landmarks:
        k = cfg.model.keypoints.num_kp
        need(
            len(g.kp_landmark_points) == k,
            "dagan.kp_landmark_points",
            f"needs one face-mesh point per keypoint ({k}), got {len(g.kp_landmark_points)}",
        )
        need(
            all(0 <= p < 478 for p in g.kp_landmark_points),
            "dagan.kp_landmark_points",
            "mediapipe face-mesh indices are 0..477",
        )
        need(
            all(0 <= p < 478 for p in g.flow_points),
            "dagan.flow_points",
            "mediapipe face-mesh indices are 0..477",
        )
        mouth = cfg.model.keypoints.mouth_keypoints
        need(
            not mouth
            or len(g.kp_landmark_points) != k
            or tuple(g.kp_landmark_points[i] for i in mouth) == INNER_LIPS,
            "model.keypoints.mouth_keypoints",
            f"names keypoints {list(mouth)} as the inner lips, but dagan.kp_landmark_points anchors them to "
            f"mesh points {[g.kp_landmark_points[i] for i in mouth if i < len(g.kp_landmark_points)]}, "
            f"not {list(INNER_LIPS)}",
        )
        need(
            all(0 <= i < k for i in g.kp_landmark_focus),
            "dagan.kp_landmark_focus",
            f"positions in kp_landmark_points, 0..{k - 1}",
        )
    need(g.kp_landmark_focus_weight >= 0, "dagan.kp_landmark_focus_weight", "must be >= 0")
    need(g.region_sigma > 0, "dagan.region_sigma", "must be > 0")
    need(0 <= g.expressive_pairs <= 1, "dagan.expressive_pairs", "must be in [0, 1]")
    need(
        all(p.split(".")[0] in ("kp_detector", "generator") for p in g.frozen),
        "dagan.frozen",
        "module paths under kp_detector or generator (the depth net is always frozen in this stage)",
    )
    for stage in ("depth", "dagan"):
        ms = getattr(cfg, stage).lr_milestones
        need(list(ms) == sorted(ms) and all(m > 0 for m in ms), f"{stage}.lr_milestones", "must increase")
