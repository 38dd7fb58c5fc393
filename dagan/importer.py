"""Import the published DaGAN and FOMM VoxCeleb checkpoints into our checkpoint format.

The reference implementations save PyTorch pickles whose tensor names follow their module layout; ours
names some modules differently (the generator's encoders are grouped, the bottleneck is numbered, the
monodepth2-style depth decoder is keyed by level instead of one flat list). The translation is the
explicit table below, one rule per reference module, so that every name is accounted for: a tensor is
either assigned to exactly one of ours (after a shape check), or deliberately dropped with a stated
reason (e.g. the ResNet classifier that a depth encoder never runs). Anything else is a problem that is
reported in full (missing, unexpected, mis-shaped) instead of producing a half-random model; with
``allow_partial`` the import goes ahead and the report lists every tensor that stayed random.

Files are read with ``torch.load(weights_only=True)``: the tensors are loaded without running any code
pickled into the file. A file that needs more than tensors and plain containers is refused with an
explanation. Before any tensor is mapped, each file is recognised by its entry names (:func:`file_kind`),
so a file given to the wrong option (swapped depth files, a bare state dict) gets one sentence with the
fix instead of hundreds of mismatch lines.

The model size is the release's preset unless ``config`` says otherwise: a preset, one of our YAMLs, or
the authors' own training YAML, translated by :func:`reference_config`, so checkpoints users trained at
other sizes with the authors' code import too.

The reference names and shapes are recorded as test data (``tests/data/reference_manifests``); the tests
build random files in the reference layout from them and check that every tensor lands in the right place.
``tests/test_golden.py`` checks imported models against outputs of the authors' own inference code.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import blur_kernels, save_checkpoint
from .config import PRESETS, ConfigError, ModelConfig, config_from_dict, load_config
from .errors import UserError


class CheckpointImportError(UserError, ValueError):
    """A reference checkpoint that cannot be imported; the message lists every tensor that does not fit."""


# --------------------------------------------------------------------------------------------------
# The name-mapping table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Reference name (regex, matched in full within its group) → our name (``re`` template), or
    ``target=None`` for a reference tensor that has no counterpart, with the ``reason``."""

    pattern: str
    target: str | None
    reason: str = ""


def _block(ref: str, ours: str) -> Rule:
    """A whole reference submodule that is ours under another name (all its tensors, same suffixes)."""
    return Rule(rf"{re.escape(ref)}\.(.+)", rf"{ours}.\1")


# Keypoint detector: identical structure (hourglass ``predictor``, heatmap conv ``kp``, ``jacobian`` conv,
# anti-alias ``down`` kernel) in DaGAN (RGB-D input) and FOMM (RGB input).
KP_DETECTOR_RULES: tuple[Rule, ...] = (
    _block("predictor", "kp_detector.predictor"),
    Rule(r"kp\.(weight|bias)", r"kp_detector.kp.\1"),
    Rule(r"jacobian\.(weight|bias)", r"kp_detector.jacobian.\1"),
    Rule(r"down\.weight", "kp_detector.down.weight"),
)

# FOMM's OcclusionAwareGenerator: image encoder (first + down_blocks), bottleneck r0..r5, decoder.
_GENERATOR_COMMON: tuple[Rule, ...] = (
    _block("dense_motion_network", "generator.dense_motion_network"),
    _block("first", "generator.image_encoder.first"),
    Rule(r"down_blocks\.(\d+)\.(.+)", r"generator.image_encoder.down_blocks.\1.\2"),
    Rule(r"bottleneck\.r(\d+)\.(.+)", r"generator.bottleneck.\1.\2"),
    Rule(r"up_blocks\.(\d+)\.(.+)", r"generator.up_blocks.\1.\2"),
    Rule(r"final\.(weight|bias)", r"generator.final.\1"),
)
FOMM_GENERATOR_RULES: tuple[Rule, ...] = _GENERATOR_COMMON

# DaGAN's DepthAwareGenerator (the paper version the release's demo runs) adds the source-depth encoder
# (src_first + src_down_blocks) and the depth-aware attention module.
DAGAN_GENERATOR_RULES: tuple[Rule, ...] = (
    *_GENERATOR_COMMON,
    _block("src_first", "generator.depth_encoder.first"),
    Rule(r"src_down_blocks\.(\d+)\.(.+)", r"generator.depth_encoder.down_blocks.\1.\2"),
    Rule(r"AttnModule\.(query_conv|key_conv|value_conv)\.(weight|bias)", r"generator.attention.\1.\2"),
    Rule(r"AttnModule\.gamma", "generator.attention.gamma"),
)

