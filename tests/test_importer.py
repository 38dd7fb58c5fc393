"""Import of the published DaGAN and FOMM checkpoints, tested on random files in the reference layout.

The reference names and shapes come from the JSON manifests in tests/data/reference_manifests (facts
about the public models, read off their module structure). Every tensor is filled with its own random
values, so after the import each of our tensors can be traced back, by content, to exactly one reference
tensor; the expected pairs below are written out independently of the importer's mapping table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from commands.cli import main
from dagan.checkpoint import load_model, read_checkpoint
from dagan.config import load_config
from dagan.importer import CheckpointImportError, import_release, import_state_dicts, load_reference_file

MANIFESTS = Path(__file__).parent / "data" / "reference_manifests"


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


class RandomReference:
    """Random tensors for every name of a manifest group, indexed by content (fingerprint → origin)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.counter = 0
        self.origin: dict[tuple, tuple[str, str]] = {}  # fingerprint -> (file, name)

    def tensor(self, name: str, shape: list[int]) -> torch.Tensor:
        self.counter += 1
        if name.endswith("num_batches_tracked"):
            t = torch.tensor(1000 + self.counter, dtype=torch.int64)
        elif name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=self.gen)
        else:
            t = 0.05 * torch.randn(shape, generator=self.gen)
        return t

    def group(
        self, file: str, tensors: dict[str, list[int]], prefix: str = "", group: str = ""
    ) -> dict[str, torch.Tensor]:
        """Tensors named ``prefix + name``; their origin is recorded as (file, "group.name")."""
        out = {}
        for name, shape in tensors.items():
            t = self.tensor(name, shape)
            key = _fingerprint(t)
            assert key not in self.origin, "random fill must give every tensor unique content"
            self.origin[key] = (file, f"{group}.{name}" if group else name)
            out[prefix + name] = t
        return out

    def trace(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
        """Our name → (file, reference name) its content came from (KeyError if from none)."""
        return {name: self.origin[_fingerprint(t)] for name, t in tensors.items()}


def _fingerprint(t: torch.Tensor) -> tuple:
    return (str(t.dtype), tuple(t.shape), hash(t.contiguous().numpy().tobytes()))


def _optimizer_state() -> dict:
    return {
        "state": {0: {"step": 7, "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": 2e-4, "betas": (0.5, 0.999), "params": [0]}],
    }


def _checkpoint(manifest: dict, ref: RandomReference, file: str) -> dict:
    """A training checkpoint in the reference layout: model groups (with the manifest's wrapper prefix),
    optimizer states and the epoch counter."""
    prefix = manifest["key_prefix"]
    ckpt = {g: ref.group(file, t, prefix, group=g) for g, t in manifest["groups"].items()}
    for key in manifest["top_level_keys"]:
        if key.startswith("optimizer_"):
            ckpt[key] = _optimizer_state()
    ckpt["epoch"] = 149
    return ckpt


def _forward_is_finite(path: Path) -> None:
    model = load_model(path)
    g = torch.Generator().manual_seed(3)
    size = model.config.image_size
    src, drv = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)
    with torch.no_grad():
        out = model(src, drv)
    assert out.prediction.shape == (1, 3, size, size)
    assert torch.isfinite(out.prediction).all()


@pytest.fixture(scope="module")
def dagan_release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagan")
    ref = RandomReference(seed=1)
    names = ("dagan_vox_adv_256", "dagan_depth_encoder", "dagan_depth_decoder")
    ckpt_m, enc_m, dec_m = (_manifest(n) for n in names)
    ckpt = _checkpoint(ckpt_m, ref, "ckpt")
    encoder = ref.group("encoder", enc_m["groups"][""])
    encoder.update(height=256, width=256, use_stereo=False)  # monodepth2 saves these beside the tensors
    decoder = ref.group("decoder", dec_m["groups"][""])
    paths = tmp / "DaGAN_vox_adv_256.pth.tar", tmp / "encoder.pth", tmp / "depth.pth"
    for obj, path in zip((ckpt, encoder, decoder), paths, strict=True):
        torch.save(obj, path)
    return ref, (ckpt, encoder, decoder), paths, tmp


