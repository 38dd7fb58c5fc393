"""Training on a lent GPU: ``dagan pack-data``, ``dagan train --time-limit`` and ``scripts/gpu_train.sh``.

The device machine has torch, numpy, opencv, pyyaml, safetensors, tqdm and tensorboard but no mediapipe,
no serving stack and no network; the smoke run of the script blocks those modules the same way, so a
training import that would need them fails here first rather than on the device's few minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dagan.checkpoint import load_model, read_checkpoint
from training.data import LANDMARKS_FILE, LANDMARKS_PACKED, DatasetError, SourceDrivingDataset, Video
from training.pack import PACK_MANIFEST, PackError, pack_dataset, write_smoke_dataset

ROOT = Path(__file__).resolve().parent.parent
POINTS = (1, 13, 14, 61, 291)

# Installed as sitecustomize: these packages are invisible, as on the device (every import finder is
# wrapped, so `import x` fails and importlib.util.find_spec("x") is None, exactly as when not installed).
NOT_ON_DEVICE = """
import sys

BLOCKED = {"mediapipe", "fastapi", "starlette", "uvicorn", "aiortc", "av", "httpx", "multipart",
           "python_multipart", "pyvirtualcam", "onnx", "onnxruntime", "tensorrt", "skimage",
           "matplotlib", "playwright", "pydantic"}