# monodepth2-style ResNet18 encoder: a torchvision resnet18 held as ``encoder``; we stop before its
# ImageNet classifier, which the depth network never runs.
DEPTH_ENCODER_RULES: tuple[Rule, ...] = (
    Rule(
        r"encoder\.fc\.(weight|bias)",
        None,
        "ImageNet classifier of torchvision's resnet18, never run by the depth encoder (ours has none)",
    ),
    _block("encoder", "depth_net.encoder"),
)

# monodepth2-style decoder: one flat ModuleList ``decoder`` holding, in order, upconv(4,0), upconv(4,1),
# upconv(3,0), ..., upconv(0,1), then dispconv 0..3. Ours keys the same convs by level:
# upconv(i,0) = reduce[i], upconv(i,1) = fuse[i], dispconv s = disp[s].
DEPTH_DECODER_RULES: tuple[Rule, ...] = (
    Rule(r"decoder\.0\.conv\.conv\.(weight|bias)", r"depth_net.decoder.reduce.4.conv.conv.\1"),
    Rule(r"decoder\.1\.conv\.conv\.(weight|bias)", r"depth_net.decoder.fuse.4.conv.conv.\1"),
    Rule(r"decoder\.2\.conv\.conv\.(weight|bias)", r"depth_net.decoder.reduce.3.conv.conv.\1"),
    Rule(r"decoder\.3\.conv\.conv\.(weight|bias)", r"depth_net.decoder.fuse.3.conv.conv.\1"),
    Rule(r"decoder\.4\.conv\.conv\.(weight|bias)", r"depth_net.decoder.reduce.2.conv.conv.\1"),
    Rule(r"decoder\.5\.conv\.conv\.(weight|bias)", r"depth_net.decoder.fuse.2.conv.conv.\1"),
    Rule(r"decoder\.6\.conv\.conv\.(weight|bias)", r"depth_net.decoder.reduce.1.conv.conv.\1"),
    Rule(r"decoder\.7\.conv\.conv\.(weight|bias)", r"depth_net.decoder.fuse.1.conv.conv.\1"),
    Rule(r"decoder\.8\.conv\.conv\.(weight|bias)", r"depth_net.decoder.reduce.0.conv.conv.\1"),
    Rule(r"decoder\.9\.conv\.conv\.(weight|bias)", r"depth_net.decoder.fuse.0.conv.conv.\1"),
    Rule(r"decoder\.10\.conv\.(weight|bias)", r"depth_net.decoder.disp.0.conv.\1"),
    Rule(r"decoder\.11\.conv\.(weight|bias)", r"depth_net.decoder.disp.1.conv.\1"),
    Rule(r"decoder\.12\.conv\.(weight|bias)", r"depth_net.decoder.disp.2.conv.\1"),
    Rule(r"decoder\.13\.conv\.(weight|bias)", r"depth_net.decoder.disp.3.conv.\1"),
)

_OPTIMIZER = "optimizer state, only needed to resume the authors' own training"
_EPOCH = "training epoch counter"


@dataclass(frozen=True)
class SourceSpec:
    """One input file: which entries hold state dicts (and their rules), which are skipped and why.

    ``groups`` maps a top-level key to its rules; the key ``""`` means the file itself is a flat state dict.
    ``skipped`` maps top-level (or, for flat files, non-tensor) entries to the reason they are not imported.
    """

    label: str
    groups: Mapping[str, tuple[Rule, ...]]
    skipped: Mapping[str, str] = field(default_factory=dict)
    # What the file holds (a key of ``_KINDS``) and the ``dagan import`` option that takes it.
    kind: str = ""
    flag: str = ""


@dataclass(frozen=True)
class ReleaseSpec:
    """A published release: the preset it imports into, its files, and how it differs at run time."""

    name: str
    preset: str
    sources: tuple[SourceSpec, ...]
    license: str
    known_differences: tuple[str, ...] = ()
    # Config switches that make our networks compute what the reference code computes at run time.
    config_overrides: tuple[tuple[str, object], ...] = ()