# Reference (file, name) → ours, written out by hand from the two module structures.
DAGAN_PAIRS = {
    ("ckpt", "generator.first.conv.weight"): "generator.image_encoder.first.conv.weight",
    ("ckpt", "generator.down_blocks.1.norm.running_var"): (
        "generator.image_encoder.down_blocks.1.norm.running_var"
    ),
    ("ckpt", "generator.src_first.norm.num_batches_tracked"): (
        "generator.depth_encoder.first.norm.num_batches_tracked"
    ),
    ("ckpt", "generator.src_down_blocks.0.conv.bias"): "generator.depth_encoder.down_blocks.0.conv.bias",
    ("ckpt", "generator.AttnModule.gamma"): "generator.attention.gamma",
    ("ckpt", "generator.AttnModule.query_conv.weight"): "generator.attention.query_conv.weight",
    ("ckpt", "generator.AttnModule.key_conv.bias"): "generator.attention.key_conv.bias",
    ("ckpt", "generator.AttnModule.value_conv.weight"): "generator.attention.value_conv.weight",
    ("ckpt", "generator.bottleneck.r5.norm2.running_mean"): "generator.bottleneck.5.norm2.running_mean",
    ("ckpt", "generator.bottleneck.r0.conv1.weight"): "generator.bottleneck.0.conv1.weight",
    ("ckpt", "generator.up_blocks.0.conv.weight"): "generator.up_blocks.0.conv.weight",
    ("ckpt", "generator.up_blocks.1.norm.bias"): "generator.up_blocks.1.norm.bias",
    ("ckpt", "generator.final.bias"): "generator.final.bias",
    ("ckpt", "generator.dense_motion_network.hourglass.decoder.up_blocks.4.conv.weight"): (
        "generator.dense_motion_network.hourglass.decoder.up_blocks.4.conv.weight"
    ),
    ("ckpt", "generator.dense_motion_network.occlusion.weight"): (
        "generator.dense_motion_network.occlusion.weight"
    ),
    ("ckpt", "generator.dense_motion_network.down.weight"): "generator.dense_motion_network.down.weight",
    ("ckpt", "kp_detector.predictor.encoder.down_blocks.0.conv.weight"): (
        "kp_detector.predictor.encoder.down_blocks.0.conv.weight"
    ),
    ("ckpt", "kp_detector.kp.weight"): "kp_detector.kp.weight",
    ("ckpt", "kp_detector.jacobian.bias"): "kp_detector.jacobian.bias",
    ("ckpt", "kp_detector.down.weight"): "kp_detector.down.weight",
    ("encoder", "encoder.conv1.weight"): "depth_net.encoder.conv1.weight",
    ("encoder", "encoder.layer2.0.downsample.1.running_var"): (
        "depth_net.encoder.layer2.0.downsample.1.running_var"
    ),
    ("encoder", "encoder.layer4.1.conv2.weight"): "depth_net.encoder.layer4.1.conv2.weight",
    ("decoder", "decoder.0.conv.conv.weight"): "depth_net.decoder.reduce.4.conv.conv.weight",
    ("decoder", "decoder.1.conv.conv.bias"): "depth_net.decoder.fuse.4.conv.conv.bias",
    ("decoder", "decoder.7.conv.conv.weight"): "depth_net.decoder.fuse.1.conv.conv.weight",
    ("decoder", "decoder.8.conv.conv.bias"): "depth_net.decoder.reduce.0.conv.conv.bias",
    ("decoder", "decoder.9.conv.conv.weight"): "depth_net.decoder.fuse.0.conv.conv.weight",
    ("decoder", "decoder.10.conv.bias"): "depth_net.decoder.disp.0.conv.bias",
    ("decoder", "decoder.13.conv.weight"): "depth_net.decoder.disp.3.conv.weight",
}