class NotOnDevice:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [NotOnDevice(f) for f in sys.meta_path]
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Two drawn-face clips of 12 frames at 64 px with full 478-point tracks (as `dagan landmarks`)."""
    return write_smoke_dataset(tmp_path_factory.mktemp("src"), clips=2, frames=12, size=64)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pack_keeps_every_nth_frame_and_its_track_rows(source, tmp_path):
    out = tmp_path / "pack"
    report = pack_dataset(source, out, stride=2, points=POINTS, assets=tmp_path / "none", progress=False)
    assert (report.clips, report.stride, report.frames_in, report.frames_out) == (2, 2, 24, 12)
    assert report.without_tracks == [] and any("no face_landmark_68" in n for n in report.notes)
    clip = out / "train" / "smoke0"
    assert sorted(p.name for p in clip.glob("*.jpg")) == [f"{k:05d}.jpg" for k in range(6)]
    with np.load(clip / LANDMARKS_PACKED) as z:
        mesh, points, kept = z["mesh"], z["points"], z["source_frames"]
    original = np.load(source / "train" / "smoke0" / LANDMARKS_FILE)
    assert kept.tolist() == [0, 2, 4, 6, 8, 10] and points.tolist() == sorted(POINTS)
    np.testing.assert_array_equal(mesh[:, list(POINTS)], original[::2][:, list(POINTS)])
    assert np.isnan(mesh[:, 0]).all()  # a point not asked for is dropped (NaN compresses to nothing)
    # The dataset reads the packed tracks (no .npy there) as it reads the original rows.
    packed, full = Video(clip), Video(source / "train" / "smoke0")
    np.testing.assert_allclose(packed.landmarks(POINTS), full.landmarks(POINTS)[::2], atol=0)
    item = SourceDrivingDataset(out, "train", 64, landmark_points=POINTS)[0]
    assert np.isfinite(item["source_landmarks"].numpy()).all()
    with pytest.raises(DatasetError, match="packed without mesh points"):
        Video(clip).landmarks((1, 152))
    manifest = json.loads((out / PACK_MANIFEST).read_text())
    assert manifest["complete"] and manifest["stride"] == 2 and manifest["frames_out"] == 12

    # Idempotent and deterministic: a re-run skips every clip; another folder gets the same bytes.
    again = pack_dataset(source, out, stride=2, points=POINTS, assets=tmp_path / "none", progress=False)
    assert again.already_done == 2 and again.frames_out == 12
    other = tmp_path / "pack2"
    pack_dataset(source, other, stride=2, points=POINTS, assets=tmp_path / "none", progress=False)
    assert _files(out) == _files(other)
    with pytest.raises(PackError, match="other settings"):
        pack_dataset(source, out, stride=3, points=POINTS, assets=tmp_path / "none", progress=False)


def test_pack_raises_the_stride_to_fit_the_cap_and_copies_the_face_weights(tmp_path):
    src = write_smoke_dataset(tmp_path / "src", clips=1, frames=40, size=128)
    assets = tmp_path / "assets" / "model"
    assets.mkdir(parents=True)
    (assets / "face_landmark_68_model-weights_manifest.json").write_text("[]")
    (assets / "face_landmark_68_model.bin").write_bytes(b"\0" * 1000)
    (assets / "face_recognition_model.bin").write_bytes(b"\0" * 1000)  # not the perceptual net: left out
    full = pack_dataset(src, tmp_path / "full", assets=tmp_path / "assets", progress=False)
    assert full.stride == 1 and full.frames_out == 40
    cap_mb = full.bytes * 0.4 / 2**20
    small = pack_dataset(src, tmp_path / "small", max_mb=cap_mb, assets=tmp_path / "assets", progress=False)
    assert small.stride >= 3 and small.bytes <= cap_mb * 2**20
    assert any("stride raised from 1" in n for n in small.notes)
    assert small.assets == ["face_landmark_68_model-weights_manifest.json", "face_landmark_68_model.bin"]
    assert (tmp_path / "small" / "face_landmark_68_model.bin").stat().st_size == 1000
    with pytest.raises(PackError, match="does not fit"):
        pack_dataset(src, tmp_path / "tiny", max_mb=0.01, progress=False)


def test_pack_errors_and_clips_without_tracks(source, tmp_path, capsys):
    from commands.cli import main

    with pytest.raises(PackError, match="train"):
        pack_dataset(tmp_path / "nothing", tmp_path / "out", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(PackError, match="not a `dagan pack-data` folder"):
        pack_dataset(source, tmp_path / "busy", progress=False)
    # A clip without tracks is packed all the same, counted and named.
    src = write_smoke_dataset(tmp_path / "src", clips=2, frames=6, size=32)
    (src / "train" / "smoke1" / LANDMARKS_FILE).unlink()
    code = main(["pack-data", str(src), str(tmp_path / "cli"), "--quiet", "--assets", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0 and "packed 2 clips" in captured.out
    assert "1 clips have no usable landmark tracks" in captured.err and "smoke1" in captured.err
    assert not (tmp_path / "cli" / "train" / "smoke1" / LANDMARKS_PACKED).exists()
    assert main(["pack-data", str(tmp_path / "nothing"), str(tmp_path / "x"), "--quiet"]) == 2


def test_time_limit_stops_cleanly_with_loadable_weights_and_resume_continues(source, tmp_path, capsys):
    from commands.cli import main

    run = tmp_path / "run"
    base = ["train", "depth", "--data", str(source), "--model", "tiny", "--quiet", "--device", "cpu"]
    base += ["--set", "data.workers=0", "--set", "depth.batch_size=1", "--set", "checkpoint_every=1000"]
    assert main([*base, "--run-dir", str(run), "--steps", "100000", "--time-limit", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "time limit of 0.05 min reached at step" in out
    _, tensors, meta = read_checkpoint(run / "depth.safetensors")
    step = int(meta["step"])
    assert 1 <= step < 100000 and meta["time_limited"] == f"stopped at step {step} of 100000"
    assert any(k.startswith("depth_net.") for k in tensors)
    assert json.loads((run / "latest.json").read_text())["step"] == step  # a checkpoint at the step reached
    # --resume continues from there (here: two more steps, to a new total).
    assert main([*base, "--run-dir", str(run), "--resume", "--steps", str(step + 2)]) == 0
    _, _, meta = read_checkpoint(run / "depth.safetensors")
    assert int(meta["step"]) == step + 2 and "time_limited" not in meta


@pytest.mark.slow
def test_gpu_train_smoke_runs_on_the_cpu_without_device_missing_modules(tmp_path):
    """The script's --smoke: pack, depth stage, DaGAN stage from the bundled weights, files for $OUT."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOT_ON_DEVICE)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env["PYTHON"] = sys.executable
    # A second recipe beside the first (VARIANT_ARGS) and extra depth flags, as the lent-GPU run uses them.
    env["VARIANT_ARGS"] = (
        "--set dagan.weights.region_l1=30 --set dagan.expressive_pairs=0.75"
        " --set dagan.weights.landmark_flow=1000"
    )
    env["DEPTH_ARGS"] = "--set depth.smoothness=0.01"
    cmd = ["bash", "scripts/gpu_train.sh", "--smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # what a device returns
    log = (out / "gpu_train.log").read_text()
    assert "dagan.safetensors after 2 steps" in log and "depth.safetensors after 2 steps" in log
    model = load_model(out / "dagan.safetensors")
    assert model.depth_net is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["depth"]["step"] == 2 and summary["dagan"]["step"] == 2
    assert summary["depth"]["source_offsets"] == [-3, 3]  # the recipe's [-6, 6] at frame stride 2
    assert summary["pack"]["stride"] == 2
    assert (out / "run-logs.tar.gz").stat().st_size > 0
    # Run b: its own weights, the overrides it was given, the depth stage's extra flag, the init of both.
    assert "[b] wrote" in log and "initialised depth_net from" in log
    assert load_model(out / "dagan-b.safetensors").depth_net is not None
    b = summary["dagan-b"]
    assert b["step"] == 2 and b["weights"]["region_l1"] == 30 and b["expressive_pairs"] == 0.75
    assert b["weights"]["landmark_flow"] == 1000
    if isinstance(b["last_logged"], dict) and "loss" in b["last_logged"]:  # tensorboard present
        assert b["last_logged"]["landmark_flow"] > 0  # the drawn faces' tracks reach the flow term
    assert "weights" not in summary["dagan"]
    with tarfile.open(out / "run-logs.tar.gz") as tar:
        names = tar.getnames()
        assert any(n.startswith("dagan-b/") for n in names)
        depth_cfg = tar.extractfile("depth/config.yaml").read().decode()
    assert "smoothness: 0.01" in depth_cfg
