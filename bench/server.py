"""``python -m bench.server``: streams per machine for ``dagan serve``, end to end on loopback.

N aiortc clients send 640×480 video at 25 fps to a real server process (``dagan serve``'s app, started
here in a child process so its CPU time is its own) and receive the avatar back. The driving video is a
real face photo moved, turned and zoomed per frame (face detection really runs), encoded once to VP8
packets that every client replays: a client then costs packetisation, not a VP8 encoder, so on a small
machine the clients leave the server its CPU. Two engines: ``zero`` (a real :class:`~engine.base.Engine`
that returns the crop resized, no network: the server's own cost) and ``bundled`` (the shipped weights on
the engine ``dagan serve`` would run here: the same selection, :func:`engine.select.default_engine`, with
the same ``DAGAN_BACKEND`` / ``DAGAN_PRECISION`` / ``DAGAN_INFER_THREADS`` overrides; the report names it).
``bundled@DAGAN_X=1+DAGAN_Y=2`` runs a variant with its own server variables, so settings are compared in
one run on one machine; ``--keep-going`` measures every N given.

Per N it reports per-stream avatar fps, glass-to-glass latency p50/p95 (each avatar frame paired with the
driving frame it came from through the per-frame data-channel message's ``src_pts``: from the packet
handed to the client's RTP sender to the avatar frame decoded by the client), server CPU ms per
stream-frame by stage (from the server's /metrics: ``dagan_stage_seconds_total`` and
``process_cpu_seconds_total``) and the load average; then the largest N held at >= 24 fps. Loopback only
(ICE host candidates pinned to 127.0.0.1), bounded by ``--budget-s``, stops by itself.

The ``DAGAN_*`` variables are the server's own: the sweep passes them to the server process it starts
(``--detect-every`` and the like set them; ``bundled@…`` variants add their own); the benchmark's own
settings are flags only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dagan.helpers import stop_process
from engine.base import Engine, FrameResult, Session, check_batch

from .media import FPS, PHOTOS, encode_vp8, face_photo, moving_face_frames
from .paths import REPO_ROOT
from .report import load_average, machine_description, percentile, timestamp, write_report

TARGET_FPS = 24.0
#: How long the sweep waits for its server to start (a first start prepares the CPU exports: minutes on
#: a busy 2-core machine; later starts take seconds).
START_TIMEOUT_S = 900.0


class ZeroCostEngine(Engine):
    """An engine with no network: the driving crop, resized to ``image_size``, is the avatar.

    Everything around the model (decode, tracking, crop, compose, encode, the batching worker) runs as
    with a real engine, so the server's own cost per stream-frame is what a benchmark with it measures.
    """

    backend = "zero"

    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.device = "cpu"

    def new_session(self, source_image: np.ndarray, relative: bool = False) -> Session:
        return Session(source=cv2.resize(source_image, (self.image_size, self.image_size)), relative=relative)

    def animate_batch(
        self, sessions: list[Session], frames: list[np.ndarray], return_depth: bool = False
    ) -> list[FrameResult]:
        check_batch(sessions, frames)
        size = (self.image_size, self.image_size)
        out = []
        for frame in frames:
            image = (
                frame if frame.shape[:2] == size else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            )
            depth = np.zeros(size, np.uint8) if return_depth else None
            out.append(FrameResult(np.ascontiguousarray(image), depth))
        return out


# ------------------------------------------------------------------------------------------- the client
# The only code here that speaks the service's HTTP + WebRTC API: :func:`connect` opens a call (session,
# photo, data channel, offer/answer) with :func:`packet_track` as its camera, and fills the :class:`Client`
# record that the measurement reads (driving packets sent, avatar frames decoded, the per-frame data-channel
# messages); :func:`hang_up` ends it. A shared client of the API can replace the body of ``connect`` as
# long as it keeps these three hooks.


@dataclass
class Client:
    """One viewer: its call (:class:`server.client.Call`), the driving packets it sent (pts → time) and
    what came back."""

    call: Any = None
    sent_at: dict[int, float] = field(default_factory=dict)
    received: list[tuple[int, float]] = field(default_factory=list)  # avatar pts, decode time
    messages: dict[int, int] = field(default_factory=dict)  # avatar pts -> src_pts

    @property
    def session_id(self) -> str:
        return self.call.session_id

    @property
    def replica(self) -> str | None:
        """X-Dagan-Replica of the response that created the session."""
        return self.call.replica if self.call is not None else None

    def window(self, t0: float, t1: float) -> tuple[int, list[float]]:
        """(avatar frames decoded in [t0, t1), their glass-to-glass latencies in seconds)."""
        frames, lat = 0, []
        for pts, t in self.received:
            if not t0 <= t < t1:
                continue
            frames += 1
            src = next((self.messages[c] for c in (pts, pts + 1, pts - 1) if c in self.messages), None)
            if src is not None and src in self.sent_at:
                lat.append(t - self.sent_at[src])
        return frames, lat


def packet_track(packets: list[bytes], client: Client, offset: int, fps: int = FPS) -> Any:
    """A camera stand-in that sends pre-encoded VP8 packets at 25 fps, starting ``offset`` frames into
    the loop (rounded to its keyframe: every client starts on frame 0 of a loop)."""
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class PacketTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self.i = 0
            self.t0: float | None = None

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise MediaStreamError
            if self.t0 is None:
                self.t0 = time.monotonic() + offset * 0.004  # clients do not all send at the same instant
            await asyncio.sleep(max(0.0, self.t0 + self.i / fps - time.monotonic()))
            packet = av.Packet(packets[self.i % len(packets)])
            packet.pts, packet.time_base = self.i * (90_000 // fps), fractions.Fraction(1, 90_000)
            client.sent_at[packet.pts] = time.monotonic()
            self.i += 1
            return packet

    return PacketTrack()


async def connect(http: Any, photo_jpeg: bytes, packets: list[bytes], offset: int, fps: int = FPS) -> Client:
    """A session through ``http`` (a server or the load balancer in front of replicas), photo uploaded,
    WebRTC call up with the packet track (VP8 only: the packets are VP8), made by the service's one
    client (:mod:`server.client`); raises on any refusal."""
    from server.client import ServiceClient

    client = Client()

    def on_message(msg: Any) -> None:
        if isinstance(msg, dict) and msg.get("type") == "frame":
            client.messages[msg["pts"]] = msg["src_pts"]

    def on_frame(frame: Any) -> None:
        client.received.append((frame.pts, time.monotonic()))

    client.call = await ServiceClient(http=http).call(
        photo_jpeg,
        packet_track(packets, client, offset, fps),
        codec="video/VP8",
        on_frame=on_frame,
        on_message=on_message,
    )
    return client


async def hang_up(client: Client) -> None:
    """Hang up and delete the session."""
    if client.call is not None:
        with contextlib.suppress(Exception):
            await client.call.close()


# ---------------------------------------------------------------------------------------------- metrics

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def stage_table(before: dict[str, float], after: dict[str, float], frames_out: float) -> dict[str, dict]:
    """Per stage: calls, wall and CPU ms per call, and CPU ms per avatar frame sent, from two scrapes."""
    from server.pipeline import STAGES

    out = {}
    for stage in STAGES:
        calls = after.get(f'dagan_stage_frames_total{{stage="{stage}"}}', 0) - before.get(
            f'dagan_stage_frames_total{{stage="{stage}"}}', 0
        )
        wall, cpu = (
            after.get(f'dagan_stage_seconds_total{{stage="{stage}",clock="{c}"}}', 0)
            - before.get(f'dagan_stage_seconds_total{{stage="{stage}",clock="{c}"}}', 0)
            for c in ("wall", "cpu")
        )
        out[stage] = {
            "calls": int(calls),
            "wall_ms_per_call": 1000 * wall / calls if calls else 0.0,
            "cpu_ms_per_call": 1000 * cpu / calls if calls else 0.0,
            "cpu_ms_per_frame_out": 1000 * cpu / frames_out if frames_out else 0.0,
            "wall_ms_per_frame_out": 1000 * wall / frames_out if frames_out else 0.0,
        }
    return out


# --------------------------------------------------------------------------------------------- server


def serve_main(argv: list[str]) -> None:
    """The child process: the real app with the chosen engine on 127.0.0.1; prints its port."""
    p = argparse.ArgumentParser(prog="python -m bench.server --serve")
    p.add_argument("--engine", default="zero", choices=("zero", "bundled"))
    p.add_argument("--max-sessions", type=int, default=16)
    a = p.parse_args(argv)
    import uvicorn

    from server.app import create_app

    engine, choice = serve_engine(a.engine)
    print("ENGINE " + json.dumps(choice), flush=True)
    app = create_app(server_settings(a.max_sessions), engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
        await task

    asyncio.run(run())


def serve_engine(name: str) -> tuple[Engine, dict[str, Any]]:
    """The benchmark server's engine and what the report says about it: ``zero`` (:class:`ZeroCostEngine`)
    or ``bundled``, exactly what ``dagan serve`` runs — the same selection
    (:func:`engine.select.default_engine`), the same server variables (``DAGAN_CHECKPOINT``,
    ``DAGAN_BACKEND``, ``DAGAN_DEVICE``, ``DAGAN_PRECISION``, ``DAGAN_INFER_THREADS``), the same thread
    split."""
    if name == "zero":
        return ZeroCostEngine(), {
            "backend": "zero",
            "precision": "-",
            "reason": "no network: the server's own cost",
        }
    from dagan.checkpoint import resolve_checkpoint
    from engine.select import default_engine
    from server.cli import engine_options

    opts = engine_options()  # the variables `dagan serve` reads, through the same reader
    engine, chosen = default_engine(
        resolve_checkpoint(opts["checkpoint"]),
        backend=opts["backend"] or "auto",
        device=opts["device"] or "auto",
        precision=opts["precision"] or None,
        threads=opts["threads"] or None,
        parallel=opts["parallel"] or None,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    return engine, chosen.as_dict()


def server_settings(max_sessions: int) -> Any:
    """The benchmark server's settings: the server's own ``DAGAN_*`` variables for the media work
    (``DAGAN_DETECT_EVERY``, ``DAGAN_MEDIA_THREADS``, ``DAGAN_DETECT_PROCESSES``) and the picture and
    motion settings a variant may set (``bundled@DAGAN_PICTURE=full+DAGAN_PICTURE_SIZE=...``), read by
    the server's one reader (:func:`server.cli.read_server_options`); loopback only, and limits that let
    every client of the sweep in from 127.0.0.1."""
    from server.cli import SETTING_OPTIONS, read_server_options
    from server.settings import ServerSettings

    wanted = (
        "picture",
        "picture_size",
        "smooth_min_cutoff",
        "smooth_beta",
        "auto_neutral_s",
        "media_threads",
        "detect_every",
        "detect_processes",
    )
    values = read_server_options([o for o in SETTING_OPTIONS if o.field in wanted])
    return ServerSettings(
        **values,
        ice_host_addresses=("127.0.0.1",),
        max_sessions=max_sessions,
        max_sessions_per_client=max_sessions,  # every client of the benchmark is on 127.0.0.1
        max_uploads_per_client=8,
        sessions_per_minute=1e6,
        session_burst=10_000,
        peer_timeout_s=30.0,
    )


@contextlib.contextmanager
def server_process(
    engine: str, max_sessions: int, env: dict[str, str], start_timeout_s: float = START_TIMEOUT_S
) -> Any:
    """The benchmark server in a child process (its CPU time its own) with the server variables ``env``;
    yields (process, port) once it listens."""
    cmd = [sys.executable, "-m", "bench.server", "--serve", "--engine", engine]
    cmd += ["--max-sessions", str(max_sessions)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=REPO_ROOT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + start_timeout_s
        port = None
        proc.engine_choice = {}  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("ENGINE "):
                proc.engine_choice = json.loads(line[7:])  # type: ignore[attr-defined]
            if line.startswith("PORT "):
                port = int(line.split()[1])
                break
        if port is None:
            raise RuntimeError(f"the benchmark server did not start (exit code {proc.poll()})")
        yield proc, port
    finally:
        stop_process(proc)


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds of a ``/proc/…/stat`` file (a process, or one of its threads)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live child processes (detector processes)."""
    total = 0.0
    with contextlib.suppress(OSError):
        total = _stat_cpu_s(Path(f"/proc/{pid}/stat"))
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _proc_cpu_s(int(child))
    return total