DAGAN_RELEASE = ReleaseSpec(
    name="dagan",
    preset="vox-256",
    sources=(
        SourceSpec(
            "generator checkpoint",
            {"generator": DAGAN_GENERATOR_RULES, "kp_detector": KP_DETECTOR_RULES},
            {
                "discriminator": "training-only; the release's discriminator is conditioned on keypoint "
                "heatmaps (3+K input channels) without spectral norm, unlike ours",
                "optimizer_generator": _OPTIMIZER,
                "optimizer_discriminator": _OPTIMIZER,
                "optimizer_kp_detector": _OPTIMIZER,
                "epoch": _EPOCH,
            },
            kind="dagan checkpoint",
            flag="--dagan",
        ),
        SourceSpec(
            "depth encoder",
            {"": DEPTH_ENCODER_RULES},
            {
                "height": "training input height, saved for prediction time",
                "width": "training input width, saved for prediction time",
                "use_stereo": "monodepth2 training flag",
            },
            kind="depth encoder",
            flag="--depth-encoder",
        ),
        SourceSpec("depth decoder", {"": DEPTH_DECODER_RULES}, kind="depth decoder", flag="--depth-decoder"),
    ),
    license="CC BY-NC 4.0 (DaGAN, non-commercial); depth network derived from monodepth2 (non-commercial)",
    config_overrides=(
        # the released attention applies ReLU to q, k and v (eq. 9 of the paper has none)
        ("generator.attention.activation", "relu"),
        # trained under PyTorch >= 1.3, whose grid_sample defaults to align_corners=False
        ("generator.warp_align_corners", False),
    ),
)

FOMM_RELEASE = ReleaseSpec(
    name="fomm",
    preset="fomm",
    sources=(
        SourceSpec(
            "FOMM checkpoint",
            {"generator": FOMM_GENERATOR_RULES, "kp_detector": KP_DETECTOR_RULES},
            {
                "discriminator": "training-only (not part of the inference model)",
                "optimizer_generator": _OPTIMIZER,
                "optimizer_discriminator": _OPTIMIZER,
                "optimizer_kp_detector": _OPTIMIZER,
                "epoch": _EPOCH,
            },
            kind="fomm checkpoint",
            flag="--fomm",
        ),
    ),
    license="FOMM checkpoints: published for non-commercial research use (trained on VoxCeleb)",
)

RELEASES: dict[str, ReleaseSpec] = {r.name: r for r in (DAGAN_RELEASE, FOMM_RELEASE)}

# Wrapper prefix added by (Distributed)DataParallel when a wrapped model's state dict was saved.
_WRAPPER_PREFIX = "module."


# --------------------------------------------------------------------------------------------------
# The model size: a preset, our YAML, or the authors' own YAML
# --------------------------------------------------------------------------------------------------

# The authors' config sections and the keys of each that we translate. A key outside these lists is
# refused (it would build a network we do not implement); ``_REFERENCE_DEFAULTS`` are the reference
# constructors' defaults for optional keys, which differ from our schema's (e.g. scale_factor=1).
_REFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "common_params": ("num_kp", "num_channels", "estimate_jacobian"),
    "kp_detector_params": (
        "temperature",
        "block_expansion",
        "max_features",
        "scale_factor",
        "num_blocks",
        "single_jacobian_map",
        "pad",
    ),
    "generator_params": (
        "block_expansion",
        "max_features",
        "num_down_blocks",
        "num_bottleneck_blocks",
        "estimate_occlusion_map",
        "dense_motion_params",
    ),
    "dense_motion_params": ("block_expansion", "max_features", "num_blocks", "scale_factor", "kp_variance"),
    "discriminator_params": ("scales", "block_expansion", "max_features", "num_blocks", "sn", "use_kp"),
}
_REFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "common_params": {"num_channels": 3, "estimate_jacobian": False},
    "kp_detector_params": {"scale_factor": 1, "single_jacobian_map": False, "pad": 0},
    "generator_params": {"estimate_occlusion_map": False},
    "dense_motion_params": {"scale_factor": 1, "kp_variance": 0.01},
    "discriminator_params": {"scales": [1], "sn": False},
}
_REFERENCE_REQUIRED: dict[str, tuple[str, ...]] = {
    "common_params": ("num_kp",),
    "kp_detector_params": ("temperature", "block_expansion", "max_features", "num_blocks"),
    "generator_params": ("block_expansion", "max_features", "num_down_blocks", "num_bottleneck_blocks"),
    "dense_motion_params": ("block_expansion", "max_features", "num_blocks"),
}


def _reference_section(params: Mapping[str, Any], section: str, where: str) -> dict[str, Any]:
    raw = params.get(section)
    if raw is None and section in ("common_params", "kp_detector_params", "generator_params"):
        raise CheckpointImportError(f"{where}: model_params has no {section}")
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(_REFERENCE_KEYS[section]))
    if unknown:
        raise CheckpointImportError(
            f"{where}: {section}.{unknown[0]} has no counterpart in our networks (known here: "
            f"{', '.join(_REFERENCE_KEYS[section])}); this importer supports the paper's generator and "
            "keypoint detector only"
        )
    missing = [k for k in _REFERENCE_REQUIRED.get(section, ()) if k not in raw]
    if missing:
        raise CheckpointImportError(f"{where}: {section} lacks {', '.join(missing)}")
    return {**_REFERENCE_DEFAULTS.get(section, {}), **raw}


