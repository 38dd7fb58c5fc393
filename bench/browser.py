"""``python -m bench.browser``: the web page in headless Chromium against ``dagan serve``, a real face
video as its webcam, the avatar's frame rate as the page shows it.

Why beside ``python -m bench.server``: that sweep's clients are aiortc processes replaying pre-encoded
packets, so they cost the machine almost nothing. A user's call is the browser: it captures, encodes
VP8, decodes the avatar and draws it, and where the browser runs on the server's machine (a laptop
running ``bash scripts/serve.sh`` and opening the page: the first thing a user does) it takes CPU from
the server. This harness measures that call end to end, on the page.

Steps, top to bottom in :func:`run`:

1. **Camera**: the first ``--camera-seconds`` of a real clip (``--clip``, default the held-out clip d3
   of :data:`bench.paths.REAL_FACES`; a moved photo where that is missing), letterboxed to 640×480 — what
   the page asks ``getUserMedia`` for — written as the raw .y4m that Chromium's fake capture device
   plays in a loop (:func:`write_camera`).
2. **Server**: the same child process as the server sweep (:func:`bench.server.server_process`): the
   real app and the engine ``dagan serve`` would pick here, its own ``DAGAN_*`` variables. Or, with
   ``--url``, a server that is already running (``bash scripts/serve.sh``, a container, a replica set:
   ``--token`` for one with an access token); its CPU is then read only where ``--server-pid`` names it.
3. **Page**: Chromium (``--chromium``, Debian's package; never downloaded) opens the page, the photo
   (``--photo``) goes through the page's file input, Start, and the harness waits for the avatar to play.
4. **Window**: after ``--warmup`` seconds, once per second for ``--seconds``, the avatar ``<video>``'s
   decoded-frame count (``getVideoPlaybackQuality``) and the page's own stats line; the CPU time of the
   server process and of every Chromium process, the server's frame counters (/metrics) at both ends.
5. **Report** (:func:`summarise`): avatar fps as displayed (median and minimum of the 1-s windows), the
   camera's fps, the server's frames in and out per second, the page's round trip, CPU cores of the
   server and the browser, server CPU ms per avatar frame, the machine, the load before and after, the
   date (JSON and markdown through :func:`bench.report.write_report`).

Loopback only (ICE candidates pinned to 127.0.0.1). Glass-to-glass latency is not measured here (the
page has no capture time to pair with); ``python -m bench.server`` measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dagan.media import MediaError, VideoReader, fit_frame

from .media import FPS, HEIGHT, WIDTH, face_photo, moving_face_frames
from .paths import REAL_FACES
from .report import load_average, machine_description, timestamp, write_report
from .server import _proc_cpu_s, _stat_cpu_s, parse_metrics, server_process, stage_table

CHROMIUM = Path("/usr/bin/chromium")
DEFAULT_CLIP = REAL_FACES / "clips" / "d3.mp4"
DEFAULT_PHOTO = REAL_FACES / "photos" / "s42.jpg"

#: Chromium flags of a headless call on loopback: the fake camera plays the .y4m, permission prompts are
#: answered yes, ICE offers 127.0.0.1 (real addresses, not mDNS names), and nothing reaches the network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)

PLAYING = (
    "(() => { const v = document.getElementById('avatar');"
    " return v.videoWidth > 0 && v.currentTime > 1 && !v.paused; })()"
)
SAMPLE = """() => {
  const q = (id) => { const v = document.getElementById(id);
    return v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0; };
  return { t: performance.now() / 1000, avatar: q('avatar'), camera: q('local'),
           stats: document.getElementById('stats').textContent,
           message: document.getElementById('message').hidden ? '' :
             document.getElementById('message').textContent };
}"""


# ---------------------------------------------------------------------------------------------- camera


def camera_frames(clip: Path | None, seconds: float, fps: int = FPS) -> tuple[list[np.ndarray], str]:
    """RGB 640×480 frames for the fake camera and a description of them: the clip's first ``seconds``
    (resampled to ``fps``, fitted into the frame by :func:`dagan.media.fit_frame`), or, without a clip,
    a real face photo moved per frame (the server sweep's driving video). A clip that cannot be read is
    a :class:`dagan.media.MediaError`."""
    count = max(1, round(seconds * fps))
    if clip is not None:
        frames: list[np.ndarray] = []
        with VideoReader(clip) as reader:
            for k, rgb in enumerate(reader, start=1):
                # this clip frame shows until k / fps s: the camera ticks that fall before it get it
                image = None
                while len(frames) < count and len(frames) / fps < k / reader.fps:
                    image = fit_frame(rgb, WIDTH, HEIGHT) if image is None else image
                    frames.append(image)
                if len(frames) >= count:
                    break
        return frames, f"{clip.name}, first {len(frames) / fps:.1f} s, letterboxed to {WIDTH}×{HEIGHT}"
    return moving_face_frames(face_photo(), n=count), f"a real photo moved per frame, {WIDTH}×{HEIGHT}"


def write_camera(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Raw YUV 4:2:0 video (.y4m), the format Chromium's --use-file-for-fake-video-capture plays."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())


# ------------------------------------------------------------------------------------------------ CPU


def chromium_cpu_s() -> float:
    """CPU seconds of every live process whose executable is Chromium's (browser, renderer, GPU and
    utility processes alike; a headless browser is several)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            name = (proc / "comm").read_text()
            if "chromium" in name or "chrome" in name:
                total += _stat_cpu_s(proc / "stat")
    return total