def _threads_cpu_s(pid: int, prefix: str) -> float:
    """User + system CPU seconds of the threads of ``pid`` whose name starts with ``prefix``: mediapipe
    names its graph threads ``mediapipe/…``, CPU that in-process face detection costs beyond the calling
    thread (the detect stage's timer sees only the latter)."""
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                if (task / "comm").read_text().startswith(prefix):
                    total += _stat_cpu_s(task / "stat")
    return total


# ---------------------------------------------------------------------------------------------- sweep


async def measure(
    port: int, pid: int, n: int, packets: list[bytes], photo: bytes, warmup_s: float, seconds: float
) -> dict:
    """Run ``n`` clients: warm up, then measure for ``seconds``."""
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        clients = []
        try:
            for k in range(n):
                clients.append(await connect(http, photo, packets, k))
            deadline = time.monotonic() + 60  # ICE, DTLS, the first keyframe, detector processes starting
            while time.monotonic() < deadline and not all(len(c.received) >= 5 for c in clients):
                await asyncio.sleep(0.2)
            await asyncio.sleep(warmup_s)
            before = parse_metrics((await http.get("/metrics")).text)
            cpu0, own0, t0 = _proc_cpu_s(pid), time.process_time(), time.monotonic()
            mp0 = _threads_cpu_s(pid, "mediapipe")
            load0 = os.getloadavg()[0]
            await asyncio.sleep(seconds)
            t1 = time.monotonic()
            cpu1, own1 = _proc_cpu_s(pid), time.process_time()
            mp1 = _threads_cpu_s(pid, "mediapipe")
            after = parse_metrics((await http.get("/metrics")).text)
            load1 = os.getloadavg()[0]
        finally:
            for c in clients:
                await hang_up(c)
    fps, lat = [], []
    for c in clients:
        frames, latencies = c.window(t0, t1)
        fps.append(frames / (t1 - t0))
        lat += latencies
    frames_out = after["dagan_frames_out_total"] - before["dagan_frames_out_total"]
    frames_in = after["dagan_frames_in_total"] - before["dagan_frames_in_total"]
    server_cpu = cpu1 - cpu0
    stages = stage_table(before, after, frames_out)
    per_frame = 1000 * server_cpu / frames_out if frames_out else float("nan")
    # What the stage timers do not see: aiortc's RTP/RTCP/SRTP/SCTP in Python, the event loop, uvicorn,
    # mediapipe's own graph threads (in-process detection), the GIL hand-overs.
    other = per_frame - sum(v["cpu_ms_per_frame_out"] for v in stages.values())
    cores = len(os.sched_getaffinity(0))
    return {
        "streams": n,
        "fps_per_stream_median": statistics.median(fps),
        "fps_per_stream_min": min(fps),
        "latency_p50_ms": 1000 * percentile(lat, 0.5),
        "latency_p95_ms": 1000 * percentile(lat, 0.95),
        "frames_in": int(frames_in),
        "frames_out": int(frames_out),
        "server_cpu_ms_per_frame_out": per_frame,
        "other_cpu_ms_per_frame_out": other,
        # of "other": mediapipe's graph threads (in-process detection; detector processes are children)
        "mediapipe_threads_cpu_ms_per_frame_out": 1000 * (mp1 - mp0) / frames_out if frames_out else 0.0,
        # CPU-bound estimate: streams at 25 fps that all cores would carry at this cost per frame, were the
        # machine free (clients elsewhere); the measured fps above is what this machine did now.
        "cpu_bound_streams_estimate": cores * 1000 / (FPS * per_frame) if frames_out else 0.0,
        "server_cpu_cores": server_cpu / (t1 - t0),
        "client_cpu_cores": (own1 - own0) / (t1 - t0),
        "stages": stages,
        "load_avg_1min": [round(load0, 2), round(load1, 2)],
        "held": min(fps) >= TARGET_FPS,
    }


