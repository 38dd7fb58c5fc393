from __future__ import annotations

import dataclasses

import pytest

from dagan.config import PRESETS, ConfigError, DenseMotionConfig, load_config


@dataclasses.dataclass(frozen=True)
class Section:
    """A schema of a test's own, with a nested section of the model's."""

    scales: tuple[float, ...] = (1.0,)
    motion: DenseMotionConfig = dataclasses.field(default_factory=DenseMotionConfig)


def test_presets_load_and_vox_has_reference_sizes():
    for name in PRESETS:
        assert load_config(name).name == name
    vox = load_config("vox-256")
    assert vox.image_size == 256
    kp = vox.keypoints
    assert (kp.block_expansion, kp.max_features, kp.num_blocks, kp.num_kp) == (32, 1024, 5, 15)
    assert (kp.temperature, kp.scale_factor, kp.estimate_jacobian, kp.use_depth) == (0.1, 0.25, True, True)
    g = vox.generator
    assert (g.block_expansion, g.max_features, g.num_down_blocks, g.num_bottleneck_blocks) == (64, 512, 2, 6)
    dm = g.dense_motion
    assert (dm.block_expansion, dm.max_features, dm.num_blocks, dm.scale_factor) == (64, 1024, 5, 0.25)
    assert g.attention.qk_channels == 32
    d = vox.discriminator
    assert (d.block_expansion, d.max_features, d.num_blocks, d.scales) == (32, 512, 4, (1.0,))
    # The schema defaults are the vox-256 sizes, so a partial YAML means "vox-256 with changes".
    assert load_config({}) == vox


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"generator\.attention\.qk_chanels"):
        load_config({"generator": {"attention": {"qk_chanels": 8}}})
    with pytest.raises(ConfigError, match="unknown config key: colour"):
        load_config({"colour": 1})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"keypoints": {"num_kp": "15"}}, "keypoints.num_kp"),
        ({"keypoints": {"num_kp": 1.5}}, "keypoints.num_kp"),
        ({"keypoints": {"use_depth": "yes"}}, "keypoints.use_depth"),
        ({"image_size": True}, "image_size"),
        ({"depth": {"scales": 3}}, "depth.scales"),
        ({"depth": {"scales": [0, "a"]}}, r"depth.scales\[1\]"),
        ({"generator": 5}, "generator"),
        ({"image_size": 100}, "image_size"),
        ({"keypoints": {"scale_factor": 0}}, "keypoints.scale_factor"),
        ({"generator": {"attention": {"implementation": "fast"}}}, "generator.attention.implementation"),
        ({"depth": {"min_depth": 10.0, "max_depth": 1.0}}, "depth.min_depth"),
        ({"depth": {"input_scale": 0.3}}, "depth.input_scale"),
        ({"image_size": 96, "depth": {"input_scale": 0.5}}, "depth.input_scale"),
        ({"generator": {"final_kernel_size": 4}}, "generator.final_kernel_size"),
        ({"generator": {"attention": {"kv_pool": 3}}}, "generator.attention.kv_pool"),
        ({"image_size": 96, "generator": {"num_down_blocks": 4, "attention": {"kv_pool": 4}}}, "kv_pool"),
        ({"generator": {"dense_motion": {"head_kernel_size": 9}}}, "generator.dense_motion.head_kernel_size"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        load_config(data)


def test_yaml_file_round_trip_and_errors(tmp_path):
    cfg = load_config("tiny")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("keypoints: {num_kp: [1}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("keypoint:\n  num_kp: 10\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key: keypoint"):
        load_config(typo)


def test_replace_with_dotted_keys():
    cfg = load_config("tiny")
    off = cfg.replace(**{"generator.attention.enabled": False, "keypoints.use_depth": False})
    assert not off.generator.attention.enabled and not off.keypoints.use_depth
    assert cfg.generator.attention.enabled  # original untouched (frozen dataclasses)
    with pytest.raises(ConfigError, match=r"generator\.atention"):
        cfg.replace(**{"generator.atention.enabled": False})


def test_schema_builder_is_public_and_shared_with_the_training_config():
    """build_dataclass / to_plain are the one strict schema builder: any frozen dataclass gets the model
    config's rules (unknown key and wrong type named by path), and the training config is built with it."""
    import inspect

    import training.config
    from dagan.config import build_dataclass, to_plain

    built = build_dataclass(Section, {"scales": [1, 0.5], "motion": {"num_blocks": 3}})
    assert built.scales == (1.0, 0.5) and built.motion.num_blocks == 3
    assert to_plain(built)["scales"] == [1.0, 0.5] and build_dataclass(Section, to_plain(built)) == built
    with pytest.raises(ConfigError, match=r"unknown config key: top\.motion\.blocks"):
        build_dataclass(Section, {"motion": {"blocks": 3}}, "top")
    with pytest.raises(ConfigError, match=r"motion\.num_blocks: expected an integer"):
        build_dataclass(Section, {"motion": {"num_blocks": "3"}})
    source = inspect.getsource(training.config)
    assert "build_dataclass" in source and "import _" not in source and ", _" not in source
    for function in (build_dataclass, to_plain):
        assert len(inspect.getdoc(function)) > 80
