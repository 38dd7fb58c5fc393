"""The one configuration schema shared by training, export and the inference engine.

A config is a tree of frozen dataclasses. YAML is validated strictly when loaded: an unknown key or a
value of the wrong type is an error that names the full key path (``generator.attention.qk_channels``),
because a silently ignored typo in a model config produces a network that cannot load its weights later.

Presets ship with the package (:data:`PRESETS`): ``vox-256`` (the reference implementation's sizes, so
that published DaGAN checkpoints can be imported), ``fomm`` (FOMM's RGB model, for its checkpoints),
``tiny`` (small channels at 64×64, for tests and CPU experiments) and ``live-128`` (the real-time
128×128 model with warped skips).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

PRESETS = ("vox-256", "tiny", "fomm", "live-128")


#: The largest lip-opening gain a config or a session may ask for: beyond it the lips tear apart.
MAX_MOUTH_GAIN = 4.0

#: The largest Jacobian gain a config may set, above anything that was measured to help: at 1.6 a wink
#: already smears the eye (weights/README.md, "Head turns").
MAX_JACOBIAN_GAIN = 2.0


def is_mouth_gain(value: object) -> bool:
    """Whether ``value`` is a lip-opening gain a config, a session or a flag may ask for: a number (not a
    bool, not NaN) in (0, :data:`MAX_MOUTH_GAIN`]. The one definition every place that takes one uses."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_MOUTH_GAIN


class ConfigError(UserError, ValueError):
    """A config file or dict that does not match the schema; the message names the offending key."""


@dataclass(frozen=True)
class DepthConfig:
    """Face depth net F_d: ResNet18 encoder + monodepth2-style decoder (paper §3.2, A.2)."""

    encoder_width: int = 64
    decoder_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    scales: tuple[int, ...] = (0, 1, 2, 3)
    min_depth: float = 0.1
    max_depth: float = 100.0
    # The net runs on the image resized by this factor (1, 1/2 or 1/4) and its disparity is upsampled
    # back to H×W. Every consumer of the depth map works at a quarter of the resolution (the keypoint
    # detector's RGB-D input at keypoints.scale_factor, the attention's query after the depth encoder's
    # down blocks), so a half-resolution depth pass costs a quarter as much and loses little; the
    # driving frame's depth is computed every frame (docs/export.md, "Half-resolution depth").
    input_scale: float = 1.0


@dataclass(frozen=True)
class PoseConfig:
    """Pose + intrinsics net F_p, used only by the self-supervised depth stage."""

    encoder_width: int = 64


@dataclass(frozen=True)
class KeypointConfig:
    """Keypoint detector F_kp (FOMM-style hourglass with soft-argmax heatmaps)."""

    num_kp: int = 15
    use_depth: bool = True  # RGB-D input (DaGAN); False gives FOMM's RGB detector for the ablation
    block_expansion: int = 32
    max_features: int = 1024
    num_blocks: int = 5
    temperature: float = 0.1
    scale_factor: float = 0.25
    estimate_jacobian: bool = True
    # Full-resolution detail beside the blurred, downscaled input (0 = none, the paper's detector): the
    # RGB-D input cut into (1/scale_factor)² pixel blocks (pixel_unshuffle) and mixed by a 1×1 conv into
    # this many extra channels at the hourglass's resolution. A blink moves an eyelid by 2–4 px of a
    # 128-px crop, under one pixel of the 32×32 input the blur leaves; the blocks keep those pixels for
    # 0.05 GFLOP per frame at 8 channels in live-128 (weights/README.md, "Eyelid detail": measured, not
    # in the bundled file). Zero-initialised weights where these channels enter make a widened detector
    # compute exactly what it computed before (scripts/fit_detail.py).
    detail_channels: int = 0
    # The (upper, lower) inner-lip keypoints of a model trained with the landmark prior (live-128: 7 and
    # 8, anchored to face-mesh points 13 and 14), or () when no keypoint is known to be a lip (vox-256).
    # With them, relative motion opens the avatar's mouth mouth_open_gain times as far as the driver's
    # (dagan.keypoint_ops.open_mouth): a calibration of a generator that draws an open mouth only part of
    # the way (weights/README.md, "Mouth gain"). Engine sessions may override the gain.
    mouth_keypoints: tuple[int, ...] = ()
    mouth_open_gain: float = 1.0
    # Relative motion carries the driver's local rotation and stretch since the reference (J_d J_ref⁻¹)
    # onto the photo's Jacobians; jacobian_gain g > 1 takes it further: J = J_s + g · (J_d J_ref⁻¹ J_s
    # − J_s) (dagan.keypoint_ops.relative_keypoints). Why: the bundled model turns the head mostly
    # through these Jacobians, at two thirds of the driver's turn (weights/README.md, "Head turns").
    # 1 is the paper's transfer; it needs estimate_jacobian otherwise.
    jacobian_gain: float = 1.0