def test_dagan_release_imports_every_tensor_into_place(dagan_release):
    ref, _, paths, tmp = dagan_release
    out = tmp / "dagan-vox256.safetensors"
    report = import_release("dagan", paths, out)
    cfg, tensors, meta = read_checkpoint(out)
    # vox-256 sizes, with the two switches that reproduce the authors' run-time computation
    assert cfg == load_config("vox-256").replace(
        **{"generator.attention.activation": "relu", "generator.warp_align_corners": False}
    )
    assert any("generator.attention.activation = relu" in n for n in report.notes)
    assert meta["imported_from"] == "dagan" and meta["trained"] == "true" and "partial" not in meta

    traced = ref.trace(tensors)  # KeyError if any tensor of ours was not copied from the files
    for ref_key, ours in DAGAN_PAIRS.items():
        assert traced[ours] == ref_key, ours
    # One-to-one: every reference tensor of the inference model is used exactly once, except the ResNet
    # classifier (no counterpart); the discriminator is a training-only group.
    used = list(traced.values())
    assert len(set(used)) == len(used) == len(tensors) == len(report.assigned) == 447
    classifier = {("encoder", "encoder.fc.weight"), ("encoder", "encoder.fc.bias")}
    manifest = {(f, n) for f, n, _ in _manifest_names()} - classifier
    assert set(used) == manifest
    dropped = sorted(label.split(": ")[1] for label, _ in report.dropped)
    assert dropped == ["encoder.fc.bias", "encoder.fc.weight"]
    skipped = " ".join(entry for entry, _ in report.skipped_entries)
    expected = ("'discriminator'", "'optimizer_generator'", "'epoch'", "height = 256", "use_stereo = False")
    assert all(entry in skipped for entry in expected)
    assert any("wrapper prefix" in n for n in report.notes)
    _forward_is_finite(out)


def _manifest_names():
    """(file, reference name, shape) of the DaGAN inference tensors, as the fixture labels them."""
    rows = []
    ckpt = _manifest("dagan_vox_adv_256")["groups"]
    for group in ("generator", "kp_detector"):
        rows += [("ckpt", f"{group}.{n}", s) for n, s in ckpt[group].items()]
    rows += [("encoder", n, s) for n, s in _manifest("dagan_depth_encoder")["groups"][""].items()]
    rows += [("decoder", n, s) for n, s in _manifest("dagan_depth_decoder")["groups"][""].items()]
    return rows


def test_manifest_sizes_match_our_vox256_model():
    """The reference tensor counts equal ours: 447 tensors once the unused classifier is left out."""
    rows = _manifest_names()
    from dagan.model import DaGAN

    ours = DaGAN(load_config("vox-256")).state_dict()
    kept = [s for f, n, s in rows if not n.startswith("encoder.fc.")]
    assert len(kept) == len(ours)
    assert sum(math.prod(s) for s in kept) == sum(t.numel() for t in ours.values())