def run(
    engines: list[str],
    streams: list[int],
    seconds: float,
    warmup_s: float,
    budget_s: float,
    env: dict[str, str],
    keep_going: bool = False,
    photos: str | Path = PHOTOS,
    start_timeout_s: float = START_TIMEOUT_S,
) -> list[dict]:
    """The sweep: for each engine, N = streams... until a step misses 24 fps (unless ``keep_going``) or
    the budget runs out. ``env``: server variables for every engine; an engine may carry its own,
    ``bundled@K=V+K2=V2`` (variants of one setting compared in one run, on one machine at one load).
    The driving face is the first photo in ``photos`` (else a bundled sample)."""
    from server.tracks import host_candidates

    started = time.monotonic()
    photo_rgb = face_photo(photos)
    packets = encode_vp8(moving_face_frames(photo_rgb))
    from dagan.samples import astronaut

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    results = []
    with host_candidates(("127.0.0.1",)):
        for spec in engines:
            engine, own = parse_engine_spec(spec)
            entry = {
                "engine": spec,
                "env": {**env, **own},
                "steps": [],
                "max_streams_at_24fps": 0,
                "date": timestamp(),
                "load_before": load_average(),
            }
            results.append(entry)
            server = server_process(engine, max(streams), {**env, **own}, start_timeout_s)
            with server as (proc, port):
                entry["engine_choice"] = getattr(proc, "engine_choice", {})
                if entry["engine_choice"]:
                    print(f"[{spec}] engine: {_choice_text(entry['engine_choice'])}", flush=True)
                for n in streams:
                    if time.monotonic() - started + warmup_s + seconds + 5 > budget_s:
                        entry["stopped"] = f"time budget of {budget_s:g} s reached before N={n}"
                        break
                    step = asyncio.run(measure(port, proc.pid, n, packets, jpeg.tobytes(), warmup_s, seconds))
                    entry["steps"].append(step)
                    _print_step(spec, step)
                    if step["held"]:
                        entry["max_streams_at_24fps"] = max(entry["max_streams_at_24fps"], n)
                    elif not keep_going:
                        break
            entry["load_after"] = load_average()
    return results