@dataclass(frozen=True)
class DenseMotionConfig:
    """Dense motion / occlusion estimator T of the feature-warping module (RGB input, as the reference)."""

    block_expansion: int = 64
    max_features: int = 1024
    num_blocks: int = 5
    scale_factor: float = 0.25
    kp_variance: float = 0.01
    # Kernel of the mask and occlusion heads on the hourglass output (7 in FOMM/DaGAN). At 32×32 over
    # 80 channels the two 7×7 heads cost twice the hourglass itself on a CPU; a smaller kernel is a
    # cheaper variant, measured and not taken for the bundled weights (docs/export.md, "Smaller heads").
    head_kernel_size: int = 7


@dataclass(frozen=True)
class AttentionConfig:
    """Cross-modal attention (paper eq. 9): query from source depth features, key/value from F_w."""

    enabled: bool = True
    qk_channels: int = 32
    # "auto": fused scaled_dot_product_attention; "math": the explicit softmax(QK^T)V formula.
    implementation: str = "auto"
    # "none" is eq. 9 of the paper; the authors' released code applies ReLU to q, k and v ("relu"),
    # which imported DaGAN checkpoints need.
    activation: str = "none"
    # Keys and values from F_w average-pooled by this factor (1: every position, the paper): each depth
    # query still attends over the whole warped map, at kv_pool² fewer positions (docs/export.md).
    kv_pool: int = 1