def test_problems_are_reported_in_full_and_allow_partial_lists_what_stayed_random(dagan_release):
    ref, (ckpt, encoder, decoder), _, _ = dagan_release
    broken = dict(ckpt)
    gen = dict(ckpt["generator"])
    gen["module.final.weight"] = torch.zeros(3, 64, 3, 3)  # wrong kernel size
    del gen["module.AttnModule.gamma"]  # missing
    gen["module.extra_head.weight"] = torch.zeros(2)  # unexpected
    broken["generator"] = gen
    with pytest.raises(CheckpointImportError) as err:
        import_state_dicts("dagan", [broken, encoder, decoder])
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in msg and "nothing was written" in msg
    assert "missing: generator.attention.gamma [1]" in msg
    assert "unexpected: generator checkpoint: generator.module.extra_head.weight [2]" in msg
    assert "generator.module.final.weight [3, 64, 3, 3] vs ours generator.final.weight [3, 64, 7, 7]" in msg

    result = import_state_dicts("dagan", [broken, encoder, decoder], allow_partial=True, seed=5)
    assert result.report.stayed_random == ["generator.attention.gamma", "generator.final.weight"]
    assert "STAYED RANDOM" in result.report.summary() and "generator.final.weight" in result.report.summary()
    kept = {k: v for k, v in result.state_dict.items() if k not in result.report.stayed_random}
    traced_ok = ref.trace(kept)
    assert traced_ok["generator.up_blocks.0.conv.weight"] == ("ckpt", "generator.up_blocks.0.conv.weight")
    assert result.state_dict["generator.final.weight"].shape == (3, 64, 7, 7)
    with pytest.raises(KeyError):  # the random leftovers are not any reference tensor
        ref.trace({"w": result.state_dict["generator.final.weight"]})


