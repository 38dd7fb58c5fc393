"""Test helpers importable from any test module (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch


def make_model(config, seed: int = 0, gamma: float = 0.7):
    """A randomly initialised model in eval mode, with the attention gate opened (it starts at 0, which
    would hide the attention branch from every comparison) and non-trivial BatchNorm statistics."""
    from dagan.model import DaGAN

    torch.manual_seed(seed)
    model = DaGAN(config)
    with torch.no_grad():
        if model.generator.attention is not None:
            model.generator.attention.gamma.fill_(gamma)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model.eval()


def lip_config(gain: float = 2.5):
    """The tiny preset with keypoints 7 and 8 named the inner lips (as the bundled file's are), so its
    engines take a lip-opening gain (``keypoints.mouth_open_gain`` ``gain``)."""
    from dagan.config import config_from_dict, load_config, set_dotted, to_plain

    changes = {"keypoints.mouth_keypoints": [7, 8], "keypoints.mouth_open_gain": gain}
    return config_from_dict(set_dotted(to_plain(load_config("tiny")), changes))


def write_app_inputs(folder: Path, num_frames: int, checkpoints: dict[str, Any]) -> dict[str, Path]:
    """What the `dagan animate` / `dagan cam` tests run on, written into ``folder``: the astronaut as
    ``source`` (PNG), Grace Hopper moving as ``driving`` (``num_frames`` at 160 px, 12 fps), and an
    untrained checkpoint (``make_model``) for each named model config of ``checkpoints``."""
    import cv2

    from dagan.checkpoint import save_checkpoint
    from dagan.media import write_video
    from dagan.samples import astronaut, driving_frames, grace_hopper

    out = {"source": folder / "source.png", "driving": folder / "driving.mp4"}
    cv2.imwrite(str(out["source"]), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    write_video(out["driving"], driving_frames(grace_hopper(), num_frames=num_frames, size=160), fps=12)
    for name, config in checkpoints.items():
        model = make_model(config)
        out[name] = folder / f"{name}.safetensors"
        save_checkpoint(out[name], model.config, model, extra_metadata={"trained": "false"})
    return out


class ThreadedServer:
    """``dagan serve``'s uvicorn with the production configuration (``server.guard.uvicorn_config``: the
    guard, the header-timeout protocol) in a thread, on a free loopback port; a context manager that
    yields once it listens (``port``, ``url``)."""

    def __init__(self, settings: Any, engine: Any) -> None:
        import uvicorn

        from server.app import create_app
        from server.guard import uvicorn_config

        self.settings = settings
        self.app = create_app(settings, engine)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, log_level="warning"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def read_response(s: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP/1.1 response read from a raw socket (a test that writes its own
    request bytes: slow bodies, header floods)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    length = int(next(v for k, _, v in headers if k.strip().lower() == b"content-length"))
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def looping_camera(frames: list) -> Any:
    """A camera stand-in for a WebRTC call: an aiortc video track that plays ``frames`` (H×W×3 RGB uint8)
    in a loop, paced by aiortc's own video clock; assign ``.frames`` to change what it sends mid-call."""
    import av
    from aiortc import VideoStreamTrack

    class LoopingCamera(VideoStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.frames, self.i = frames, 0

        async def recv(self) -> Any:
            pts, base = await self.next_timestamp()
            frame = av.VideoFrame.from_ndarray(self.frames[self.i % len(self.frames)], format="rgb24")
            self.i += 1
            frame.pts, frame.time_base = pts, base
            return frame

    return LoopingCamera()