@dataclass(frozen=True)
class GeneratorConfig:
    block_expansion: int = 64
    max_features: int = 512
    num_down_blocks: int = 2
    num_bottleneck_blocks: int = 6
    estimate_occlusion_map: bool = True
    # grid_sample convention of the feature and sparse-motion warps. True is what FOMM was trained with
    # (PyTorch 1.0); the DaGAN release was trained under PyTorch >= 1.3, whose default is False.
    warp_align_corners: bool = True
    # Also warp the image encoder's higher-resolution maps and feed them to the decoder (U-Net skips
    # through the motion); off = the paper's / reference generator, which published checkpoints need.
    warped_skips: bool = False
    # Kernel of the output conv (7 in FOMM/DaGAN); see DenseMotionConfig.head_kernel_size.
    final_kernel_size: int = 7
    dense_motion: DenseMotionConfig = field(default_factory=DenseMotionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass(frozen=True)
class BlinkConfig:
    """Blinks: the avatar's lids closed, or opened wider, as far as the driver's (:mod:`dagan.blink`).

    The generator barely moves a lid (it stretches one at a tenth of the driver's blink), so a model
    that names its lid keypoints carries a small lid reader (:mod:`dagan.nets.lid_reader`) that reads
    how open the driver's eyes are, and the engine closes the avatar's lids by a warp of its frame
    around the photo's own eyelids. Empty ``keypoints`` (vox-256, and every model before): no reader,
    no tensors, nothing changes.
    """

    # (upper, lower) lid keypoints of the image-left eye, then of the image-right eye: the keypoints the
    # landmark prior anchors to face-mesh points 159, 145, 386 and 374 (live-128: 0, 1, 2, 3).
    keypoints: tuple[int, ...] = ()
    # closure = gain × (how much less open than the driver's open eyes, as a fraction − dead_zone),
    # clipped to 1: the reader under-reads a blink (gain 0.6 of the mesh's). A reading above the
    # driver's eyes at the reference widens the avatar's the same way, by at most ``widen`` of the eye's
    # gap (0: the warp only closes). A dead zone keeps the reader's noise from moving the lids, but it
    # also drops the small changes a squint or a glance makes, and those are worth more (weights/README.md,
    # "Wider eyes").
    gain: float = 2.0
    dead_zone: float = 0.0
    widen: float = 0.4
    # The driver's open eyes for a blink: the highest reading so far, sinking towards lower ones with
    # this time constant (seconds), so a slow change of gaze or of the reader's bias is not read as a
    # blink, while a blink (0.1–0.4 s) is; never above the eyes at the reference.
    open_seconds: float = 3.0
    # The driver's eyes at the reference: the widest reading of the stream's first reference_seconds
    # (and of those after a recalibration), so a blink on the first frame is not taken for open eyes.
    reference_seconds: float = 0.5


@dataclass(frozen=True)
class MouthConfig:
    """An open mouth: the avatar's lips parted further than the generator draws them (:mod:`dagan.mouth`).

    The generator opens the avatar's mouth only part of the way, whatever the lip keypoints do, and on
    a closed-mouthed photo it stretches the lips instead of drawing an open mouth's dark. A model that
    names its lip keypoints (``keypoints.mouth_keypoints``) may set ``warp``: the engine then opens the
    avatar's mouth further by a warp of its frame around the photo's own lips, and shades the new gap
    dark. ``warp`` 0 (vox-256, and every model before): nothing changes.
    """

    # Pixels of extra opening per pixel the rendered lip keypoints opened beyond the photo's.
    warp: float = 0.0
    # How dark the stretched gap is shaded: × the share of the gap that is new (clipped to 1).
    shade: float = 5.0
    # A photo whose lips are already apart by more than this × its mouth's width is not warped.
    open_photo: float = 0.25


@dataclass(frozen=True)
class NodConfig:
    """The nod: the avatar's head pitched as far as the driver's, read from the driver's face mesh
    (:mod:`dagan.nod`).

    The keypoint detectors trained here do not see a nod, so the engine measures the driver's pitch since
    the reference frame with the face mesh and nods the photo's keypoints by it, as a rotation of a
    rounded face would move them. ``gain`` 0 (vox-256, and every model before): nothing changes.
    """

    # The bump's depth in units of the keypoints' spread: how far a degree of the driver's nod moves the
    # photo's keypoints. 2 nods the avatar about as far as the driver on held-out pairs.
    gain: float = 0.0
    # The largest nod passed on, degrees either way: beyond it the face-mesh reading is unreliable and
    # the bump model far from a face.
    max_degrees: float = 30.0


@dataclass(frozen=True)
class DiscriminatorConfig:
    scales: tuple[float, ...] = (1.0,)
    block_expansion: int = 32
    max_features: int = 512
    num_blocks: int = 4
    spectral_norm: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the networks; embedded in every checkpoint."""

    name: str = "vox-256"
    image_size: int = 256
    depth: DepthConfig = field(default_factory=DepthConfig)
    pose: PoseConfig = field(default_factory=PoseConfig)
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    blink: BlinkConfig = field(default_factory=BlinkConfig)
    mouth: MouthConfig = field(default_factory=MouthConfig)
    nod: NodConfig = field(default_factory=NodConfig)

    @property
    def needs_depth(self) -> bool:
        """Whether any module consumes a depth map (the RGB-D keypoint detector or the cross-modal
        attention); without it the model has no depth net and no graph computes depth."""
        return self.keypoints.use_depth or self.generator.attention.enabled

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with dotted-path overrides, e.g. ``replace(**{"generator.attention.enabled": False})``."""
        return config_from_dict(set_dotted(self.to_dict(), changes))


def set_dotted(data: dict[str, Any], changes: dict[str, Any], kind: str = "config") -> dict[str, Any]:
    """Set each dotted key of ``changes`` (``"generator.attention.enabled"``) in the plain dict ``data``
    (changed in place and returned). Only existing keys may be set, so a typo is a :class:`ConfigError`
    naming it (``unknown <kind> key: ...``) instead of a silently ignored setting. The one dotted-override
    implementation, shared by :meth:`ModelConfig.replace` and the training config."""
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown {kind} key: {dotted}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"unknown {kind} key: {dotted}")
        node[leaf] = value
    return data


