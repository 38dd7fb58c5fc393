from __future__ import annotations

import pytest
import torch
from helpers import make_model
from safetensors.torch import save_file

from dagan.checkpoint import (
    CheckpointError,
    checkpoint_metadata,
    load_model,
    read_checkpoint,
    save_checkpoint,
)


def test_round_trip_restores_config_and_outputs(tmp_path, tiny_model):
    path = tmp_path / "w" / "model.safetensors"
    save_checkpoint(path, tiny_model.config, tiny_model, extra_metadata={"trained": "false"})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, like any file written under umask 022
    cfg, tensors, meta = read_checkpoint(path)
    assert cfg == tiny_model.config
    assert meta["trained"] == "false" and checkpoint_metadata(path)["trained"] == "false"
    assert set(tensors) == set(tiny_model.state_dict())
    loaded = load_model(path)
    assert not loaded.training
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x, y).prediction, tiny_model(x, y).prediction)


def test_metadata_carried_from_another_checkpoint_never_overrides_the_config(tmp_path, tiny_model):
    """A file derived from another (scripts/swap_depth.py, fit_heads.py, set_model_config.py) passes the
    source's whole metadata on: its entries stay, its ``format`` and ``config`` give way to the new ones."""
    src = tmp_path / "src.safetensors"
    save_checkpoint(src, tiny_model.config, tiny_model, {"trained": "true"})
    _, tensors, meta = read_checkpoint(src)
    changed = tiny_model.config.replace(**{"generator.attention.kv_pool": 2})
    out = tmp_path / "out.safetensors"
    save_checkpoint(out, changed, tensors, {**meta, "format": "stale", "note": "x"})
    cfg, _, saved = read_checkpoint(out)
    assert cfg == changed and cfg != tiny_model.config
    assert saved["trained"] == "true" and saved["note"] == "x" and saved["format"] != "stale"


def test_mismatched_config_lists_tensors(tmp_path, tiny_model, tiny_config):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model.config, tiny_model)
    other = tiny_config.replace(**{"keypoints.num_kp": 10, "generator.attention.enabled": False})
    with pytest.raises(CheckpointError) as err:
        load_model(path, config=other)
    msg = str(err.value)
    assert "does not match the model config" in msg
    assert "shape: kp_detector.kp.weight checkpoint [15," in msg
    assert "unexpected: generator.attention.gamma" in msg