PAGE_ERROR = (
    "(() => { const m = document.getElementById('message');"
    " return !m.hidden && m.classList.contains('error'); })()"
)


def _wait(page: Any, condition: str, seconds: float, what: str) -> None:
    """Wait for a JavaScript condition on the page, or for the page to show an error (an access token
    missing, a photo without a face...); either that or ``seconds`` passing is one error that says what
    did not happen and what the page says."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function(f"({condition}) || {PAGE_ERROR}", timeout=seconds * 1000)
        failed = page.evaluate(PAGE_ERROR)
    except PageTimeout:
        failed = True
    if failed:
        message = page.evaluate(SAMPLE)["message"] or "nothing"
        raise RuntimeError(f"{what}; the page says: {message}")


def _server_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of the server process and its children; None where it is not known (``--url``
    without ``--server-pid``) or not readable here (another machine or container)."""
    if pid is None or not Path(f"/proc/{pid}/stat").exists():
        return None
    return _proc_cpu_s(pid)


# ------------------------------------------------------------------------------------------- summary

_FPS_RE = re.compile(r"fps:\s*([0-9.]+)")
_RTT_RE = re.compile(r"round trip:\s*([0-9.]+)\s*ms")


def window_rates(samples: list[dict[str, Any]], key: str) -> list[float]:
    """Frames per second of ``key`` between consecutive samples (each ``{"t": s, key: count}``)."""
    out = []
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        if dt > 0:
            out.append((b[key] - a[key]) / dt)
    return out


def summarise(
    samples: list[dict[str, Any]],
    cpu: dict[str, float],
    metrics: tuple[dict[str, float], dict[str, float]],
) -> dict[str, Any]:
    """The window's figures from the per-second page samples, the CPU seconds spent in it
    (``server`` — None where unknown —, ``browser``, ``seconds``) and the server's /metrics at its two
    ends."""
    if len(samples) < 2:
        raise RuntimeError("fewer than two samples of the page: nothing to measure")
    avatar = window_rates(samples, "avatar")
    camera = window_rates(samples, "camera")
    span = samples[-1]["t"] - samples[0]["t"]
    before, after = metrics
    frames_out = after.get("dagan_frames_out_total", 0.0) - before.get("dagan_frames_out_total", 0.0)
    frames_in = after.get("dagan_frames_in_total", 0.0) - before.get("dagan_frames_in_total", 0.0)
    page_fps = [float(m.group(1)) for s in samples if (m := _FPS_RE.search(s["stats"]))]
    rtts = [float(m.group(1)) for s in samples if (m := _RTT_RE.search(s["stats"]))]
    seconds = cpu["seconds"]
    stages = stage_table(before, after, frames_out)
    server = cpu["server"]
    per_frame = 1000 * server / frames_out if frames_out and server is not None else None
    staged = sum(v["cpu_ms_per_frame_out"] for v in stages.values())
    return {
        "avatar_fps_median": statistics.median(avatar),
        "avatar_fps_min": min(avatar),
        "avatar_fps_mean": (samples[-1]["avatar"] - samples[0]["avatar"]) / span,
        "camera_fps_median": statistics.median(camera) if camera else 0.0,
        "page_stats_fps_median": statistics.median(page_fps) if page_fps else None,
        "round_trip_ms_median": statistics.median(rtts) if rtts else None,
        "server_frames_in_per_s": frames_in / seconds,
        "server_frames_out_per_s": frames_out / seconds,
        "server_cpu_cores": None if server is None else server / seconds,
        "browser_cpu_cores": cpu["browser"] / seconds,
        "server_cpu_ms_per_frame_out": per_frame,
        "stages": stages,  # thread CPU / wall ms per call and CPU ms per avatar frame, from /metrics
        "other_cpu_ms_per_frame_out": None if per_frame is None else per_frame - staged,
        "page_message": samples[-1]["message"],
        "last_stats": samples[-1]["stats"],
    }