def to_plain(obj: Any) -> Any:
    """A config dataclass (or any value in one) → plain dicts, lists and scalars, as YAML and JSON hold
    them: the inverse of :func:`build_dataclass`. Tuples become lists, so the result round-trips through
    ``yaml.safe_dump`` and back into an equal config. Other config schemas (the training config) use it
    for their ``to_dict``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


def _check_value(value: Any, annotation: Any, path: str) -> Any:
    """Validate ``value`` against a field annotation and return it in canonical form (tuples, floats)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(annotation, value, path)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_check_value(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported schema type {annotation!r}")  # pragma: no cover


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """The frozen dataclass ``cls`` from the plain dict ``data``, validated strictly: an unknown key or a
    value of the wrong type is a :class:`ConfigError` naming its full key path (``prefix`` is the path of
    ``data`` itself, for nested sections); missing keys take the dataclass defaults; nested dataclasses,
    tuples, unions and scalars are checked recursively.

    The one schema builder of the project: :func:`config_from_dict` builds the model config with it, and
    any other config written the same way (the training config, :mod:`training.config`) uses it too, so
    every config file has the same rules and the same error messages. Range checks that types cannot
    express are the caller's (:func:`config_from_dict` adds the model's)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key: {where} (allowed here: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _check_value(value, hints[key], where)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Build and validate a config; missing keys take the schema defaults (the vox-256 sizes)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    cfg = build_dataclass(ModelConfig, data)
    _check_semantics(cfg)
    return cfg


def _check_semantics(cfg: ModelConfig) -> None:
    """Range checks that types alone cannot express; each names its key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.image_size >= 32 and cfg.image_size % 32 == 0, "image_size", "must be a multiple of 32, >= 32")
    need(cfg.keypoints.num_kp >= 1, "keypoints.num_kp", "must be >= 1")
    need(cfg.keypoints.temperature > 0, "keypoints.temperature", "must be > 0")
    need(cfg.keypoints.detail_channels >= 0, "keypoints.detail_channels", "must be >= 0")
    mouth = cfg.keypoints.mouth_keypoints
    need(
        mouth == ()
        or (len(mouth) == 2 and mouth[0] != mouth[1] and all(0 <= k < cfg.keypoints.num_kp for k in mouth)),
        "keypoints.mouth_keypoints",
        f"must be empty or two different keypoint indices (upper lip, lower lip) below num_kp "
        f"({cfg.keypoints.num_kp}), got {list(mouth)}",
    )
    need(
        is_mouth_gain(cfg.keypoints.mouth_open_gain),
        "keypoints.mouth_open_gain",
        f"must be in (0, {MAX_MOUTH_GAIN:g}] (1 = the driver's opening as it is)",
    )
    need(
        0 < cfg.keypoints.jacobian_gain <= MAX_JACOBIAN_GAIN,
        "keypoints.jacobian_gain",
        f"must be in (0, {MAX_JACOBIAN_GAIN:g}] (1 = the driver's local motion as it is)",
    )
    need(
        cfg.keypoints.estimate_jacobian or cfg.keypoints.jacobian_gain == 1.0,
        "keypoints.jacobian_gain",
        "needs keypoints.estimate_jacobian (a model without Jacobians has no local motion to scale)",
    )
    need(
        bool(mouth) or cfg.keypoints.mouth_open_gain == 1.0,
        "keypoints.mouth_open_gain",
        "needs keypoints.mouth_keypoints (which keypoints are the lips)",
    )
    if cfg.keypoints.detail_channels > 0:
        step = round(1 / cfg.keypoints.scale_factor)
        need(
            cfg.image_size % step == 0,
            "keypoints.detail_channels",
            f"needs image_size divisible by 1/keypoints.scale_factor ({step}): the detail blocks tile "
            "the image",
        )
    lids = cfg.blink.keypoints
    need(
        lids == ()
        or (len(lids) == 4 and len(set(lids)) == 4 and all(0 <= k < cfg.keypoints.num_kp for k in lids)),
        "blink.keypoints",
        f"must be empty or four different keypoint indices (upper and lower lid of the image-left eye, "
        f"then of the image-right eye) below num_kp ({cfg.keypoints.num_kp}), got {list(lids)}",
    )
    need(0 < cfg.blink.gain <= 10, "blink.gain", "must be in (0, 10]")
    need(0 <= cfg.blink.dead_zone < 1, "blink.dead_zone", "must be in [0, 1)")
    need(cfg.blink.open_seconds > 0, "blink.open_seconds", "must be > 0")
    need(0 <= cfg.blink.widen <= 1, "blink.widen", "must be in [0, 1]")
    need(cfg.blink.reference_seconds >= 0, "blink.reference_seconds", "must be >= 0")
    need(0 <= cfg.mouth.warp <= 5, "mouth.warp", "must be in [0, 5]")
    need(
        cfg.mouth.warp == 0 or bool(mouth),
        "mouth.warp",
        "needs keypoints.mouth_keypoints (which keypoints are the lips)",
    )
    need(0 <= cfg.mouth.shade <= 10, "mouth.shade", "must be in [0, 10]")
    need(cfg.mouth.open_photo > 0, "mouth.open_photo", "must be > 0")
    need(0 <= cfg.nod.gain <= 5, "nod.gain", "must be in [0, 5]")
    need(0 < cfg.nod.max_degrees <= 60, "nod.max_degrees", "must be in (0, 60]")
    for key, sf in (
        ("keypoints.scale_factor", cfg.keypoints.scale_factor),
        ("generator.dense_motion.scale_factor", cfg.generator.dense_motion.scale_factor),
    ):
        need(0 < sf <= 1, key, "must be in (0, 1]")
    need(len(cfg.depth.decoder_channels) == 5, "depth.decoder_channels", "needs 5 entries (one per level)")
    need(
        all(0 <= s <= 3 for s in cfg.depth.scales) and 0 in cfg.depth.scales,
        "depth.scales",
        "must be a subset of 0..3 containing 0",
    )
    need(0 < cfg.depth.min_depth < cfg.depth.max_depth, "depth.min_depth", "must be > 0 and < max_depth")
    need(cfg.depth.input_scale in (1.0, 0.5, 0.25), "depth.input_scale", "must be 1, 0.5 or 0.25")
    if cfg.depth.input_scale != 1.0:
        small = cfg.image_size * cfg.depth.input_scale
        need(
            small % 32 == 0 and small >= 64,
            "depth.input_scale",
            f"image_size × input_scale must be a multiple of 32 and at least 64 (the depth encoder's stride, "
            f"and 2 pixels at its deepest level for the decoder's padding); {cfg.image_size} × "
            f"{cfg.depth.input_scale:g} is not",
        )
    need(
        cfg.generator.attention.implementation in ("auto", "math"),
        "generator.attention.implementation",
        "must be 'auto' or 'math'",
    )
    need(
        cfg.generator.attention.activation in ("none", "relu"),
        "generator.attention.activation",
        "must be 'none' or 'relu'",
    )
    need(
        cfg.generator.attention.kv_pool in (1, 2, 4),
        "generator.attention.kv_pool",
        "must be 1, 2 or 4",
    )
    if cfg.generator.attention.kv_pool > 1:
        # F_w is the generator's feature map after its down blocks: image_size / 2^num_down_blocks
        side = cfg.image_size // 2**cfg.generator.num_down_blocks
        need(
            side % cfg.generator.attention.kv_pool == 0,
            "generator.attention.kv_pool",
            f"must divide the attention's feature side ({side}×{side})",
        )
    need(cfg.generator.num_down_blocks >= 1, "generator.num_down_blocks", "must be >= 1")
    need(cfg.generator.dense_motion.kp_variance > 0, "generator.dense_motion.kp_variance", "must be > 0")
    for key, k in (
        ("generator.final_kernel_size", cfg.generator.final_kernel_size),
        ("generator.dense_motion.head_kernel_size", cfg.generator.dense_motion.head_kernel_size),
    ):
        need(k in (1, 3, 5, 7), key, "must be 1, 3, 5 or 7 (odd: the output keeps the input's size)")


def load_config(source: str | Path | dict[str, Any]) -> ModelConfig:
    """Load a preset name (``vox-256``, ``tiny``), a YAML file path, or a dict."""
    if isinstance(source, dict):
        return config_from_dict(source)
    text_source = str(source)
    if text_source in PRESETS:
        text = resources.files("dagan.presets").joinpath(f"{text_source}.yaml").read_text()
        where = f"preset {text_source}"
    else:
        path = Path(text_source)
        if not path.is_file():
            raise ConfigError(f"config {text_source!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        text = path.read_text()
        where = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from exc
    try:
        return config_from_dict(data or {})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
