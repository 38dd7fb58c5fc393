"""Training: config, data, losses, both stages (loss goes down, depth is right, resume is exact, DDP keeps
ranks identical) and dataset preparation. Everything runs on CPU on data the tests make themselves."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from synthetic_scenes import render_clip

from dagan.config import ConfigError
from dagan.media import write_video
from dagan.samples import astronaut, driving_frames, grace_hopper
from training import losses as L
from training import perceptual as P
from training.config import load_train_config, parse_override
from training.data import ConsecutiveFramesDataset, DatasetError, ResumableSampler, SourceDrivingDataset
from training.trainer import Trainer, TrainingError, cleanup_distributed

NO_AUGMENT = {"flip": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def _write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def face_root(tmp_path_factory) -> Path:
    """Three short clips of real photos under smooth synthetic head motion (two frame folders, one mp4)."""
    root = tmp_path_factory.mktemp("faces")
    for split in ("train", "test"):
        _write_frames(root / split / "astronaut", driving_frames(astronaut(), 16, size=64))
        _write_frames(root / split / "hopper", driving_frames(grace_hopper(), 16, size=64, amplitude=0.7))
        write_video(root / split / "astro-small.mp4", driving_frames(astronaut(), 12, size=64, amplitude=0.5))
    return root


def _cfg(root: Path, **extra):
    data = {
        "model": "tiny",
        "data": {"root": str(root), "workers": 0, "repeats": 4},
        "depth": {"steps": 30, "batch_size": 4, "lr": 5e-4},
        "dagan": {"steps": 30, "batch_size": 4},
        "checkpoint_every": 15,
        "log_every": 5,
        "image_every": 10,
    }
    cfg = load_train_config(data)
    return cfg.replace(**extra) if extra else cfg


def _first_last(history: list[dict[str, float]], n: int = 5) -> tuple[float, float]:
    losses = [h["loss"] for h in history]
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_papers_and_errors_name_the_key(tmp_path):
    cfg = load_train_config(None)
    w = cfg.dagan.weights
    assert (w.perceptual, w.gan, w.equivariance_value, w.kp_distance) == (10.0, 1.0, 10.0, 10.0)
    assert cfg.depth.ssim_alpha == 0.8 and cfg.dagan.kp_distance_threshold == 0.2
    assert cfg.dagan.pyramid_scales == (1.0, 0.5, 0.25, 0.125) and cfg.model.name == "vox-256"
    with pytest.raises(ConfigError, match=r"dagan\.weights\.perceptul"):
        load_train_config({"dagan": {"weights": {"perceptul": 1}}})
    with pytest.raises(ConfigError, match="precision"):
        load_train_config({"precision": "fp8"})
    with pytest.raises(ConfigError, match="model"):
        load_train_config({"model": "no-such-preset"})
    inline = load_train_config({"model": {"name": "x", "image_size": 64, "keypoints": {"num_kp": 5}}})
    assert inline.model.keypoints.num_kp == 5
    path = tmp_path / "t.yaml"
    path.write_text(cfg.replace(**{"dagan.batch_size": 3}).to_yaml())
    again = load_train_config(path, {"depth.lr": 1e-3, "model.keypoints.num_kp": 7})
    assert again.dagan.batch_size == 3 and again.depth.lr == 1e-3 and again.model.keypoints.num_kp == 7
    assert parse_override("dagan.pyramid_scales=[1, 0.5]") == ("dagan.pyramid_scales", [1, 0.5])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


# -------------------------------------------------------------------------------------------- data


def test_datasets_read_folders_and_mp4_deterministically(face_root):
    ds = SourceDrivingDataset(face_root, "train", 64, repeats=2, augment=load_train_config(None).data.augment)
    assert len(ds) == 6 and {v.name for v in ds.videos} == {"astronaut", "hopper", "astro-small"}
    mp4 = next(v for v in ds.videos if v.name == "astro-small")
    assert mp4.num_frames == 12
    item = ds[(3, 2)]
    assert item["source"].shape == (3, 64, 64) and 0 <= float(item["source"].min()) <= 1
    assert torch.equal(item["driving"], ds[(3, 2)]["driving"])  # pure function of (epoch, index)
    assert not torch.equal(item["driving"], ds[(4, 2)]["driving"])
    pairs = ConsecutiveFramesDataset(face_root, "train", 64, offsets=(-1, 1))
    assert pairs[(0, 0)]["sources"].shape == (2, 3, 64, 64)
    with pytest.raises(DatasetError, match="does not exist"):
        SourceDrivingDataset(face_root, "val", 64)


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = ResumableSampler(10, batch_size=2, seed=3)
    it = iter(full)
    keys = [next(it) for _ in range(30)]  # 3 epochs of 5 steps
    resumed = iter(ResumableSampler(10, batch_size=2, seed=3, start_step=7))
    assert [next(resumed) for _ in range(16)] == keys[14:]
    r0 = ResumableSampler(10, 2, rank=0, world_size=2, seed=3).epoch_keys(0)
    r1 = ResumableSampler(10, 2, rank=1, world_size=2, seed=3).epoch_keys(0)
    assert len(r0) == len(r1) == 6 and {i for _, i in r0 + r1} == set(range(10))


# ------------------------------------------------------------------------------------------ losses


def test_photometric_and_automask():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32)
    assert float(L.photometric_error(target, target).max()) < 1e-6
    noisy = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    pe = L.photometric_error(noisy, target)
    assert pe.shape == (2, 1, 32, 32) and float(pe.mean()) > 0.02
    # The warp explains the left half, the unwarped source the right half: auto-masking drops the right.
    warped = target.clone()
    warped[..., 16:] = torch.rand(2, 3, 32, 16)
    source = torch.rand_like(target)
    source[..., 16:] = target[..., 16:]
    loss, mask = L.reprojection_loss([warped], [source], target)
    assert float(mask[..., 2:14].mean()) == 1.0 and float(mask[..., 18:30].mean()) == 0.0
    assert float(loss) < 0.01
    # Minimum reprojection picks, per pixel, the source that explains it.
    other = target.clone()
    other[..., :16] = torch.rand(2, 3, 32, 16)
    loss_min, _ = L.reprojection_loss([warped, other], [source, source], target, automask=False)
    loss_mean, _ = L.reprojection_loss(
        [warped, other], [source, source], target, automask=False, min_reprojection=False
    )
    assert float(loss_min) < 0.01 < float(loss_mean)
    flat = torch.full((1, 1, 16, 16), 0.5)
    ramp = torch.linspace(0.1, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    image = torch.rand(1, 3, 16, 16)
    assert float(L.edge_aware_smoothness(flat, image)) < 1e-6 < float(L.edge_aware_smoothness(ramp, image))


def test_random_transform_is_consistent_with_its_warp_and_jacobian():
    g = torch.Generator().manual_seed(0)
    tr = L.RandomTransform(2, sigma_affine=0.05, sigma_tps=0.005, points=5, generator=g)
    # An image whose channels are its own coordinates: warping it must give T(z) (bilinear is exact
    # for linear functions away from the border).
    h = w = 33
    grid = torch.stack(
        torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")[::-1]
    )
    warped = tr.transform_frame(grid[None].expand(2, -1, -1, -1).contiguous())
    z = grid.permute(1, 2, 0).reshape(1, -1, 2).expand(2, -1, -1)
    expected = tr.warp_coordinates(z).view(2, h, w, 2).permute(0, 3, 1, 2)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert torch.allclose(warped[inner], expected[inner], atol=1e-4)
    assert not torch.allclose(expected, grid[None], atol=1e-3)  # it is not the identity
    pts = torch.rand(2, 7, 2) * 1.6 - 0.8
    jac = tr.jacobian(pts)
    eps = 1e-3
    for axis in range(2):
        d = torch.zeros(2)
        d[axis] = eps
        fd = (tr.warp_coordinates(pts + d) - tr.warp_coordinates(pts - d)) / (2 * eps)
        assert torch.allclose(jac[..., axis], fd, atol=1e-3)
    # Keypoints that move exactly with the transform have zero equivariance loss; others do not.
    kp_t = torch.rand(2, 5, 2) - 0.5
    jac_t = torch.eye(2).expand(2, 5, 2, 2) * 1.2
    kp = tr.warp_coordinates(kp_t)
    value, jloss = L.equivariance_losses(kp, tr.jacobian(kp_t) @ jac_t, kp_t, jac_t, tr)
    assert float(value) < 1e-6 and float(jloss) < 1e-5
    value, _ = L.equivariance_losses(kp + 0.1, None, kp_t, None, tr)
    assert abs(float(value) - 0.1) < 1e-5


def test_keypoint_distance_loss_matches_eq13_and_has_a_gradient():
    crowded = torch.zeros(1, 4, 2, requires_grad=True)
    loss, eq13 = L.keypoint_distance_loss(crowded + torch.tensor([[0.0, 0.0], [0.05, 0], [0, 0.05], [1, 1]]))
    # 6 of 12 ordered pairs are closer than 0.2 → eq. 13 mean (2 per close pair) = 1.0
    assert abs(float(eq13) - 1.0) < 1e-6 and float(loss.detach()) > 0
    loss.backward()
    assert crowded.grad.abs().sum() > 0
    spread = torch.tensor([[[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]])
    loss, eq13 = L.keypoint_distance_loss(spread, 0.2)
    assert float(loss) == 0.0 and float(eq13) == 0.0


def test_vgg19_loader_takes_a_torchvision_state_dict_and_rejects_others(tmp_path):
    torch.manual_seed(0)
    net = P.VGG19Features()
    state = dict(net.state_dict())
    state["features.30.weight"] = torch.zeros(1)  # torchvision files go on past relu5_1 ...
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ... and hold the classifier: both ignored
    path = tmp_path / "vgg19-test.pth"
    torch.save(state, path)
    loaded = P.load_vgg19(path)
    x = torch.rand(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), net(x), strict=True))
    loss = P.build_perceptual_loss(str(path), (1.0, 0.5))
    assert isinstance(loss, P.PyramidPerceptualLoss)
    assert float(loss(x, x)) == 0.0 and float(loss(x, torch.rand_like(x))) > 0
    del state["features.0.weight"]
    torch.save(state, path)
    with pytest.raises(P.VGGWeightsError, match=r"features\.0\.weight"):
        P.load_vgg19(path)
    with pytest.raises(P.VGGWeightsError, match="do not exist"):
        P.load_vgg19(tmp_path / "missing.pth")
    sub = P.build_perceptual_loss("", (1.0, 0.5, 0.25))
    assert "substitute" in sub.name and float(sub(x, x)) == 0.0 and float(sub(x, 1 - x)) > 0


# ------------------------------------------------------------------------------------------ stages


@pytest.fixture(scope="module")
def depth_run(face_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "depth"
    result = Trainer("depth", _cfg(face_root), run_dir, progress=False).run()
    return result


def test_depth_stage_lowers_the_loss_and_writes_a_depth_checkpoint(depth_run):
    from dagan.checkpoint import read_checkpoint

    first, last = _first_last(depth_run.history)
    print(f"\ndepth stage, tiny, 30 steps: loss {first:.4f} -> {last:.4f}")
    assert last < 0.9 * first
    _, tensors, meta = read_checkpoint(depth_run.weights)
    assert meta["stage"] == "depth" and meta["step"] == "30"
    assert any(k.startswith("depth_net.") for k in tensors) and any(
        k.startswith("pose_net.") for k in tensors
    )
    assert (depth_run.run_dir / "config.yaml").is_file()
    assert list((depth_run.run_dir / "tb").glob("events.out.tfevents.*"))


def test_dagan_stage_lowers_the_loss_with_the_depth_net_frozen(depth_run, face_root, tmp_path, capfd):
    from dagan.checkpoint import load_model, read_checkpoint

    trainer = Trainer(
        "dagan", _cfg(face_root), tmp_path / "dagan", depth_checkpoint=str(depth_run.weights), progress=False
    )
    _, depth_tensors, _ = read_checkpoint(depth_run.weights)
    result = trainer.run()
    assert "NO VGG19 WEIGHTS CONFIGURED" in capfd.readouterr().err
    first, last = _first_last(result.history)
    print(f"\ndagan stage, tiny, 30 steps: loss {first:.3f} -> {last:.3f}")
    assert last < 0.85 * first
    model = load_model(result.weights)
    for k, v in model.depth_net.state_dict().items():  # frozen: exactly the depth stage's weights
        assert torch.equal(v, depth_tensors[f"depth_net.{k}"]), k
    _, tensors, meta = read_checkpoint(result.weights)
    assert any(k.startswith("discriminator.") for k in tensors) and "substitute" in meta["perceptual_loss"]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)).prediction
    assert torch.isfinite(out).all()


def test_init_starts_from_another_runs_weights(depth_run, face_root, tmp_path):
    """--init (fine-tuning): every trained group of the stage comes from the file, the frozen depth net
    still from --depth; a file without a required group is refused, and --resume keeps the run's own
    weights rather than re-reading the init file."""
    from dagan.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
    from dagan.model import DaGAN

    cfg = _cfg(face_root)
    torch.manual_seed(123)
    donor = DaGAN(cfg.model)
    init = tmp_path / "donor.safetensors"
    save_checkpoint(init, cfg.model, donor.state_dict())
    trainer = Trainer(
        "dagan",
        cfg,
        tmp_path / "ft",
        depth_checkpoint=str(depth_run.weights),
        init_checkpoint=str(init),
        progress=False,
        tensorboard=False,
    )
    model = trainer.stage.model
    for name in ("kp_detector", "generator"):
        for k, v in getattr(model, name).state_dict().items():
            assert torch.equal(v, donor.state_dict()[f"{name}.{k}"]), f"{name}.{k}"
    _, depth_tensors, _ = read_checkpoint(depth_run.weights)
    for k, v in model.depth_net.state_dict().items():  # the depth net is --depth's, not the donor's
        assert torch.equal(v, depth_tensors[f"depth_net.{k}"]), k
    # the depth stage takes its depth net from --init, and the pose net only when the file has one
    depth_trainer = Trainer(
        "depth", cfg, tmp_path / "dft", init_checkpoint=str(init), progress=False, tensorboard=False
    )
    for k, v in depth_trainer.stage.depth_net.state_dict().items():
        assert torch.equal(v, donor.state_dict()[f"depth_net.{k}"]), k
    only_depth = tmp_path / "depth-only.safetensors"
    save_checkpoint(only_depth, cfg.model, {k: v for k, v in donor.state_dict().items() if "depth_net" in k})
    with pytest.raises(CheckpointError, match="no kp_detector"):
        Trainer(
            "dagan",
            cfg,
            tmp_path / "bad",
            depth_checkpoint=str(depth_run.weights),
            init_checkpoint=str(only_depth),
            progress=False,
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(
            "dagan",
            cfg,
            tmp_path / "bad2",
            depth_checkpoint=str(depth_run.weights),
            init_checkpoint=str(tmp_path / "nope.safetensors"),
            progress=False,
        )


def test_depth_distillation_trains_a_half_resolution_net_toward_its_teacher(depth_run, face_root, tmp_path):
    """``depth.distill`` with ``depth.teacher``: a student at ``model.depth.input_scale`` 0.5, started
    from the teacher's own weights, gets closer to the teacher's full-resolution disparity than it was
    at the start; without a teacher the config is refused, naming the key."""
    from dagan.checkpoint import load_into, read_checkpoint
    from dagan.model import DaGAN

    cfg = _cfg(face_root).replace(
        **{
            "model.image_size": 128,  # the depth encoder needs 64 px after halving
            "model.depth.input_scale": 0.5,
            "depth.teacher": str(depth_run.weights),
            "depth.distill": 100.0,
            "depth.steps": 20,
        }
    )
    init = str(depth_run.weights)
    trainer = Trainer("depth", cfg, tmp_path / "h", init_checkpoint=init, progress=False, tensorboard=False)
    result = trainer.run()
    logs = [h["distill"] for h in result.history]
    assert np.mean(logs[-3:]) < 0.8 * np.mean(logs[:3]), logs
    _, tensors, _ = read_checkpoint(result.weights)
    student = DaGAN(cfg.model).depth_net.eval()
    load_into(student, tensors, "depth_net.", "student")
    assert student.input_scale == 0.5
    with pytest.raises(ConfigError, match=r"depth\.teacher"):
        _cfg(face_root).replace(**{"depth.distill": 1.0})


def test_dagan_stage_needs_a_depth_checkpoint(face_root, tmp_path):
    with pytest.raises(TrainingError, match="--depth"):
        Trainer("dagan", _cfg(face_root), tmp_path / "x", progress=False)


def test_resume_after_an_interruption_continues_exactly(depth_run, face_root, tmp_path):
    cfg = _cfg(face_root, **{"dagan.steps": 4, "checkpoint_every": 2})
    depth = str(depth_run.weights)
    full = Trainer("dagan", cfg, tmp_path / "a", depth_checkpoint=depth, progress=False, tensorboard=False)
    uninterrupted = full.run()
    part = Trainer("dagan", cfg, tmp_path / "b", depth_checkpoint=depth, progress=False, tensorboard=False)
    assert part.run(stop_after=3).step == 3  # "killed" after step 3: step 3 is lost, step 2 was saved
    with pytest.raises(TrainingError, match="--resume"):
        Trainer("dagan", cfg, tmp_path / "b", depth_checkpoint=depth, progress=False).run()
    resumed = Trainer("dagan", None, tmp_path / "b", resume=True, progress=False, tensorboard=False).run()
    assert resumed.step == 4 and len(resumed.history) == 2
    for a, b in zip(uninterrupted.history[2:], resumed.history, strict=True):
        for key in ("loss", "discriminator", "perceptual", "equivariance_value"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), key
    from dagan.checkpoint import read_checkpoint

    _, ta, _ = read_checkpoint(uninterrupted.weights)
    _, tb, _ = read_checkpoint(resumed.weights)
    assert ta.keys() == tb.keys()
    assert max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta) <= 1e-6


def _stale_temp_files(run: Path) -> list[Path]:
    """Temporary files as dagan.checkpoint.atomic_write leaves them when the process is killed mid-write."""
    ck = run / "checkpoints"
    return [
        ck / ".step-00000002.safetensors.k3j2h1xq.tmp",
        ck / ".step-00000002.state.pt.ab_12345.tmp",
        run / ".latest.json.zz9abcde.tmp",
        run / ".config.yaml.qwertyui.tmp",
        run / ".run.json.0a1b2c3d.tmp",
    ]


def test_start_and_resume_remove_temp_files_of_killed_saves(face_root, tmp_path, capfd):
    from training.run_dir import RunDir

    run = tmp_path / "run"
    cfg = _cfg(face_root, **{"depth.steps": 2, "depth.batch_size": 2, "checkpoint_every": 1})
    # A kill mid-save before the first start: a fresh start cleans the folder too.
    for p in _stale_temp_files(run):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    keep = [run / "notes.tmp", run / "checkpoints" / ".keep", run / "checkpoints" / "step-x.safetensors.tmp"]
    for p in keep:
        p.write_bytes(b"not ours")
    assert Trainer("depth", cfg, run, progress=False, tensorboard=False).run(stop_after=1).step == 1
    assert not any(p.exists() for p in _stale_temp_files(run)) and all(p.exists() for p in keep)
    assert "removed 5 temporary file(s)" in capfd.readouterr().err
    rd = RunDir(run)
    complete = {p: p.read_bytes() for p in (rd.weights_path(1), rd.state_path(1))}
    # Killed while saving step 2: its temporary files are there, latest.json still names step 1.
    for p in _stale_temp_files(run):
        p.write_bytes(b"half a file")
    assert rd.latest() == 1
    # A mistaken fresh start in the folder (it could be a live run's) is refused before touching it.
    with pytest.raises(TrainingError, match="--resume"):
        Trainer("depth", cfg, run, progress=False, tensorboard=False).run()
    assert all(p.exists() for p in _stale_temp_files(run))
    resumed = Trainer("depth", None, run, resume=True, progress=False, tensorboard=False).run()
    assert resumed.step == 2 and rd.latest() == 2
    assert not any(p.exists() for p in _stale_temp_files(run)) and all(p.exists() for p in keep)
    assert all(p.read_bytes() == data for p, data in complete.items())  # the complete pair is untouched
    # The cleaner only ever matches atomic_write's temporary names, never a complete file.
    assert rd.clean_stale_temp() == []
    assert rd.weights_path(2).is_file() and rd.state_path(2).is_file() and rd.config_file.is_file()


def test_half_made_run_folders_give_one_clear_line(depth_run, face_root, tmp_path, capsys):
    from commands.cli import main
    from training.run_dir import RunDir

    def resume_error(run: Path, stage: str = "depth") -> str:
        with pytest.raises(TrainingError) as info:
            Trainer(stage, None, run, resume=True, progress=False, tensorboard=False)
        message = str(info.value)
        assert "\n" not in message and str(run) in message
        return message

    cfg = _cfg(face_root)
    text = cfg.to_yaml()
    # Killed between the two files (the old order wrote config.yaml first, the new one run.json first).
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text(text)
    assert "half-made" in (m := resume_error(tmp_path / "a")) and "without --resume" in m
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text('{"stage": "depth"}')
    assert "half-made" in (m := resume_error(tmp_path / "b")) and "without --resume" in m
    # Killed before either file, or never created; a corrupt run.json; checkpoints without run.json.
    (tmp_path / "c").mkdir()
    assert "not a run folder" in resume_error(tmp_path / "c")
    assert "does not exist" in resume_error(tmp_path / "nowhere")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.yaml").write_text(text)
    (tmp_path / "d" / "run.json").write_text('{"stage": "dep')
    assert "unreadable" in resume_error(tmp_path / "d")
    (tmp_path / "d" / "run.json").unlink()
    (tmp_path / "d" / "latest.json").write_text('{"step": 15}')
    assert "holds checkpoints" in resume_error(tmp_path / "d")
    # The CLI prints it as one line and exits 2, no traceback.
    assert main(["train", "depth", "--resume", "--run-dir", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dagan: error: --resume:") and "half-made" in err and "\n" not in err
    # Doing what it says works: a fresh start takes the half-made folder over.
    fresh = Trainer("depth", cfg, tmp_path / "a", progress=False, tensorboard=False)
    fresh._prepare_run_dir()
    info = RunDir(tmp_path / "a").read_run_info("depth")
    assert info["stage"] == "depth" and info["data_root"] == str(face_root)

    # A dagan run killed after its folder was made but before its first checkpoint resumes from step 0
    # with the depth checkpoint its run.json names (not with an untrained depth net).
    from dagan.checkpoint import read_checkpoint

    run = tmp_path / "g"
    Trainer("dagan", cfg, run, depth_checkpoint=str(depth_run.weights), progress=False)._prepare_run_dir()
    before = (run / "run.json").read_text()
    again = Trainer("dagan", None, run, resume=True, progress=False, tensorboard=False)
    assert again.resume_step is None and again.depth_checkpoint == str(depth_run.weights)
    _, tensors, _ = read_checkpoint(depth_run.weights)
    for k, v in again.stage.model.depth_net.state_dict().items():
        assert torch.equal(v, tensors[f"depth_net.{k}"]), k
    again._prepare_run_dir()
    assert (run / "run.json").read_text() == before  # resume keeps the run's own inputs


def test_depth_training_recovers_the_depth_of_a_rendered_scene(tmp_path):
    """Textured height-field scenes under known camera translation: after training, the predicted
    disparity must rank pixels by nearness like the true depth does, on scenes it never saw."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for k in range(12):
        images, _ = render_clip(rng, frames=8)
        _write_frames(tmp_path / "scene" / "train" / f"s{k}", images)
    cfg = load_train_config(
        {
            "model": "tiny",
            "data": {"root": str(tmp_path / "scene"), "workers": 0, "repeats": 10, "augment": NO_AUGMENT},
            "depth": {"steps": 120, "batch_size": 4, "lr": 1e-3},
            "checkpoint_every": 1000,
        }
    )
    trainer = Trainer("depth", cfg, tmp_path / "run", progress=False, tensorboard=False)
    net = trainer.stage.depth_net

    def rank_correlation() -> float:
        net.eval()
        eval_rng = np.random.default_rng(123)
        values = []
        for _ in range(6):
            images, depths = render_clip(eval_rng, frames=1)
            x = torch.from_numpy(images[0]).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                disp = net(x)[0, 0].numpy()
            values.append(spearmanr(disp.ravel(), -depths[0].ravel())[0])
        return float(np.mean(values))

    before = rank_correlation()
    trainer.run()
    after = rank_correlation()
    print(f"\nrendered scene: Spearman(disparity, nearness) {before:.3f} untrained -> {after:.3f} trained")
    assert after > 0.3 and after > before + 0.2