# -------------------------------------------------------------------------------------------------- run


def run(
    engine: str,
    clip: Path | None,
    photo: Path | None,
    seconds: float,
    warmup: float,
    camera_seconds: float,
    chromium: Path = CHROMIUM,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 900.0,
    progress: Any = print,
    url: str | None = None,
    token: str | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Steps 1–5 of the module doc; the report's data. ``url``: measure the server there instead of
    starting one (``engine`` is then only the report's label)."""
    from playwright.sync_api import sync_playwright

    if not chromium.exists():
        raise FileNotFoundError(f"{chromium} not found: install Debian's chromium or pass --chromium")
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="dagan-browser-bench-") as tmp:
        frames, camera_text = camera_frames(clip, camera_seconds)  # 1. camera
        y4m = Path(tmp) / "camera.y4m"
        write_camera(y4m, frames)
        del frames
        if photo is None:  # no real photo here: the face the server sweep drives with
            photo = Path(tmp) / "photo.jpg"
            cv2.imwrite(str(photo), cv2.cvtColor(face_photo(), cv2.COLOR_RGB2BGR))
        import httpx

        with contextlib.ExitStack() as stack:
            if url is None:  # 2. server
                proc, port = stack.enter_context(server_process(engine, 2, env or {}, start_timeout_s))
                base, pid, choice = f"http://127.0.0.1:{port}", proc.pid, proc.engine_choice
            else:
                base, pid = url.rstrip("/"), server_pid
                with httpx.Client(timeout=10) as probe:
                    health = probe.get(base + "/healthz").raise_for_status().json()
                choice = {"backend": health.get("backend", "?"), "device": health.get("device", "?")}
            progress(f"[{engine}] server on {base}; engine: {choice}")
            flags = [*CHROMIUM_FLAGS, f"--use-file-for-fake-video-capture={y4m}"]
            auth = {"Authorization": f"Bearer {token}"} if token else {}
            http = stack.enter_context(httpx.Client(base_url=base, timeout=30, headers=auth))
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=flags)
                try:
                    page = browser.new_context(bypass_csp=True).new_page()  # 3. page
                    page.goto(base + (f"/#token={token}" if token else "/"))
                    # the sample photo loads by itself and enables Start; the chosen photo replaces it
                    # (Start is disabled while the server checks it, from the change event on)
                    ready = "!document.getElementById('start').disabled"
                    _wait(page, ready, 60, "the page did not get ready within 60 s")
                    page.set_input_files("#file", str(photo))
                    _wait(page, ready, 60, f"the photo {photo.name} was not taken")
                    page.click("#start")
                    _wait(page, PLAYING, 120, "the avatar did not play within 120 s")
                    time.sleep(warmup)
                    samples = []  # 4. window
                    m0 = parse_metrics(http.get("/metrics").raise_for_status().text)
                    s0, b0, t0 = _server_cpu_s(pid), chromium_cpu_s(), time.monotonic()
                    for k in range(int(seconds) + 1):
                        samples.append(page.evaluate(SAMPLE))
                        if k < int(seconds):
                            time.sleep(max(0.0, t0 + k + 1 - time.monotonic()))
                    t1 = time.monotonic()
                    s1, b1 = _server_cpu_s(pid), chromium_cpu_s()
                    m1 = parse_metrics(http.get("/metrics").raise_for_status().text)
                    page.click("#stop")
                finally:
                    browser.close()
    server = None if s0 is None or s1 is None else s1 - s0
    cpu = {"server": server, "browser": b1 - b0, "seconds": t1 - t0}
    result = summarise(samples, cpu, (m0, m1))  # 5. report
    result.update(
        engine=engine,
        url=url,
        engine_choice=choice,
        camera=camera_text,
        photo=photo.name,
        seconds=seconds,
        warmup_s=warmup,
        date=timestamp(),
        load_avg_before=load0,
        load_avg_after=load_average(),
        machine=machine_description(__import__("torch").device("cpu")),
        cores=len(os.sched_getaffinity(0)),
    )
    return result


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def markdown(results: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md: one row per engine."""
    lines = [
        "| engine | avatar fps shown (median, min) | camera fps | server frames in / out per s | "
        "page round trip ms | server cores | browser cores | server CPU ms per avatar frame |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        choice = r["engine_choice"]
        if r.get("url"):
            name = f"{r['url']} ({choice.get('backend', '?')}, {choice.get('device', '?')})"
        elif r["engine"] == "zero":
            name = "zero"
        else:
            name = f"{r['engine']} ({choice.get('backend', '?')} {choice.get('precision', '?')})"
        lines.append(
            f"| {name} | {_f(r['avatar_fps_median'])}, {_f(r['avatar_fps_min'])} | "
            f"{_f(r['camera_fps_median'])} | {_f(r['server_frames_in_per_s'])} / "
            f"{_f(r['server_frames_out_per_s'])} | {_f(r['round_trip_ms_median'], 0)} | "
            f"{_f(r['server_cpu_cores'], 2)} | {_f(r['browser_cpu_cores'], 2)} | "
            f"{_f(r['server_cpu_ms_per_frame_out'])} |"
        )
    lines += ["", "Server CPU ms per avatar frame by stage (thread CPU), and what no stage timer sees:", ""]
    names = list(results[0]["stages"])
    lines.append("| engine | " + " | ".join(names) + " | not in a stage |")
    lines.append("|---|" + "---:|" * (len(names) + 1))
    for r in results:
        cells = [_f(r["stages"][n]["cpu_ms_per_frame_out"], 2) for n in names]
        cells.append(_f(r["other_cpu_ms_per_frame_out"], 2))
        lines.append(f"| {r['engine']} | " + " | ".join(cells) + " |")
    first = results[0]
    lines += [
        "",
        f"Camera: {first['camera']}; photo {first['photo']}; {first['seconds']:g} s measured after "
        f"{first['warmup_s']:g} s; {first['machine']['cpu']}, {first['cores']} cores; {first['date']}, "
        f"load average before {first['load_avg_before']}, after {results[-1]['load_avg_after']}. "
        + (
            f"The server at {first['url']}"
            + ("" if first["server_cpu_cores"] is not None else " (its CPU not read: no --server-pid)")
            + "; the browser on this machine."
            if first.get("url")
            else "The browser runs on the server's machine."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.browser", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    p.add_argument("--engine", help="comma list of zero, bundled (default bundled)")
    p.add_argument(
        "--url",
        help="measure the server already running there (e.g. http://127.0.0.1:8000 from scripts/serve.sh) "
        "instead of starting one",
    )
    p.add_argument("--token", help="with --url: the server's access token, if it has one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's process id, to read its CPU")
    p.add_argument(
        "--clip",
        help=f"the webcam's video (default {DEFAULT_CLIP} where it exists, else a photo moved per frame)",
    )
    p.add_argument(
        "--photo", help=f"the source photo (default {DEFAULT_PHOTO} where it exists, else a bundled face)"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the avatar starts playing")
    p.add_argument("--camera-seconds", type=float, default=8.0, help="length of the webcam loop")
    p.add_argument("--chromium", default=str(CHROMIUM), help="Chromium's executable")
    p.add_argument("--start-timeout-s", type=float, default=900.0, help="wait this long for the server")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    a = p.parse_args(argv)
    if a.seconds < 1 or a.warmup < 0 or a.camera_seconds <= 0:
        p.error("--seconds must be >= 1, --warmup >= 0 and --camera-seconds > 0")
    for flag in ("clip", "photo"):
        if getattr(a, flag) and not Path(getattr(a, flag)).is_file():
            p.error(f"--{flag}: {getattr(a, flag)} is not a file")
    clip = Path(a.clip) if a.clip else (DEFAULT_CLIP if DEFAULT_CLIP.is_file() else None)
    photo = Path(a.photo) if a.photo else (DEFAULT_PHOTO if DEFAULT_PHOTO.is_file() else None)
    if a.url and a.engine:
        p.error("--url measures the server that runs there: --engine does not apply")
    if (a.token or a.server_pid) and not a.url:
        p.error("--token and --server-pid go with --url")
    engines = ["server"] if a.url else [e.strip() for e in (a.engine or "bundled").split(",") if e.strip()]
    import httpx

    results = []
    for engine in engines:
        if not a.url and engine not in ("zero", "bundled"):
            p.error(f"--engine: {engine!r} is not zero or bundled")
        try:
            r = run(
                engine,
                clip,
                photo,
                a.seconds,
                a.warmup,
                a.camera_seconds,
                Path(a.chromium),
                start_timeout_s=a.start_timeout_s,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
                url=a.url,
                token=a.token,
                server_pid=a.server_pid,
            )
        except (RuntimeError, FileNotFoundError, MediaError, httpx.HTTPError) as err:
            print(f"python -m bench.browser: error: {err}", file=sys.stderr)
            return 1
        print(
            f"[{engine}] avatar {r['avatar_fps_median']:.1f} fps shown (min {r['avatar_fps_min']:.1f}), "
            f"camera {r['camera_fps_median']:.1f}, server {_f(r['server_cpu_cores'], 2)} cores, browser "
            f"{r['browser_cpu_cores']:.2f} cores",
            file=sys.stderr,
            flush=True,
        )
        results.append(r)
    write_report(results, markdown(results), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