def test_missing_tensor_is_reported(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state.pop("generator.final.bias")
    path = tmp_path / "partial.safetensors"
    save_checkpoint(path, tiny_model.config, state)
    with pytest.raises(CheckpointError, match=r"missing: generator\.final\.bias \[3\]"):
        load_model(path)


def test_training_only_groups_are_ignored_for_inference(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["discriminator.discs.disc_1.conv.weight"] = torch.zeros(1, 4, 1, 1)
    state["pose_net.head.weight"] = torch.zeros(3)
    path = tmp_path / "train.safetensors"
    save_checkpoint(path, tiny_model.config, state)
    load_model(path)  # must not raise


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        read_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a DaGAN checkpoint"):
        load_model(foreign)


def test_failed_write_leaves_previous_file_intact(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tiny_model.config, tiny_model)
    before = path.read_bytes()

    import dagan.checkpoint as ck

    def explode(state, tmp, metadata=None):
        with open(tmp, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", explode)
    other = make_model(tiny_model.config, seed=3)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, other.config, other)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_swap_depth_takes_the_depth_net_and_its_config_from_the_depth_run(tmp_path):
    """scripts/swap_depth.py: the DaGAN tensors stay, the depth net and ``depth`` config come from the
    depth checkpoint (here a half-resolution one), and a depth run of another model is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from swap_depth import swap_depth

    from dagan.config import load_config

    base = load_config("tiny").replace(image_size=128)
    model = make_model(base, seed=0)
    half = make_model(base.replace(**{"depth.input_scale": 0.5}), seed=1)
    half_depth = {f"depth_net.{k}": v for k, v in half.depth_net.state_dict().items()}
    save_checkpoint(tmp_path / "dagan.safetensors", base, model, {"trained": "true"})
    save_checkpoint(tmp_path / "depth.safetensors", half.config, half_depth)
    out = tmp_path / "out.safetensors"
    meta = swap_depth(tmp_path / "dagan.safetensors", tmp_path / "depth.safetensors", out, "x")
    cfg, tensors, saved = read_checkpoint(out)
    assert cfg.depth.input_scale == 0.5 and cfg.generator == base.generator
    assert meta["depth"] == saved["depth"] == "x" and saved["trained"] == "true"
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], half_depth.get(k, v)), k
    other = make_model(base.replace(**{"keypoints.num_kp": 5}))
    save_checkpoint(tmp_path / "other.safetensors", other.config, other)
    with pytest.raises(CheckpointError, match="another model"):
        swap_depth(tmp_path / "dagan.safetensors", tmp_path / "other.safetensors", tmp_path / "bad")


def test_swap_generator_takes_only_the_generator_and_keeps_the_bundled_settings(tmp_path):
    """scripts/swap_generator.py: the generator comes from a run that froze the keypoint detector; the
    config (with the settings chosen after training) and every other tensor stay; a run that changed the
    detector, or a generator of another shape, is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from swap_generator import swap_generator

    from dagan.config import load_config

    base = load_config("tiny").replace(image_size=128)
    shipped = base.replace(**{"keypoints.jacobian_gain": 1.3})  # a setting made after training
    model = make_model(base, seed=0)
    save_checkpoint(tmp_path / "shipped.safetensors", shipped, model, {"trained": "true"})
    tuned = make_model(base, seed=0)
    with torch.no_grad():
        for p in tuned.generator.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path / "run.safetensors", base, tuned)
    out = tmp_path / "out.safetensors"
    meta = swap_generator(tmp_path / "shipped.safetensors", tmp_path / "run.safetensors", out, "x")
    cfg, tensors, saved = read_checkpoint(out)
    assert cfg == shipped and meta["generator"] == saved["generator"] == "x" and saved["trained"] == "true"
    for k, v in model.state_dict().items():
        want = tuned.state_dict()[k] if k.startswith("generator.") else v
        assert torch.equal(tensors[k], want), k
    assert any(not torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        next(tuned.kp_detector.parameters()).add_(0.01)
    save_checkpoint(tmp_path / "moved.safetensors", base, tuned)
    with pytest.raises(CheckpointError, match="changed kp_detector"):
        swap_generator(tmp_path / "shipped.safetensors", tmp_path / "moved.safetensors", tmp_path / "bad")
    other = make_model(base.replace(**{"generator.block_expansion": 16}))
    save_checkpoint(tmp_path / "other.safetensors", other.config, other)
    with pytest.raises(CheckpointError, match="generator"):
        swap_generator(tmp_path / "shipped.safetensors", tmp_path / "other.safetensors", tmp_path / "bad")


def test_set_model_config_keeps_the_tensors_and_refuses_a_new_model(tmp_path):
    """scripts/set_model_config.py: the same tensors under the changed config (here pooled attention
    keys, which the model then uses), the change recorded; a change that needs other tensors, or an
    unknown key, is refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from set_model_config import DEFAULT_CLIPS, check, parse_set, set_model_config

    from dagan.checkpoint import load_model
    from dagan.config import ConfigError, load_config

    base = load_config("tiny")
    model = make_model(base, seed=0)
    with torch.no_grad():
        model.generator.attention.gamma.fill_(1.0)  # an attention that matters
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, base, model, {"trained": "true"})
    out = tmp_path / "out.safetensors"
    changes = parse_set(["generator.attention.kv_pool=4"])
    assert changes == {"generator.attention.kv_pool": 4}
    meta = set_model_config(src, changes, out)
    cfg, tensors, saved = read_checkpoint(out)
    assert cfg == base.replace(**changes) and cfg.generator.attention.kv_pool == 4
    assert saved["trained"] == "true" and meta["config_changes"] == saved["config_changes"]
    assert saved["config_changes"] == "generator.attention.kv_pool=4"
    for k, v in model.state_dict().items():
        if not k.startswith("discriminator"):
            assert torch.equal(tensors[k], v), k
    pooled = load_model(out).eval()
    assert pooled.generator.attention.kv_pool == 4
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        a, b = model.eval()(frames[:1], frames[1:]).prediction, pooled(frames[:1], frames[1:]).prediction
    assert 0 < float((a - b).abs().max()) < 0.1
    clips = [c for c in DEFAULT_CLIPS if c.is_file()][:2]
    if clips:  # --check on real held-out frames (../shared): 2 clips → 2 × 2 × 9 pairs
        median, low, n = check(src, out, clips)
        assert n == 36 and 20 < low <= median <= 120
        assert check(src, src, clips)[:2] == (120.0, 120.0)  # the same model: identical frames (clamped)
    with pytest.raises(CheckpointError, match="new model"):
        set_model_config(src, {"generator.attention.qk_channels": 4}, tmp_path / "bad.safetensors")
    # a model without a depth net (RGB keypoints, no attention) is checked the same way, and a file's
    # training-only groups do not count as tensors the new model lacks
    plain = base.replace(**{"keypoints.use_depth": False, "generator.attention.enabled": False})
    rgb = tmp_path / "rgb.safetensors"
    save_checkpoint(rgb, plain, {**make_model(plain).state_dict(), "pose_net.head.weight": torch.zeros(3)})
    set_model_config(rgb, {"generator.attention.kv_pool": 2}, tmp_path / "rgb2.safetensors")
    assert load_model(tmp_path / "rgb2.safetensors").depth_net is None
    with pytest.raises(CheckpointError, match="new model"):
        set_model_config(rgb, {"keypoints.use_depth": True}, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="unknown config key"):
        set_model_config(src, {"generator.attention.pool": 4}, tmp_path / "bad.safetensors")


def test_set_model_config_remakes_the_blur_kernels_of_a_new_scale_factor(tmp_path):
    """A finer motion field (``generator.dense_motion.scale_factor``) changes no learned tensor, only the
    anti-alias kernel its scale fixes: the file is written with the new kernel and every other tensor as
    it was, loads, and its dense motion then works at the new resolution."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from set_model_config import set_model_config

    from dagan.checkpoint import load_model
    from dagan.config import load_config

    base = load_config("tiny")
    assert base.generator.dense_motion.scale_factor == 0.5
    model = make_model(base, seed=0)
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, base, model)
    out = tmp_path / "fine.safetensors"
    set_model_config(src, {"generator.dense_motion.scale_factor": 1.0}, out)
    cfg, tensors, saved = read_checkpoint(out)
    assert cfg.generator.dense_motion.scale_factor == 1.0
    assert saved["config_changes"] == "generator.dense_motion.scale_factor=1.0"
    kernel = "generator.dense_motion_network.down.weight"
    assert tensors[kernel].shape == (3, 1, 1, 1) and model.state_dict()[kernel].shape[-1] > 1
    for k, v in model.state_dict().items():
        if k != kernel and not k.startswith("discriminator"):
            assert torch.equal(tensors[k], v), k
    fine = load_model(out).eval()
    frames = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masks = [m.eval()(frames[:1], frames[1:]).generator.mask for m in (model, fine)]
    assert masks[0].shape[-1] == 32 and masks[1].shape[-1] == 64  # the motion field at full resolution


def test_load_into_takes_the_modules_own_blur_kernels_so_another_scale_is_a_fine_tuning_start():
    """``--init`` from a file made at another scale factor: the learned tensors load, the kernels are the
    module's own; a learned tensor of the wrong shape is still refused."""
    from dagan.checkpoint import blur_kernels, load_into
    from dagan.config import load_config

    base = load_config("tiny")
    coarse = make_model(base, seed=0)
    fine = make_model(base.replace(**{"generator.dense_motion.scale_factor": 1.0}), seed=1)
    own = blur_kernels(fine.generator, "generator.")
    assert set(own) == {"generator.dense_motion_network.down.weight"}
    load_into(fine.generator, coarse.state_dict(), "generator.")
    for k, v in fine.generator.state_dict().items():
        expected = own.get(f"generator.{k}", coarse.state_dict()[f"generator.{k}"])
        assert torch.equal(v, expected), k
    bad = dict(coarse.state_dict())
    bad["generator.final.weight"] = bad["generator.final.weight"][:, :1]
    with pytest.raises(CheckpointError, match=r"generator\.final\.weight"):
        load_into(fine.generator, bad, "generator.")


def test_fit_heads_distils_smaller_heads_that_track_the_7x7_model(tmp_path):
    """scripts/fit_heads.py: the copy has the smaller kernels in its config, every other tensor of the
    original, and frames much closer to the original's than the same model with untrained small heads."""
    import sys
    from pathlib import Path

    import cv2
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from fit_heads import fit_heads, load_batch, psnr_against

    from dagan.config import load_config
    from dagan.model import DaGAN
    from dagan.samples import astronaut, driving_frames, grace_hopper

    for split in ("train", "test"):
        for name, photo in (("a", astronaut()), ("b", grace_hopper())):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i, frame in enumerate(driving_frames(photo, 6, size=64)):
                cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    teacher = make_model(load_config("tiny"), seed=0)
    save_checkpoint(tmp_path / "t.safetensors", teacher.config, teacher, {"trained": "true"})
    out = tmp_path / "k3.safetensors"
    result = fit_heads(
        tmp_path / "t.safetensors", tmp_path / "data", out, kernel=3, steps=4, batch=2, per_clip=2
    )
    cfg, tensors, meta = read_checkpoint(out)
    assert cfg.generator.final_kernel_size == 3 and cfg.generator.dense_motion.head_kernel_size == 3
    assert tuple(tensors["generator.final.weight"].shape[-2:]) == (3, 3) and "3x3" in meta["heads"]
    for k, v in teacher.state_dict().items():
        if not k.endswith(
            ("final.weight", "final.bias", "mask.weight", "mask.bias", "occlusion.weight", "occlusion.bias")
        ):
            assert torch.equal(tensors[k], v), k
    untrained = DaGAN(cfg).eval()
    untrained.load_state_dict(
        {k: v for k, v in tensors.items() if "final" not in k and "mask" not in k and "occlusion" not in k},
        strict=False,
    )
    pairs = [
        (p, q)
        for p in sorted((tmp_path / "data" / "test" / "a").iterdir())[:1]
        for q in sorted((tmp_path / "data" / "test" / "b").iterdir())
    ]
    batch = [load_batch(pairs, 64)]
    assert result["least_squares_psnr_db"] > np.median(psnr_against(teacher, untrained, batch)) + 10
    assert result["psnr_db"] > 30
    # --heads output: only the output conv shrinks; the motion heads stay the original's
    out = tmp_path / "k3-output.safetensors"
    fit_heads(tmp_path / "t.safetensors", tmp_path / "data", out, kernel=3, heads="output", steps=1, batch=2)
    cfg, tensors, _ = read_checkpoint(out)
    assert cfg.generator.final_kernel_size == 3 and cfg.generator.dense_motion.head_kernel_size == 7
    state = teacher.state_dict()
    assert torch.equal(
        tensors["generator.dense_motion_network.mask.weight"],
        state["generator.dense_motion_network.mask.weight"],
    )