# --------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = _cfg(
        Path(root), **{"depth.steps": 3, "dagan.steps": 3, "depth.batch_size": 2, "dagan.batch_size": 2}
    )
    try:
        depth = Trainer("depth", cfg, Path(out) / "depth", progress=False, tensorboard=False)
        d_hist = depth.run().history
        gan = Trainer(
            "dagan",
            cfg,
            Path(out) / "dagan",
            depth_checkpoint=str(Path(out) / "depth" / "depth.safetensors"),
            progress=False,
            tensorboard=False,
        )
        g_hist = gan.run().history
        params = {f"depth.{k}": p.detach().clone() for k, p in depth.stage.net.module.named_parameters()}
        params.update(
            {f"gen.{k}": p.detach().clone() for k, p in gan.stage.gen_net.module.named_parameters()}
        )
        params.update(
            {f"disc.{k}": p.detach().clone() for k, p in gan.stage.disc_net.module.named_parameters()}
        )
        torch.save(
            {"params": params, "losses": [h["loss"] for h in d_hist + g_hist]}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        cleanup_distributed()


def test_ddp_two_cpu_processes_keep_identical_weights(face_root, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(face_root), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["params"].keys() == r1["params"].keys() and len(r0["params"]) > 100
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["losses"] != r1["losses"]  # the ranks trained on different samples
    assert (tmp_path / "dagan" / "dagan.safetensors").is_file()


# -------------------------------------------------------------------------------- prepare + CLI


def test_prepare_splits_at_cuts_skips_broken_files_and_resumes(tmp_path, capsys):
    from training.cli import add_commands

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = driving_frames(astronaut(), 12, size=256, amplitude=0.6)
    frames += driving_frames(grace_hopper(), 12, size=256, amplitude=0.6)  # a hard shot cut
    write_video(raw / "talk.mp4", frames, fps=25)
    (raw / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    argv = ["prepare", str(raw), str(tmp_path / "out"), "--size", "64", "--min-frames", "8", "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "1 processed" in out.out and "1 broken" in out.out and "wrote 2 clips" in out.out
    assert "broken.mp4" in out.err
    clips = sorted((tmp_path / "out" / "train").iterdir())
    assert [c.name for c in clips] == ["talk_000", "talk_001"]
    counts = [len(list(c.glob("*.png"))) for c in clips]
    assert all(10 <= n <= 12 for n in counts) and sum(counts) <= 24
    a = cv2.imread(str(clips[0] / "00000.png"))
    b = cv2.imread(str(clips[0] / "00005.png"))
    assert a.shape == (64, 64, 3) and np.abs(a.astype(int) - b).mean() > 2  # the head moves in the crop
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "1 already done" in capsys.readouterr().out  # resumable: nothing redone
    # The prepared folder is a valid training dataset.
    assert len(SourceDrivingDataset(tmp_path / "out", "train", 64)) == 2


def test_cli_train_depth_runs_and_resumes(face_root, tmp_path):
    from training.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    run = tmp_path / "cli-run"
    base = ["train", "depth", "--data", str(face_root), "--model", "tiny", "--run-dir", str(run), "--quiet"]
    sets = ["--set", "data.workers=0", "--set", "checkpoint_every=1", "--batch-size", "2"]
    args = parser.parse_args([*base, "--steps", "1", *sets])
    assert args.func(args) == 0 and (run / "depth.safetensors").is_file()
    args = parser.parse_args([*base, "--steps", "2", "--resume"])
    assert args.func(args) == 0
    assert '"step": 2' in (run / "latest.json").read_text()


def test_frozen_modules_keep_their_weights_and_statistics():
    """dagan.frozen: the named modules take no step and keep their BatchNorm statistics (eval mode),
    while the rest of the generator trains; a path the model lacks, or the depth net, is refused."""
    from training.distributed import DistInfo
    from training.stage_dagan import DaganStage

    frozen = ["kp_detector", "generator.image_encoder"]
    cfg = load_train_config(None, {"model": "tiny", "data.workers": 0, "dagan.frozen": frozen})
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    model = stage.model

    def state(prefix: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}

    before = {p: state(p) for p in ("kp_detector.", "generator.image_encoder.", "generator.dense_motion")}
    assert any("running_mean" in k for k in before["generator.image_encoder."])  # BatchNorm is there
    stage.set_train()
    assert not model.kp_detector.training and not model.generator.image_encoder.training
    assert model.generator.dense_motion_network.training
    torch.manual_seed(0)
    size = cfg.model.image_size
    batch = {"source": torch.rand(2, 3, size, size), "driving": torch.rand(2, 3, size, size)}
    stage.train_step(batch, 0)
    for prefix in ("kp_detector.", "generator.image_encoder."):
        after = state(prefix)
        assert all(torch.equal(before[prefix][k], after[k]) for k in after), prefix
    moved = state("generator.dense_motion")
    assert any(not torch.equal(before["generator.dense_motion"][k], moved[k]) for k in moved)

    bad = load_train_config(None, {"model": "tiny", "dagan.frozen": ["generator.no_such_net"]})
    with pytest.raises(TrainingError, match=r"no module 'generator\.no_such_net'"):
        DaganStage(bad, torch.device("cpu"), DistInfo(), None)
    with pytest.raises(ConfigError, match=r"dagan\.frozen"):
        load_train_config(None, {"model": "tiny", "dagan.frozen": ["depth_net"]})
    everything = load_train_config(None, {"model": "tiny", "dagan.frozen": ["kp_detector", "generator"]})
    with pytest.raises(TrainingError, match="nothing to train"):
        DaganStage(everything, torch.device("cpu"), DistInfo(), None)


@pytest.mark.parametrize("cross_gan", [0.0, 1.0])
def test_cross_gan_shows_the_cross_identity_avatar_to_the_discriminator(cross_gan):
    """dagan.weights.cross_gan: the photo driven by another item's motion is charged (1 − D(avatar))² and
    is one more fake in the discriminator's batch (real B + fake 2B); at 0 neither happens."""
    from training.distributed import DistInfo
    from training.stage_dagan import DaganStage

    cfg = load_train_config(None, {"model": "tiny", "data.workers": 0, "dagan.weights.cross_gan": cross_gan})
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    seen: list[tuple[int, bool]] = []  # (batch, whether the discriminator's weights take gradient)
    stage.discriminator.register_forward_hook(
        lambda m, inputs, _out: seen.append((inputs[0].shape[0], next(m.parameters()).requires_grad))
    )
    stage.set_train()
    torch.manual_seed(0)
    size, b = cfg.model.image_size, 2
    batch = {"source": torch.rand(b, 3, size, size), "driving": torch.rand(b, 3, size, size)}
    logs = stage.train_step(batch, 0)
    critic = [n for n, grad in seen if not grad]
    trained = [n for n, grad in seen if grad]
    if cross_gan:
        assert logs["cross_gan"] > 0
        assert critic == [2 * b, b] and trained == [3 * b]
        avatar = stage._last["cross_avatar"]
        assert avatar.shape == batch["source"].shape
        assert not torch.allclose(avatar, stage._last["prediction"])  # another driver's motion
    else:
        assert "cross_gan" not in logs
        assert critic == [2 * b] and trained == [2 * b]
        assert stage._last["cross_avatar"] is None