def test_wrong_files_get_a_short_message_with_the_fix(dagan_release, tmp_path, capsys):
    """A file passed to the wrong option is named in one sentence, not hundreds of mismatch lines."""
    _, (ckpt, encoder, decoder), paths, _ = dagan_release
    fomm_like = {
        "generator": {
            k: v for k, v in ckpt["generator"].items() if "AttnModule" not in k and "src_" not in k
        },
        "kp_detector": ckpt["kp_detector"],
    }
    with pytest.raises(CheckpointImportError, match=r"FOMM training checkpoint.*import it with --fomm"):
        import_state_dicts("dagan", [fomm_like, encoder, decoder])
    with pytest.raises(CheckpointImportError, match=r"DaGAN training checkpoint.*import it with --dagan"):
        import_state_dicts("fomm", [ckpt])
    with pytest.raises(CheckpointImportError, match=r"depth encoder.*pass it with --depth-encoder"):
        import_state_dicts("dagan", [encoder, encoder, decoder])

    # swapped depth files: one line that says so (the mapping would list ~300 mismatches)
    swapped = ["--depth-encoder", str(paths[2]), "--depth-decoder", str(paths[1])]
    code = main(["import", "--dagan", str(paths[0]), *swapped, "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "swap the two" in err and len(err) < 300, err
    assert not (tmp_path / "x.safetensors").exists()

    # bare state dicts (the generator alone, with or without the DDP prefix): short, with the fix
    bare = tmp_path / "generator.pth"
    torch.save(ckpt["generator"], bare)
    depth = ["--depth-encoder", str(paths[1]), "--depth-decoder", str(paths[2])]
    code = main(["import", "--dagan", str(bare), *depth, "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "bare generator state dict" in err and "torch.save({'generator'" in err
    assert len(err) < 600, len(err)  # was one 11,498-character line of keys
    for kp_only in (ckpt["kp_detector"], {"w1": torch.zeros(2), "w2": torch.zeros(3)}):
        with pytest.raises(CheckpointImportError) as exc:
            import_state_dicts("fomm", [kp_only])
        assert len(str(exc.value)) < 600 and "'generator' and 'kp_detector' state dicts" in str(exc.value)
    with pytest.raises(CheckpointImportError, match=r"state dict of 2 tensors of an unknown model \('w1'"):
        import_state_dicts("fomm", [{"w1": torch.zeros(2), "w2": torch.zeros(3)}])


def test_a_checkpoint_of_another_size_points_at_config(dagan_release):
    _, loaded, _, _ = dagan_release
    with pytest.raises(CheckpointImportError) as exc:
        import_state_dicts("dagan", list(loaded), config="tiny")
    assert "mis-shaped" in str(exc.value) and "pass --config" in str(exc.value)


def test_fomm_vox256_through_the_cli(tmp_path, capsys):
    manifest = _manifest("fomm_vox_256")
    ref = RandomReference(seed=2)
    ckpt = _checkpoint(manifest, ref, "fomm")
    path = tmp_path / "vox-cpk.pth.tar"
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)  # the legacy format FOMM's files use
    out = tmp_path / "fomm-vox256.safetensors"
    assert main(["import", "--fomm", str(path), "--out", str(out)]) == 0
    assert "imported 271 tensors (59,815,042 values)" in capsys.readouterr().out

    cfg, tensors, meta = read_checkpoint(out)
    assert meta["imported_from"] == "fomm"
    assert cfg == load_config("fomm") and cfg.keypoints.num_kp == 10 and not cfg.keypoints.use_depth
    assert not any(k.startswith("depth_net.") or ".attention." in k for k in tensors)
    traced = ref.trace(tensors)
    expected = {
        "generator.image_encoder.first.norm.weight": ("fomm", "generator.first.norm.weight"),
        "generator.image_encoder.down_blocks.0.conv.weight": ("fomm", "generator.down_blocks.0.conv.weight"),
        "generator.bottleneck.3.conv2.bias": ("fomm", "generator.bottleneck.r3.conv2.bias"),
        "generator.final.weight": ("fomm", "generator.final.weight"),
        "generator.dense_motion_network.mask.weight": ("fomm", "generator.dense_motion_network.mask.weight"),
        "kp_detector.kp.weight": ("fomm", "kp_detector.kp.weight"),
        "kp_detector.predictor.decoder.up_blocks.2.norm.running_mean": (
            "fomm",
            "kp_detector.predictor.decoder.up_blocks.2.norm.running_mean",
        ),
    }
    for ours, origin in expected.items():
        assert traced[ours] == origin
    inference = {("fomm", f"{g}.{n}") for g in ("generator", "kp_detector") for n in manifest["groups"][g]}
    assert set(traced.values()) == inference and len(tensors) == len(inference) == 271
    _forward_is_finite(out)


def test_cli_argument_errors(tmp_path, capsys):
    assert main(["import", "--dagan", "g.pth", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--depth-encoder" in capsys.readouterr().err
    assert main(["import", "--fomm", "a", "--depth-encoder", "b", "--out", "x"]) == 2
    assert "takes no depth files" in capsys.readouterr().err
    assert main(["import", "--out", "x"]) == 2
    assert "exactly one of" in capsys.readouterr().err


def test_loading_never_runs_pickled_code(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"generator": {"w": torch.zeros(1)}, "opt": argparse.Namespace(lr=1)}, unsafe)
    with pytest.raises(CheckpointImportError, match=r"refused to load: .*it needs argparse\.Namespace"):
        load_reference_file(unsafe)
    with pytest.raises(CheckpointImportError, match="no such file"):
        load_reference_file(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointImportError, match="not a readable PyTorch checkpoint"):
        load_reference_file(junk)


# The model section of the authors' vox-adv-256.yaml with the widths of a smaller model a user trained.
AUTHORS_YAML = """
dataset_params:
  frame_shape: [128, 128, 3]
model_params:
  common_params:
    num_kp: 15
    num_channels: 3
    estimate_jacobian: True
  kp_detector_params:
     temperature: 0.1
     block_expansion: 16
     max_features: 256
     scale_factor: 0.25
     num_blocks: 5
  generator_params:
    block_expansion: 32
    max_features: 256
    num_down_blocks: 2
    num_bottleneck_blocks: 6
    estimate_occlusion_map: True
    dense_motion_params:
      block_expansion: 32
      max_features: 512
      num_blocks: 5
      scale_factor: 0.25
  discriminator_params:
    scales: [1]
    block_expansion: 32
    max_features: 512
    num_blocks: 4
    use_kp: True
train_params:
  num_epochs: 150
"""


def test_import_config_reads_the_authors_yaml(tmp_path):
    import yaml

    from dagan.importer import reference_config, resolve_import_config

    path = tmp_path / "my-vox-128.yaml"
    path.write_text(AUTHORS_YAML)
    cfg = resolve_import_config(path, "dagan")
    assert cfg.name == "my-vox-128" and cfg.image_size == 128
    assert (cfg.keypoints.num_kp, cfg.keypoints.block_expansion, cfg.keypoints.max_features) == (15, 16, 256)
    assert cfg.keypoints.estimate_jacobian and cfg.keypoints.use_depth
    g = cfg.generator
    assert (g.block_expansion, g.max_features, g.dense_motion.max_features) == (32, 256, 512)
    assert g.attention.qk_channels == 128 // 8  # DaGAN's AttnModule: bottleneck channels / 8
    # what the YAML cannot say comes from the release's preset (the fixed ResNet18 depth net)
    assert cfg.depth == load_config("vox-256").depth
    fomm = resolve_import_config(path, "fomm")
    assert not fomm.generator.attention.enabled and not fomm.keypoints.use_depth

    # the reference constructors' defaults for optional keys (not our schema's)
    data = yaml.safe_load(AUTHORS_YAML)
    del data["model_params"]["kp_detector_params"]["scale_factor"]
    del data["model_params"]["common_params"]["estimate_jacobian"]
    cfg = reference_config(data, "fomm")
    assert cfg.keypoints.scale_factor == 1.0 and not cfg.keypoints.estimate_jacobian

    # our own YAML and presets pass through unchanged
    ours = tmp_path / "ours.yaml"
    ours.write_text(load_config("tiny").to_yaml())
    assert resolve_import_config(ours, "dagan") == load_config("tiny")
    assert resolve_import_config("fomm", "dagan") == load_config("fomm")
    assert resolve_import_config(None, "fomm") == load_config("fomm")

    bad = yaml.safe_load(AUTHORS_YAML)
    bad["model_params"]["generator_params"]["use_spade"] = True
    with pytest.raises(CheckpointImportError, match=r"generator_params\.use_spade has no counterpart"):
        reference_config(bad, "dagan")
    del bad["model_params"]["generator_params"]
    with pytest.raises(CheckpointImportError, match="no generator_params"):
        reference_config(bad, "dagan")
    with pytest.raises(CheckpointImportError, match="neither a preset"):
        resolve_import_config(tmp_path / "absent.yaml", "dagan")


def test_import_with_config_and_align_corners_through_the_cli(tmp_path, capsys):
    """A FOMM checkpoint of another size imports with --config; --align-corners overrides the default."""
    from dagan.importer import resolve_import_config

    path = tmp_path / "my-vox-128.yaml"
    path.write_text(AUTHORS_YAML)
    cfg = resolve_import_config(path, "fomm")
    torch.manual_seed(0)
    from dagan.model import DaGAN

    ours = DaGAN(cfg).state_dict()
    # write our tensors back in FOMM's layout through the (inverse of the) explicit table
    ckpt = {"generator": {}, "kp_detector": {}}
    for name, t in ours.items():
        group, _, rest = name.partition(".")
        rest = rest.replace("image_encoder.", "").replace("bottleneck.", "bottleneck.r")
        ckpt[group][rest] = t
    file = tmp_path / "my-fomm.pth.tar"
    torch.save(ckpt, file)
    out = tmp_path / "my-fomm.safetensors"
    assert main(["import", "--fomm", str(file), "--config", str(path), "--out", str(out)]) == 0
    assert "warp_align_corners" not in capsys.readouterr().out
    got, tensors, _ = read_checkpoint(out)
    assert got == cfg and got.generator.warp_align_corners is True
    assert all(torch.equal(tensors[k], v) for k, v in ours.items())
    args = [
        "import",
        "--fomm",
        str(file),
        "--config",
        str(path),
        "--align-corners",
        "false",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "warp_align_corners = False (as asked)" in capsys.readouterr().out
    assert read_checkpoint(out)[0].generator.warp_align_corners is False