def parse_engine_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``bundled@DAGAN_INFER_THREADS=2+DAGAN_MEDIA_THREADS=1`` → ("bundled", {those variables})."""
    name, _, rest = spec.partition("@")
    env = {}
    for item in filter(None, rest.split("+")):
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("DAGAN_"):
            raise SystemExit(f"python -m bench.server: bad engine variant {item!r} (want DAGAN_NAME=VALUE)")
        env[key] = value
    if name not in ("zero", "bundled"):
        raise SystemExit(f"python -m bench.server: unknown engine {name!r} (zero or bundled)")
    return name, env


def _choice_text(choice: dict) -> str:
    """The server's start-up line for the engine it chose (:meth:`engine.select.EngineChoice.describe`)."""
    from engine.select import EngineChoice

    return EngineChoice.from_dict(choice).describe()


def _print_step(engine: str, s: dict) -> None:
    stages = "  ".join(
        f"{k} {v['cpu_ms_per_call']:.2f}/{v['wall_ms_per_call']:.2f}"
        for k, v in s["stages"].items()
        if v["calls"]
    )
    print(
        f"[{engine}] N={s['streams']:2d}  fps/stream median {s['fps_per_stream_median']:5.1f} min "
        f"{s['fps_per_stream_min']:5.1f}  g2g p50 {s['latency_p50_ms']:6.0f} "
        f"p95 {s['latency_p95_ms']:6.0f} ms  "
        f"server {s['server_cpu_ms_per_frame_out']:5.2f} ms CPU/frame ({s['server_cpu_cores']:.2f} cores), "
        f"clients {s['client_cpu_cores']:.2f} cores, load {s['load_avg_1min']}",
        flush=True,
    )
    print(f"      stage ms per call (thread CPU / wall): {stages}", flush=True)
    print(
        f"      not in a stage {s['other_cpu_ms_per_frame_out']:.2f} ms CPU per frame, of it mediapipe's "
        f"graph threads {s.get('mediapipe_threads_cpu_ms_per_frame_out', 0.0):.2f}",
        flush=True,
    )


