"""The benchmark package (bench/): the server sweep, the GIL measurement, the prepared GPU check
(scripts/gpu_check.sh → bench/gpu.py) and what they share (engines, cache keys, reports, flags).

The server benchmark runs for real, briefly: one client, the zero-cost engine, a few seconds, so CI proves
that it starts a server, gets video back, pairs frames for latency and reads every stage from /metrics.
The GPU check runs its ``--smoke`` mode on the CPU. The model benchmark (``dagan bench``) is run in
tests/test_cli.py and tests/test_cpu_engine.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench import media
from bench import server as sb
from server.pipeline import STAGES

ROOT = Path(__file__).resolve().parent.parent


def test_zero_cost_engine_returns_the_crop_resized():
    engine = sb.ZeroCostEngine(image_size=32)
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    crop = np.stack(
        [ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), 255 - ramp[None, :].repeat(64, 0)], -1
    )
    crop = crop.astype(np.uint8)
    sessions = [engine.new_session(crop), engine.new_session(crop)]
    out = engine.animate_batch(sessions, [crop, crop[:, ::-1].copy()], return_depth=True)
    assert [r.image.shape for r in out] == [(32, 32, 3)] * 2
    assert out[1].driving_depth.shape == (32, 32)
    assert np.abs(out[0].image.astype(int) - crop[::2, ::2]).mean() < 3  # the crop, resized
    assert not np.array_equal(out[0].image, out[1].image)


def test_driving_video_has_a_detectable_moving_face():
    frames = media.moving_face_frames(media.face_photo(), n=10)
    assert frames[0].shape == (480, 640, 3)
    assert np.abs(frames[0].astype(int) - frames[5]).mean() > 5  # it moves
    from dagan.face import FaceDetector

    with FaceDetector() as det:
        assert all(det.detect(f) for f in frames[::3])
    packets = media.encode_vp8(frames)
    assert len(packets) == 10 and len(packets[0]) > len(packets[1])  # a keyframe, then deltas


def test_stage_table_from_two_scrapes():
    before = sb.parse_metrics('dagan_stage_frames_total{stage="decode"} 10\n')
    after = sb.parse_metrics(
        'dagan_stage_frames_total{stage="decode"} 30\n'
        'dagan_stage_seconds_total{stage="decode",clock="cpu"} 0.04\n'
        'dagan_stage_seconds_total{stage="decode",clock="wall"} 0.05\n'
    )
    table = sb.stage_table(before, after, frames_out=10)
    assert table["decode"]["calls"] == 20
    assert table["decode"]["cpu_ms_per_call"] == pytest.approx(2.0)
    assert table["decode"]["wall_ms_per_call"] == pytest.approx(2.5)
    assert table["decode"]["cpu_ms_per_frame_out"] == pytest.approx(4.0)
    assert table["infer"]["calls"] == 0


@pytest.mark.slow
def test_server_bench_one_stream_end_to_end(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "bench.server", "--engine", "zero", "--streams", "1"]
    cmd += ["--seconds", "3", "--warmup", "1", "--budget-s", "150", "--detect-every", "3", "--json", str(out)]
    cmd += ["--markdown", str(table), "--photos", str(tmp_path / "no-photos"), "--start-timeout-s", "120"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=240)
    assert "Engine `zero`, settings {'DAGAN_DETECT_EVERY': '3'}" in table.read_text()
    (result,) = json.loads(out.read_text())
    (step,) = result["steps"]
    assert result["engine"] == "zero" and result["env"] == {"DAGAN_DETECT_EVERY": "3"}
    assert step["frames_out"] > 10, step  # avatar video came back
    assert step["fps_per_stream_median"] > 3
    assert 0 < step["latency_p50_ms"] <= step["latency_p95_ms"] < 5000
    assert step["server_cpu_ms_per_frame_out"] > 0
    for stage in STAGES:  # every stage of a stream-frame was timed on the server
        assert step["stages"][stage]["calls"] > 0, stage
    # detection every 3rd frame: about a third as many detect calls as conversions
    ratio = step["stages"]["detect"]["calls"] / step["stages"]["convert"]["calls"]
    assert 0.2 < ratio < 0.5, ratio
    assert math.isfinite(step["stages"]["encode"]["cpu_ms_per_call"])


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, check=True, timeout=400)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["models"]
    model = report["models"][0]
    names = [v["name"] for v in model["variants"]]
    assert "fp32" in names, model
    cells = model["variants"][0]["batches"]
    assert [c["batch"] for c in cells] == [1, 2]
    assert all(c["call_p50_ms"] > 0 and c["fps"] > 0 for c in cells)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "SMOKE RUN" in table and "| fp32 |" in table
    assert (tmp_path / "nvidia-smi.txt").exists()


def test_engine_variants_and_the_engine_named_in_the_tables():
    """``bundled@K=V+K2=V2`` runs the bundled engine with its own server variables (variants of one
    setting in one run), and the tables say which engine the server ran, the date and the load."""
    assert sb.parse_engine_spec("zero") == ("zero", {})
    assert sb.parse_engine_spec("bundled@DAGAN_INFER_THREADS=2+DAGAN_DETECT_EVERY=3") == (
        "bundled",
        {"DAGAN_INFER_THREADS": "2", "DAGAN_DETECT_EVERY": "3"},
    )
    with pytest.raises(SystemExit, match="bad engine variant"):
        sb.parse_engine_spec("bundled@THREADS=2")
    with pytest.raises(SystemExit, match="unknown engine"):
        sb.parse_engine_spec("fast")
    stages = {s: {"calls": 1, "cpu_ms_per_call": 1.0, "wall_ms_per_call": 1.0} for s in STAGES}
    step = {
        "streams": 1, "fps_per_stream_median": 25.0, "fps_per_stream_min": 24.9, "latency_p50_ms": 120,
        "latency_p95_ms": 140, "server_cpu_ms_per_frame_out": 30.0, "other_cpu_ms_per_frame_out": 4.0,
        "cpu_bound_streams_estimate": 2.6, "server_cpu_cores": 0.75, "client_cpu_cores": 0.05,
        "load_avg_1min": [0.1, 0.8], "stages": stages, "mediapipe_threads_cpu_ms_per_frame_out": 1.5,
    }  # fmt: skip
    choice = {
        "backend": "onnxruntime", "precision": "int8", "threads": 1, "parallel": 2, "frame_ms": 21.5,
        "frame_threads": 1, "reason": "why",
    }  # fmt: skip
    text = sb.markdown(
        [
            {
                "engine": "bundled", "env": {}, "steps": [step], "max_streams_at_24fps": 1,
                "engine_choice": choice, "date": "2026-12-04 13:00 UTC", "load_before": [0.1, 0.2, 0.3],
                "load_after": [0.8, 0.4, 0.3],
            }
        ]
    )  # fmt: skip
    assert (
        "onnxruntime int8, 1 inference thread, a batch of streams split into 2 parallel calls, "
        "a lone stream on 2 threads, 21.5 ms/frame on 1 thread measured at start — why"
    ) in text
    assert "| 30.0 (4.0; 1.5) |" in text  # server CPU per frame (not in a stage; mediapipe's threads)
    assert "2026-12-04 13:00 UTC" in text and "[0.1, 0.2, 0.3]" in text and "| 1 | 25.0, 24.9 |" in text


def test_thread_cpu_by_name_prefix_reads_this_process():
    """The mediapipe column's reader: CPU of the threads whose name starts with a prefix ("" = all of
    them: it grows by what this thread spends; a name no thread has = 0)."""
    import os
    import time

    before, c0 = sb._threads_cpu_s(os.getpid(), ""), time.thread_time()
    while time.thread_time() < c0 + 0.2:  # 0.2 s of this thread's CPU (threads that ended are not read)
        pass
    spent = sb._threads_cpu_s(os.getpid(), "") - before
    assert 0.15 < spent < 0.5, spent
    assert sb._threads_cpu_s(os.getpid(), "no-such-thread-name") == 0.0


def test_browser_bench_camera_and_window_figures(tmp_path):
    """bench.browser's pieces without a browser: the webcam video is the clip letterboxed to what the page
    asks for and put on the camera's clock, and the per-second page samples become fps figures."""
    from bench import browser as bb
    from dagan.media import fit_frame

    tall = np.full((100, 50, 3), 200, np.uint8)
    boxed = fit_frame(tall, 64, 48)
    assert boxed.shape == (48, 64, 3)
    assert boxed[:, :10].max() == 0 and boxed[:, -10:].max() == 0  # black bars left and right
    assert boxed[:, 32].min() > 150  # the picture in the middle, full height

    clip = tmp_path / "clip.avi"  # 10 frames at 10 fps, frame i filled with 20·i
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(10):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    frames, text = bb.camera_frames(clip, seconds=0.8, fps=25)
    assert len(frames) == 20 and frames[0].shape == (480, 640, 3) and "clip.avi" in text
    levels = [int(f[240, 320, 0]) for f in frames]
    assert levels == sorted(levels) and abs(levels[-1] - 140) <= 6  # 0.8 s in: the 8th frame (20·7)
    assert len(set(levels)) == 8  # each 10-fps frame held for 2–3 ticks of the 25-fps camera
    y4m = tmp_path / "cam.y4m"
    bb.write_camera(y4m, frames[:3])
    header = len(b"YUV4MPEG2 W640 H480 F25:1 Ip A1:1 C420jpeg\n")
    assert y4m.stat().st_size == header + 3 * (len(b"FRAME\n") + 640 * 480 * 3 // 2)
    with pytest.raises(ValueError, match=r"missing\.mp4 does not exist"):  # the project's MediaError
        bb.camera_frames(tmp_path / "missing.mp4", 1.0)

    samples = [
        {"t": float(t), "avatar": 25 * t - (3 if t >= 2 else 0), "camera": 25 * t, "message": "",
         "stats": f"fps: 24.{t}   round trip: {t} ms   server: 30 ms"}
        for t in range(4)
    ]  # fmt: skip
    assert bb.window_rates(samples, "avatar") == [25.0, 22.0, 25.0]
    cpu = {"server": 1.5, "browser": 0.6, "seconds": 3.0}
    metrics = (
        {"dagan_frames_out_total": 100.0, "dagan_frames_in_total": 100.0},
        {"dagan_frames_out_total": 175.0, "dagan_frames_in_total": 176.0,
         'dagan_stage_seconds_total{stage="infer",clock="cpu"}': 0.6,
         'dagan_stage_frames_total{stage="infer"}': 75.0},
    )  # fmt: skip
    r = bb.summarise(samples, cpu, metrics)
    assert r["avatar_fps_median"] == 25.0 and r["avatar_fps_min"] == 22.0
    assert r["avatar_fps_mean"] == pytest.approx(72 / 3)
    assert r["camera_fps_median"] == 25.0 and r["round_trip_ms_median"] == 1.5
    assert r["server_frames_out_per_s"] == 25.0 and r["server_cpu_cores"] == 0.5
    assert r["server_cpu_ms_per_frame_out"] == 20.0 and r["browser_cpu_cores"] == pytest.approx(0.2)
    assert r["stages"]["infer"]["cpu_ms_per_frame_out"] == pytest.approx(8.0)  # 0.6 s over 75 frames
    assert r["other_cpu_ms_per_frame_out"] == pytest.approx(12.0)
    with pytest.raises(RuntimeError, match="two samples"):
        bb.summarise(samples[:1], cpu, metrics)


@pytest.mark.slow
def test_browser_bench_end_to_end(tmp_path):
    """The page in headless Chromium against the benchmark server (zero-cost engine), briefly: the avatar
    plays and every figure of the report is there. Skipped without Debian's chromium or playwright."""
    from bench import browser as bb

    if not bb.CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    out, table = tmp_path / "b.json", tmp_path / "b.md"
    cmd = [sys.executable, "-m", "bench.browser", "--engine", "zero", "--seconds", "3", "--warmup", "1"]
    cmd += ["--camera-seconds", "1", "--json", str(out), "--markdown", str(table), "--start-timeout-s", "120"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    (r,) = json.loads(out.read_text())
    assert r["engine"] == "zero" and r["avatar_fps_median"] > 5 and r["camera_fps_median"] > 5
    assert r["server_frames_out_per_s"] > 5 and r["server_cpu_ms_per_frame_out"] > 0
    assert r["browser_cpu_cores"] > 0 and r["page_message"] == ""
    assert "| zero |" in table.read_text() and "The browser runs on the server's machine" in table.read_text()
    for args, code, why in (
        (["--clip", str(tmp_path / "none.mp4")], 2, "is not a file"),
        (["--url", "http://127.0.0.1:9", "--engine", "zero"], 2, "--engine does not apply"),
        (["--token", "t"], 2, "go with --url"),
        (["--url", "http://127.0.0.1:9", "--camera-seconds", "0.2"], 1, "error:"),  # nothing listens
    ):
        cmd = [sys.executable, "-m", "bench.browser", *args]
        bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert bad.returncode == code and why in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr

    # --url: a server that is already running (here the sweep's child process, as scripts/serve.sh would
    # be), measured in the page; its CPU is read where its pid is given.
    wall = tmp_path / "wall.png"
    cv2.imwrite(str(wall), np.full((200, 200, 3), 120, np.uint8))
    with sb.server_process("zero", 2, {}, 120) as (proc, port):
        url = f"http://127.0.0.1:{port}"
        runs = [bb.run("server", None, None, 2, 1, 1, url=url, server_pid=pid) for pid in (proc.pid, None)]
        # A photo without a face: the page refuses it, and the harness says so at once.
        with pytest.raises(RuntimeError, match=r"photo wall\.png was not taken; the page says: .*face"):
            bb.run("server", None, wall, 2, 1, 1, url=url)
    assert all(r["avatar_fps_median"] > 5 and r["engine_choice"]["backend"] == "zero" for r in runs), runs
    assert runs[0]["server_cpu_ms_per_frame_out"] > 0 and runs[1]["server_cpu_ms_per_frame_out"] is None
    text = bb.markdown(runs[1:])
    assert f"| {url} (zero, cpu) |" in text and "its CPU not read" in text
