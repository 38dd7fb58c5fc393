"""`dagan animate` end to end on inputs the tests make, and every bad-input case of the offline command."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import make_model

from commands.cli import main
from dagan.checkpoint import checkpoint_metadata, save_checkpoint
from dagan.config import load_config
from dagan.media import VideoReader, write_video
from dagan.samples import driving_frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut_module, grace_module):
    d = tmp_path_factory.mktemp("cli")
    source = d / "source.png"
    cv2.imwrite(str(source), cv2.cvtColor(astronaut_module, cv2.COLOR_RGB2BGR))
    driving = d / "driving.mp4"
    write_video(driving, driving_frames(grace_module, num_frames=6, size=160), fps=12)
    ckpt = d / "tiny.safetensors"
    model = make_model(load_config("tiny"))
    save_checkpoint(ckpt, model.config, model, extra_metadata={"trained": "false"})
    return {"dir": d, "source": source, "driving": driving, "ckpt": ckpt}


@pytest.fixture(scope="module")
def astronaut_module():
    from dagan.samples import astronaut

    return astronaut()


@pytest.fixture(scope="module")
def grace_module():
    from dagan.samples import grace_hopper

    return grace_hopper()


@pytest.fixture
def no_default_weights(monkeypatch, tmp_path):
    """As on an install without the bundled weights."""
    import dagan.checkpoint

    monkeypatch.setattr(dagan.checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "missing.safetensors")


@pytest.fixture(autouse=True)
def _no_env_checkpoint(monkeypatch):
    monkeypatch.delenv("DAGAN_CHECKPOINT", raising=False)


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_animate_end_to_end(inputs, tmp_path, capsys):
    out = tmp_path / "result.mp4"
    argv = ["animate", "--source", str(inputs["source"]), "--driving", str(inputs["driving"])]
    code, stdout, err = _run(
        [*argv, "--out", str(out), "--checkpoint", str(inputs["ckpt"]), "--quiet"], capsys
    )
    assert code == 0, err
    assert "UNTRAINED" in err  # random weights are never passed off as a model
    assert "wrote" in stdout and "6 frames" in stdout
    with VideoReader(out) as r:
        frames = list(r)
        assert r.fps == pytest.approx(12, abs=0.5)
    assert len(frames) == 6
    assert frames[0].shape == (256, 3 * 256, 3)  # source | driving | result, panels upscaled to 256
    # the source panel is the same photo crop in every frame, the driving panel moves
    assert np.abs(frames[0][:, :256].astype(int) - frames[5][:, :256].astype(int)).mean() < 3
    assert np.abs(frames[0][:, 256:512].astype(int) - frames[3][:, 256:512].astype(int)).mean() > 5

    out2 = tmp_path / "depth.mp4"
    argv2 = [*argv, "--out", str(out2), "--checkpoint", str(inputs["ckpt"]), "--quiet", "--relative"]
    code, _, err = _run([*argv2, "--show-depth", "--max-frames", "3"], capsys)
    assert code == 0, err
    with VideoReader(out2) as r:
        frames = list(r)
    assert len(frames) == 3 and frames[0].shape == (256, 5 * 256, 3)


def _bad(inputs, tmp_path, capsys, expect: str, **override):
    assert expect.strip(), "name the message the user must see: an empty one matches any error"
    args = {"source": inputs["source"], "driving": inputs["driving"], "checkpoint": inputs["ckpt"]}
    args.update(override)
    out = tmp_path / "never.mp4"
    argv = ["animate", "--out", str(out), "--quiet"]
    for key in ("source", "driving", "checkpoint"):
        if args[key] is not None:
            argv += [f"--{key}", str(args[key])]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("dagan: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp file left behind


def test_missing_source(inputs, tmp_path, capsys):
    _bad(inputs, tmp_path, capsys, "does not exist", source=tmp_path / "nope.jpg")


def test_source_not_an_image(inputs, tmp_path, capsys):
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    _bad(inputs, tmp_path, capsys, "is not an image", source=txt)


def test_no_face_in_source(inputs, tmp_path, capsys):
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((200, 200, 3), 128, np.uint8))
    _bad(inputs, tmp_path, capsys, "no face", source=grey)


def test_missing_driving(inputs, tmp_path, capsys):
    _bad(inputs, tmp_path, capsys, "does not exist", driving=tmp_path / "nope.mp4")


def test_unreadable_driving(inputs, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _bad(inputs, tmp_path, capsys, "could not be read as a video", driving=junk)


def test_empty_driving(inputs, tmp_path, capsys):
    empty = tmp_path / "empty.avi"
    w = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    w.release()
    folder = tmp_path / "frames"
    folder.mkdir()
    _bad(inputs, tmp_path, capsys, f"{empty} contains no frames", driving=empty)
    _bad(inputs, tmp_path, capsys, f"{folder} contains no frames (no .png/.jpg", driving=folder)


def test_checkpoint_problems(inputs, tmp_path, capsys, no_default_weights):
    _bad(inputs, tmp_path, capsys, "does not exist", checkpoint=tmp_path / "nope.safetensors")
    _bad(inputs, tmp_path, capsys, "no trained weights", checkpoint=None)
    # weights of one config under the embedded config of another: the loader names the tensors
    cfg = load_config("tiny")
    other = make_model(cfg.replace(**{"keypoints.num_kp": 10}))
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, cfg, other)
    _bad(inputs, tmp_path, capsys, "does not match the model config", checkpoint=wrong)


def test_init_checkpoint_and_bench(tmp_path, capsys):
    ckpt = tmp_path / "init.safetensors"
    code, out, _ = _run(["init-checkpoint", "--config", "tiny", "--out", str(ckpt)], capsys)
    assert code == 0 and "UNTRAINED" in out
    assert checkpoint_metadata(ckpt)["trained"] == "false"
    report = tmp_path / "bench.json"
    code, out, _ = _run(
        [
            "bench",
            "--checkpoint",
            str(ckpt),
            "--frames",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0 and "cache speedup" in out
    (result,) = json.loads(report.read_text())
    for mode in ("cached", "uncached"):
        s = result[mode]
        assert s["frames"] == 3 and 0 < s["median_ms"] <= s["p99_ms"] and s["fps"] > 0
    assert result["machine"]["device"] == "cpu" and result["parameters"] > 0


def test_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("keypoints:\n  num_kp: many\n")
    code, _, err = _run(
        ["init-checkpoint", "--config", str(bad), "--out", str(tmp_path / "x.safetensors")], capsys
    )
    assert code == 2 and "keypoints.num_kp" in err and "Traceback" not in err


def test_demo_without_weights_says_untrained(tmp_path, capsys, no_default_weights):
    code, out, err = _run(["demo", "--out-dir", str(tmp_path), "--frames", "4", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "UNTRAINED" in out  # without trained weights the demo runs random ones, and says so
    with VideoReader(tmp_path / "result.mp4") as r:
        frames = list(r)
    assert len(frames) == 4 and frames[0].shape == (256, 5 * 256, 3)


def test_missing_optional_command_module_keeps_cli_working(monkeypatch):
    import commands.cli as cli

    def _no_such_package():
        from no_such_package import cli as missing  # type: ignore[import-not-found]

        return missing

    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, _no_such_package))
    parser = cli.build_parser()
    assert "no_such_package" in parser.epilog
    assert parser.parse_args(["init-checkpoint", "--out", "x"]).command == "init-checkpoint"


def test_bundled_weights_are_the_default(tmp_path, capsys):
    """The repository ships trained weights, and every command uses them when no checkpoint is given."""
    from dagan.checkpoint import DEFAULT_CHECKPOINT, resolve_checkpoint

    assert resolve_checkpoint(None) == DEFAULT_CHECKPOINT and DEFAULT_CHECKPOINT.is_file()
    meta = checkpoint_metadata(DEFAULT_CHECKPOINT)
    assert meta["trained"] == "true" and int(meta["steps"]) > 0
    code, out, err = _run(["demo", "--out-dir", str(tmp_path), "--frames", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "UNTRAINED" not in out + err
    with VideoReader(tmp_path / "result.mp4") as r:
        assert len(list(r)) == 3