def markdown(results: list[dict]) -> str:
    """The results as the tables of docs/benchmarks.md."""
    import torch

    from server.pipeline import STAGES

    m = machine_description(torch.device("cpu"))
    lines = [f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, onnxruntime {m.get('onnxruntime', '-')}.", ""]
    for r in results:
        lines += [
            f"Engine `{r['engine']}`, settings {r['env'] or 'default'}: largest N at >= 24 fps: "
            f"**{r['max_streams_at_24fps']}**",
            "",
        ]
        if r.get("engine_choice"):
            lines += [f"Engine run by the server: {_choice_text(r['engine_choice'])}.", ""]
        if "load_before" in r:
            lines += [
                f"{r.get('date', '')}, load average (1/5/15 min) before {r['load_before']}, "
                f"after {r.get('load_after')}.",
                "",
            ]
        lines += [
            "| N | fps/stream (median, min) | g2g p50 / p95 ms | "
            "server CPU ms per frame (other; mediapipe) | "
            "CPU-bound streams estimate | server cores | client cores | load |",
            "|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for s in r["steps"]:
            lines.append(
                f"| {s['streams']} | {s['fps_per_stream_median']:.1f}, {s['fps_per_stream_min']:.1f} | "
                f"{s['latency_p50_ms']:.0f} / {s['latency_p95_ms']:.0f} | "
                f"{s['server_cpu_ms_per_frame_out']:.1f} ({s['other_cpu_ms_per_frame_out']:.1f}; "
                f"{s.get('mediapipe_threads_cpu_ms_per_frame_out', 0.0):.1f}) | "
                f"{s['cpu_bound_streams_estimate']:.1f} | "
                f"{s['server_cpu_cores']:.2f} | {s['client_cpu_cores']:.2f} | {s['load_avg_1min']} |"
            )
        if r["steps"]:
            s = r["steps"][-1]
            lines += ["", f"Stages at N={s['streams']} (thread CPU ms / wall ms per call of the stage):", ""]
            lines.append("| " + " | ".join(STAGES) + " |")
            lines.append("|" + "---:|" * len(STAGES))
            lines.append(
                "| "
                + " | ".join(
                    f"{s['stages'][k]['cpu_ms_per_call']:.2f} / {s['stages'][k]['wall_ms_per_call']:.2f}"
                    for k in STAGES
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(
        prog="python -m bench.server",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="python -m bench.server --serve ... is the server process the sweep starts (not by hand).",
    )
    p.add_argument(
        "--engine",
        default="zero,bundled",
        help="comma list of zero, bundled; a variant with its own server variables: "
        "bundled@DAGAN_INFER_THREADS=2+DAGAN_MEDIA_THREADS=1",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="measure every N given, not only up to the first below 24 fps",
    )
    p.add_argument("--streams", default="1,2,4,6,8,10,12", help="N values of the sweep, in order")
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per N")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds before the window (ICE, ramp-up)")
    p.add_argument("--budget-s", type=float, default=600.0, help="stop the sweep after this long")
    p.add_argument(
        "--start-timeout-s",
        type=float,
        default=START_TIMEOUT_S,
        help="wait this long for each server to start (a first start prepares the CPU exports; default "
        "%(default)g)",
    )
    p.add_argument(
        "--photos",
        default=str(PHOTOS),
        help="folder of face photos; the first *.jpg drives the clients (default %(default)s; a bundled "
        "sample when missing)",
    )
    p.add_argument("--detect-every", type=int, help="DAGAN_DETECT_EVERY for the server")
    p.add_argument("--media-threads", type=int, help="DAGAN_MEDIA_THREADS for the server")
    p.add_argument("--detect-processes", type=int, help="DAGAN_DETECT_PROCESSES for the server")
    p.add_argument(
        "--infer-threads", type=int, help="DAGAN_INFER_THREADS for the server (default: its split)"
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the tables here")
    a = p.parse_args(argv)
    env = {}
    for flag, name in (
        ("detect_every", "DAGAN_DETECT_EVERY"),
        ("media_threads", "DAGAN_MEDIA_THREADS"),
        ("detect_processes", "DAGAN_DETECT_PROCESSES"),
        ("infer_threads", "DAGAN_INFER_THREADS"),
    ):
        if getattr(a, flag) is not None:
            env[name] = str(getattr(a, flag))
    results = run(
        [e.strip() for e in a.engine.split(",") if e.strip()],
        [int(x) for x in a.streams.split(",")],
        a.seconds,
        a.warmup,
        a.budget_s,
        env,
        keep_going=a.keep_going,
        photos=a.photos,
        start_timeout_s=a.start_timeout_s,
    )
    write_report(results, markdown(results), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