def reference_config(
    data: Mapping[str, Any], release: str | ReleaseSpec, name: str = "imported", where: str = "config"
) -> ModelConfig:
    """Our config for a model the authors' code builds from its YAML (``model_params`` and frame shape).

    Users train their own sizes with the authors' code; this reads the same YAML their training used,
    so the widths, depths and keypoint count of the file need not be typed again. What the YAML cannot
    say comes from the release's preset: the depth network (a fixed ResNet18 in DaGAN's code) and the
    attention width, which DaGAN's code derives as bottleneck channels / 8.
    """
    spec = RELEASES[release] if isinstance(release, str) else release
    params = data.get("model_params")
    if not isinstance(params, Mapping):
        raise CheckpointImportError(f"{where}: no model_params mapping (not one of the authors' configs)")
    common = _reference_section(params, "common_params", where)
    kp = _reference_section(params, "kp_detector_params", where)
    gen = _reference_section(params, "generator_params", where)
    dm = _reference_section(gen, "dense_motion_params", f"{where}: generator_params")
    disc = _reference_section(params, "discriminator_params", where)
    if common["num_channels"] != 3:
        raise CheckpointImportError(
            f"{where}: num_channels {common['num_channels']}: only RGB (3) is supported"
        )
    if kp["single_jacobian_map"] or kp["pad"] != 0:
        raise CheckpointImportError(
            f"{where}: kp_detector_params single_jacobian_map/pad are not supported (the published "
            "models use the defaults, False and 0)"
        )
    frame = data.get("frame_shape") or (data.get("dataset_params") or {}).get("frame_shape")
    base = load_config(spec.preset)
    if frame is not None:
        if len(frame) < 2 or frame[0] != frame[1]:
            raise CheckpointImportError(f"{where}: frame_shape {frame}: only square frames are supported")
        image_size = int(frame[0])
    else:
        image_size = base.image_size
    feat = min(int(gen["max_features"]), int(gen["block_expansion"]) * 2 ** int(gen["num_down_blocks"]))
    out = base.to_dict()
    out["name"] = name
    out["image_size"] = image_size
    out["keypoints"].update(
        num_kp=common["num_kp"],
        estimate_jacobian=common["estimate_jacobian"],
        temperature=kp["temperature"],
        block_expansion=kp["block_expansion"],
        max_features=kp["max_features"],
        num_blocks=kp["num_blocks"],
        scale_factor=kp["scale_factor"],
    )
    g = out["generator"]
    g.update(
        block_expansion=gen["block_expansion"],
        max_features=gen["max_features"],
        num_down_blocks=gen["num_down_blocks"],
        num_bottleneck_blocks=gen["num_bottleneck_blocks"],
        estimate_occlusion_map=gen["estimate_occlusion_map"],
    )
    g["dense_motion"].update(
        block_expansion=dm["block_expansion"],
        max_features=dm["max_features"],
        num_blocks=dm["num_blocks"],
        scale_factor=dm["scale_factor"],
        kp_variance=dm["kp_variance"],
    )
    if g["attention"]["enabled"]:
        g["attention"]["qk_channels"] = max(1, feat // 8)  # DaGAN's AttnModule: in_dim // 8
    out["discriminator"].update(
        scales=[float(s) for s in disc["scales"]],
        block_expansion=disc.get("block_expansion", out["discriminator"]["block_expansion"]),
        max_features=disc.get("max_features", out["discriminator"]["max_features"]),
        num_blocks=disc.get("num_blocks", out["discriminator"]["num_blocks"]),
    )
    try:
        return config_from_dict(out)
    except ConfigError as exc:
        raise CheckpointImportError(f"{where}: {exc}") from exc


def resolve_import_config(config: str | Path | ModelConfig | None, release: str | ReleaseSpec) -> ModelConfig:
    """The model an import fills: the release's preset (``None``), a preset name, one of our YAML
    configs, or the authors' own training YAML (recognised by its ``model_params`` section)."""
    spec = RELEASES[release] if isinstance(release, str) else release
    if config is None:
        return load_config(spec.preset)
    if isinstance(config, ModelConfig):
        return config
    if str(config) in PRESETS:
        return load_config(str(config))
    path = Path(config)
    if not path.is_file():
        raise CheckpointImportError(
            f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a YAML file"
        )
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointImportError(f"{path}: not valid YAML ({exc})") from exc
    if isinstance(data, Mapping) and "model_params" in data:
        return reference_config(data, spec, name=path.stem, where=str(path))
    return load_config(path)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_reference_file(path: str | Path) -> Any:
    """``torch.load`` a reference file on the CPU without running pickled code, or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if needs is None:  # not a refused object but a file the unpickler cannot parse at all
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else ""
            raise CheckpointImportError(f"{path}: not a readable PyTorch checkpoint ({detail})") from exc
        raise CheckpointImportError(
            f"{path}: refused to load: the file pickles Python objects beyond tensors and plain containers "
            f"(it needs {needs.group(1)}). Loading it would mean running code stored in the file, which "
            "this importer never does (torch.load weights_only=True). Use the files exactly as the authors "
            "publish them; if you trust this one, re-save its state dicts as plain {name: tensor} dicts "
            "with torch.save and import that"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointImportError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor | Sequence[int]) -> list[int]:
    return list(t.shape) if isinstance(t, torch.Tensor) else list(t)


@dataclass
class ImportReport:
    """Where every reference tensor went, and every way the files and our model disagree.

    Reference tensors are labelled ``"<file label>: <group>.<name>"``. ``assigned`` maps each of our
    tensor names to the reference label it was copied from.
    """

    release: str
    config_name: str
    assigned: dict[str, str] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (reference label, reason)
    skipped_entries: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason)
    unexpected: list[tuple[str, list[int], str]] = field(default_factory=list)  # (ref, shape, why)
    mismatched: list[tuple[str, list[int], str, list[int]]] = field(default_factory=list)
    missing: list[tuple[str, list[int]]] = field(default_factory=list)  # ours, never assigned
    defaults: list[str] = field(default_factory=list)  # ours, absent but derivable: kept our own
    stayed_random: list[str] = field(default_factory=list)  # filled only with allow_partial
    notes: list[str] = field(default_factory=list)
    parameters: int = 0  # scalar count of the imported tensors

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.mismatched or self.missing)

    def problem_lines(self) -> list[str]:
        lines = [
            f"missing: {name} {shape} (no tensor in the files maps to it)" for name, shape in self.missing
        ]
        lines += [f"unexpected: {ref} {shape} ({why})" for ref, shape, why in self.unexpected]
        lines += [
            f"shape: {ref} {ref_shape} vs ours {ours} {our_shape}"
            for ref, ref_shape, ours, our_shape in self.mismatched
        ]
        return lines

    def summary(self) -> str:
        """Multi-line human-readable account of the import (printed by ``dagan import``)."""
        out = [
            f"imported {len(self.assigned)} tensors ({self.parameters:,} values) into the "
            f"'{self.config_name}' model from the {self.release} release"
        ]
        out += [f"  note: {n}" for n in self.notes]
        if self.defaults:
            out.append(
                f"  kept our own value for {len(self.defaults)} derived buffers absent from the files "
                "(BatchNorm batch counters / fixed blur kernels)"
            )
        for ref, why in self.dropped:
            out.append(f"  not imported: {ref} ({why})")
        for entry, why in self.skipped_entries:
            out.append(f"  not imported: {entry} ({why})")
        if self.stayed_random:
            out.append(f"  STAYED RANDOM (--allow-partial): {len(self.stayed_random)} tensors:")
            out += [f"    {name}" for name in self.stayed_random]
        for line in self.problem_lines():
            out.append(f"  {line}")
        return "\n".join(out)


@dataclass
class ImportResult:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    report: ImportReport


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _strip_wrapper(names: Sequence[str]) -> bool:
    return bool(names) and all(n.startswith(_WRAPPER_PREFIX) for n in names)


Row = tuple[str, str, Any, tuple[Rule, ...]]


def _entries(spec: SourceSpec, obj: Any, report: ImportReport) -> list[Row]:
    """Flatten one loaded file into (label, name-within-group, value, rules) rows; record skipped entries."""
    if not isinstance(obj, Mapping):
        raise CheckpointImportError(
            f"{spec.label}: expected a dict saved with torch.save, got {type(obj).__name__}"
        )
    rows = []
    if "" in spec.groups:  # a flat state dict
        rules = spec.groups[""]
        names = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        strip = _strip_wrapper(names)
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                if key in spec.skipped:
                    report.skipped_entries.append((f"{spec.label}: {key} = {value!r}", spec.skipped[key]))
                else:
                    report.unexpected.append(
                        (f"{spec.label}: {key}", [], f"a {type(value).__name__} where tensors were expected")
                    )
                continue
            name = key[len(_WRAPPER_PREFIX) :] if strip else key
            rows.append((f"{spec.label}: {key}", name, value, rules))
        return rows

    for key, value in obj.items():
        if key in spec.groups:
            continue
        why = spec.skipped.get(key, "not part of this release's known layout")
        size = f", {len(value)} entries" if isinstance(value, Mapping) else ""
        report.skipped_entries.append((f"{spec.label}: '{key}'{size}", why))
    for group, rules in spec.groups.items():
        state = obj.get(group)
        if not isinstance(state, Mapping):
            keys = list(obj)
            present = ", ".join(repr(k) for k in keys[:6]) + (
                f", ... ({len(keys)} in all)" if len(keys) > 6 else ""
            )
            present = present or "nothing"
            raise CheckpointImportError(
                f"{spec.label}: no '{group}' state dict in the file (it holds {present}); "
                f"is this the right file for {spec.label}?"
            )
        names = list(state)
        strip = _strip_wrapper(names)
        if strip:
            report.notes.append(f"{spec.label}: removed the '{_WRAPPER_PREFIX}' wrapper prefix in '{group}'")
        for key, value in state.items():
            label = f"{spec.label}: {group}.{key}"
            if not isinstance(value, torch.Tensor):
                report.unexpected.append((label, [], f"a {type(value).__name__} where a tensor was expected"))
                continue
            name = key[len(_WRAPPER_PREFIX) :] if strip else key
            rows.append((label, name, value, rules))
    return rows


def _infer_num_kp(release: ReleaseSpec, loaded: Sequence[Any]) -> int | None:
    """Keypoint count of the file (rows of the heatmap conv), so e.g. a 10-keypoint DaGAN also imports."""
    for spec, obj in zip(release.sources, loaded, strict=True):
        if "kp_detector" in spec.groups and isinstance(obj, Mapping):
            kp = obj.get("kp_detector")
            if isinstance(kp, Mapping):
                for key, value in kp.items():
                    if key.removeprefix(_WRAPPER_PREFIX) == "kp.weight" and isinstance(value, torch.Tensor):
                        return int(value.shape[0])
    return None


def _hints(release: ReleaseSpec, report: ImportReport) -> list[str]:
    """Point at the likely cause when the problems have a recognisable pattern."""
    text = " ".join(ref for ref, _, _ in report.unexpected)
    hints = []
    if "generator.decoder." in text or "G_middle" in text:
        hints.append(
            "the generator has a SPADE decoder: that is the release's SPADEDepthAwareGenerator variant; "
            "only the paper's DepthAwareGenerator is supported"
        )
    if release.name == "fomm" and ("AttnModule" in text or "src_first" in text):
        hints.append("this looks like a DaGAN checkpoint: import it with --dagan and the two depth files")
    if release.name == "dagan" and any(ours.startswith("generator.attention.") for ours, _ in report.missing):
        hints.append("this looks like a FOMM checkpoint (no depth-aware attention): import it with --fomm")
    if report.mismatched:
        hints.append(
            f"{len(report.mismatched)} tensors have other shapes than the '{report.config_name}' model: the "
            "checkpoint was trained at another size; pass --config with the YAML the authors' code trained "
            "it with (their config/*.yaml), or a preset / one of our configs"
        )
    if release.name == "dagan" and any("layer4.2." in ref for ref, _, _ in report.unexpected):
        hints.append(
            "the depth encoder is a deeper ResNet (e.g. the ResNet50 face-depth model); ours: ResNet18"
        )
    return hints


# What each kind of file is, as a user would name it (used in the wrong-file messages).
_KINDS: dict[str, str] = {
    "dagan checkpoint": "a DaGAN training checkpoint ('generator' + 'kp_detector' state dicts)",
    "fomm checkpoint": "a FOMM training checkpoint ('generator' + 'kp_detector' state dicts)",
    "depth encoder": "the DaGAN depth encoder (encoder.pth: a ResNet18 state dict)",
    "depth decoder": "the DaGAN depth decoder (depth.pth)",
    "generator": "a bare generator state dict",
    "kp_detector": "a bare keypoint-detector state dict",
}
_MODEL_GROUPS = ("generator", "kp_detector")


def file_kind(obj: Any) -> str | None:
    """Which reference file ``obj`` (a loaded file) looks like, by its entry names; None if unknown.

    Used before the name mapping, so a file passed to the wrong option gets one sentence saying what
    it is instead of hundreds of "unexpected"/"missing" lines.
    """
    if not isinstance(obj, Mapping):
        return None
    keys = [k for k in obj if isinstance(k, str)]
    if any(isinstance(obj.get(g), Mapping) for g in _MODEL_GROUPS):
        gen = obj.get("generator")
        names = [str(k).removeprefix(_WRAPPER_PREFIX) for k in gen] if isinstance(gen, Mapping) else []
        if any(n.startswith(("AttnModule.", "src_first.", "src_down_blocks.")) for n in names):
            return "dagan checkpoint"
        if any(n.startswith("bottleneck.r") for n in names) and not any(
            n.startswith(("decoder.", "G_middle")) for n in names
        ):
            return "fomm checkpoint"
        return "checkpoint"  # some other generator: the name mapping reports what does not fit
    names = [k.removeprefix(_WRAPPER_PREFIX) for k in keys if isinstance(obj[k], torch.Tensor)]
    if not names:
        return None

    def share(prefixes: tuple[str, ...]) -> float:
        return sum(n.startswith(prefixes) for n in names) / len(names)

    if share(("encoder.conv1.", "encoder.bn1.", "encoder.layer", "encoder.fc.")) > 0.9:
        return "depth encoder"
    if share(("decoder.",)) > 0.9 and any(n.startswith("decoder.0.conv.conv.") for n in names):
        return "depth decoder"
    if share(("predictor.", "kp.", "jacobian.", "down.")) > 0.9:
        return "kp_detector"
    if any(n.startswith("dense_motion_network.") for n in names) and any(
        n.startswith("final.") for n in names
    ):
        return "generator"
    return None


def _describe(obj: Any) -> str:
    """A short account of a file that is not what was expected: its kind, or a few of its keys."""
    kind = file_kind(obj)
    if kind is not None:
        return _KINDS[kind]
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}, not a dict"
    keys = list(obj)
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    shown = ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    what = f"a state dict of {tensors} tensors" if tensors == len(keys) and keys else f"{len(keys)} entries"
    return f"{what} of an unknown model ({shown})"


def _check_file_kinds(spec: ReleaseSpec, loaded: Sequence[Any]) -> None:
    """Refuse files passed to the wrong option (or bare state dicts) with a short message and a fix."""
    kinds = [file_kind(obj) for obj in loaded]
    by_kind = {s.kind: s for s in spec.sources}
    wrong = [
        (s, obj, k)
        for s, obj, k in zip(spec.sources, loaded, kinds, strict=True)
        if s.kind and k != s.kind and not (k == "checkpoint" and s.kind.endswith("checkpoint"))
    ]
    if not wrong:
        return
    labels = {s.kind for s, _, _ in wrong}
    if {"depth encoder", "depth decoder"} <= labels and {k for _, _, k in wrong} == labels:
        raise CheckpointImportError(
            "the --depth-encoder file is the depth decoder and the --depth-decoder file is the encoder: "
            "swap the two (encoder.pth is the encoder, depth.pth the decoder)"
        )
    lines = []
    for s, obj, kind in wrong:
        line = f"{s.label} ({s.flag}): this file is {_describe(obj)}, not {_KINDS[s.kind]}"
        if kind in by_kind:
            line += f"; pass it with {by_kind[kind].flag}"
        elif kind in ("dagan checkpoint", "fomm checkpoint"):
            other = "--dagan (with the two depth files)" if kind == "dagan checkpoint" else "--fomm"
            line += f"; import it with {other}"
        elif kind in _MODEL_GROUPS or (kind is None and s.kind.endswith("checkpoint")):
            line += (
                ". The importer reads the training checkpoint the authors publish, which holds the "
                "'generator' and 'kp_detector' state dicts together; if you saved bare state dicts, "
                "save them as torch.save({'generator': G.state_dict(), 'kp_detector': KP.state_dict()}, "
                "PATH) and import that"
            )
        lines.append(line)
    raise CheckpointImportError("; ".join(lines) if len(lines) == 1 else "\n  " + "\n  ".join(lines))


def import_state_dicts(
    release: str | ReleaseSpec,
    loaded: Sequence[Any],
    *,
    allow_partial: bool = False,
    seed: int = 0,
    config: str | Path | ModelConfig | None = None,
    align_corners: bool | None = None,
) -> ImportResult:
    """Map already-loaded reference files (in ``release.sources`` order) onto our model's state dict.

    Raises :class:`CheckpointImportError` listing every missing, unexpected and mis-shaped tensor unless
    ``allow_partial``; then those stay as our seeded random initialisation and the report lists them.
    ``config`` is the model size (see :func:`resolve_import_config`); default: the release's preset.
    ``align_corners`` overrides the release's grid_sample convention (e.g. a FOMM model trained under
    PyTorch >= 1.3, whose default is False, unlike the published FOMM weights).
    """
    from .model import DaGAN

    spec = RELEASES[release] if isinstance(release, str) else release
    if len(loaded) != len(spec.sources):
        raise ValueError(f"{spec.name} needs {len(spec.sources)} files, got {len(loaded)}")
    _check_file_kinds(spec, loaded)
    config = resolve_import_config(config, spec)
    report = ImportReport(release=spec.name, config_name=config.name)
    num_kp = _infer_num_kp(spec, loaded)
    if num_kp is not None and num_kp != config.keypoints.num_kp:
        default = config.keypoints.num_kp
        report.notes.append(f"the checkpoint has {num_kp} keypoints (the config says {default})")
        config = config.replace(**{"keypoints.num_kp": num_kp})
    if spec.config_overrides:
        config = config.replace(**dict(spec.config_overrides))
        report.notes += [
            f"config set to match the reference code: {k} = {v}" for k, v in spec.config_overrides
        ]
    if align_corners is not None and align_corners != config.generator.warp_align_corners:
        config = config.replace(**{"generator.warp_align_corners": align_corners})
        report.notes.append(f"generator.warp_align_corners = {align_corners} (as asked)")
    report.notes += [f"known difference from the reference at run time: {d}" for d in spec.known_differences]

    torch.manual_seed(seed)
    model = DaGAN(config)
    ours = model.state_dict()

    compiled = {}
    sources: dict[str, str] = {}
    values: dict[str, torch.Tensor] = {}
    for file_spec, obj in zip(spec.sources, loaded, strict=True):
        for label, name, value, rules in _entries(file_spec, obj, report):
            target = None
            matched: Rule | None = None
            for rule in rules:
                pattern = compiled.setdefault(rule.pattern, re.compile(rule.pattern))
                m = pattern.fullmatch(name)
                if m is not None:
                    matched = rule
                    target = m.expand(rule.target) if rule.target is not None else None
                    break
            if matched is None:
                report.unexpected.append((label, _shape(value), "no rule in the mapping table"))
            elif target is None:
                report.dropped.append((label, matched.reason))
            elif target not in ours:
                report.unexpected.append((label, _shape(value), f"maps to {target}, which this model lacks"))
            elif target in sources:
                why = f"{target} already comes from {sources[target]}"
                report.unexpected.append((label, _shape(value), why))
            elif tuple(value.shape) != tuple(ours[target].shape):
                report.mismatched.append((label, _shape(value), target, _shape(ours[target])))
            else:
                sources[target] = label
                values[target] = value.detach().to(dtype=ours[target].dtype).contiguous()

    mismatched_targets = {ours_name for _, _, ours_name, _ in report.mismatched}
    # Buffers our model fills itself when a file lacks them: the anti-alias blur kernels (constants of
    # the config) and BatchNorm's batch counter (unused in eval).
    derived = set(blur_kernels(model)) | {n for n in ours if n.endswith(".num_batches_tracked")}
    for name, tensor in ours.items():
        if name in values:
            continue
        if name in derived and name not in mismatched_targets:
            report.defaults.append(name)
        elif name not in mismatched_targets:
            report.missing.append((name, _shape(tensor)))

    report.assigned = sources
    report.parameters = sum(t.numel() for t in values.values())
    if not report.ok:
        if not allow_partial:
            problems = report.problem_lines()
            shown = problems[:60]
            more = f"\n  ... and {len(problems) - 60} more" if len(problems) > 60 else ""
            hints = "".join(f"\n  hint: {h}" for h in _hints(spec, report))
            raise CheckpointImportError(
                f"the {spec.name} files do not match the '{config.name}' model "
                f"({len(report.missing)} missing, {len(report.unexpected)} unexpected, "
                f"{len(report.mismatched)} mis-shaped); nothing was written. Pass --allow-partial to import "
                "anyway with the listed tensors left random:\n  " + "\n  ".join(shown) + more + hints
            )
        report.stayed_random = sorted([name for name, _ in report.missing] + sorted(mismatched_targets))

    state = {name: values.get(name, tensor) for name, tensor in ours.items()}
    return ImportResult(config, state, report)


def import_release(
    release: str,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    allow_partial: bool = False,
    seed: int = 0,
    config: str | Path | ModelConfig | None = None,
    align_corners: bool | None = None,
) -> ImportReport:
    """Load the release's files (weights only), map them and write our checkpoint to ``out``."""
    spec = RELEASES[release]
    loaded = [load_reference_file(p) for p in paths]
    result = import_state_dicts(
        spec, loaded, allow_partial=allow_partial, seed=seed, config=config, align_corners=align_corners
    )
    metadata = {
        "trained": "true",
        "imported_from": spec.name,
        "source_files": ", ".join(Path(p).name for p in paths),
        "license": spec.license,
    }
    if result.report.stayed_random:
        metadata["partial"] = f"{len(result.report.stayed_random)} tensors left random"
    save_checkpoint(out, result.config, result.state_dict, extra_metadata=metadata)
    return result.report
