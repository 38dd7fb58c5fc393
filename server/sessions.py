"""Live sessions: the registry with its cap, and the latest-frame-wins slots between threads.

A webcam sends 25–30 frames a second whatever the model's speed. Queueing them would make latency grow
without bound as soon as inference is slower than the camera, so every hand-over point holds exactly one
frame: a new frame replaces an unconsumed one, which is counted as dropped. The inference worker always
sees the newest picture of the user, and the delay stays at about one inference time.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dagan.errors import UserError
from dagan.latest import LatestSlot


class ServerBusyError(UserError, RuntimeError):
    """All session slots are taken (HTTP 503)."""


class ClientLimitError(UserError, RuntimeError):
    """This client address already holds its share of the session slots (HTTP 429)."""


class SessionNotFoundError(UserError, KeyError):
    """No live session has this id (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "session not found"


@dataclass
class InputFrame:
    """A decoded webcam frame (an ``av.VideoFrame``, converted to pixels by the worker, not the event
    loop), its RTP-derived ``pts`` and the server's monotonic arrival time."""

    frame: Any
    pts: int | None
    arrived: float


@dataclass
class OutputFrame:
    """An avatar frame ready to send: ``frame`` is an ``av.VideoFrame``; ``src_pts``/``arrived`` identify
    the input frame it was made from (for the latency side channel); ``face`` tells whether the driving
    frame had a face; ``infer_s`` is the batched engine call's duration."""

    frame: Any
    src_pts: int | None
    arrived: float
    face: bool
    infer_s: float
    batch: int


@dataclass
class LiveSession:
    """One viewer's state. Touched by three parties, each owning its own fields:

    - the event loop (HTTP handlers, aiortc callbacks): ``pc``, ``tasks``, ``output``, timestamps;
    - the inference worker thread: the engine session swap, the face tracker (kept by the worker);
    - both, through thread-safe hand-overs: ``input`` (LatestSlot) and the flags below, which are plain
      attribute writes of immutable values (atomic in CPython) read once per frame by the worker.
    """

    id: str
    relative: bool
    show_depth: bool = False
    created: float = field(default_factory=time.monotonic)
    engine_session: Any = None  # engine.base.Session, set by the worker when a source is uploaded
    source_crop: Any = None  # the photo's face crop (H×W×3 uint8), shown until the camera finds a face
    source_size: tuple[int, int] | None = None
    pc: Any = None  # aiortc RTCPeerConnection once an offer arrived
    channel: Any = None  # the browser's "control" RTCDataChannel, when it opened one
    output: Any = None  # server.tracks.AvatarTrack
    tasks: list[asyncio.Task] = field(default_factory=list)
    input: LatestSlot[InputFrame] = field(default_factory=LatestSlot)
    last_input: float | None = None
    connected_at: float | None = None
    recalibrate: bool = False
    closed: bool = False
    frames_out: int = 0
    face_missing: int = 0
    client: str = "?"  # server.guard.client_key of the address that created it (the per-address cap)
    # Camera frames that could not be used (server.worker, pool threads): how many, when the current run
    # of nothing but such frames began, when one was last logged, whether the peer was told about it.
    bad_frames: int = 0
    bad_since: float | None = None
    bad_logged_at: float | None = None
    bad_told: bool = False
    # Data-channel messages (event loop): the session's rate limit (server.guard.Bucket), what it
    # dropped, whether the peer was told.
    messages: Any = None
    messages_dropped: int = 0
    messages_told: bool = False
    # Paste-back (docs/server.md, "Paste-back"): "crop" or "full" (event loop writes, pool reads), and
    # the photo's engine.paste.Paster, built with each upload; the automatic neutral pose, per session.
    picture: str = "crop"
    paster: Any = None
    auto_neutral: float = 0.0
    # The session's lip-opening gain (engine.base.Session.mouth_gain; None: the model's): the event loop
    # writes it (session options, the "mouth_gain" message), the worker copies it onto the engine session
    # before each frame.
    mouth_gain: float | None = None

    def info(self) -> dict:
        """The session as the HTTP API reports it."""
        return {
            "id": self.id,
            "relative": self.relative,
            "show_depth": self.show_depth,
            "has_source": self.engine_session is not None,
            "connected": self.pc is not None and self.pc.connectionState == "connected",
            "frames_in": self.input.put_count,
            "frames_dropped": self.input.dropped,
            "frames_out": self.frames_out,
            "picture": self.picture,
            "mouth_gain": self.mouth_gain,
        }


class SessionRegistry:
    """Thread-safe id → session map with a hard cap (the event loop adds/removes, the worker reads)."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: dict[str, LiveSession] = {}
        self.created_total = 0

    def create(
        self,
        relative: bool,
        show_depth: bool = False,
        client: str = "?",
        per_client: int | None = None,
        admit: Callable[[], None] | None = None,
    ) -> LiveSession:
        """A new session for ``client`` (a :func:`server.guard.client_key`), which may hold at most
        ``per_client`` at once (None: no per-address cap). ``admit()`` runs once there is room and may
        refuse by raising (the rate limit: only a request that would get a session spends a token, so a
        client told "full" is not also told "too fast" when a slot frees). The id is 128 random bits
        from the OS's CSPRNG, as 32 hex digits: it is a capability (docs/security.md), and uuid4 has
        only 122."""
        with self._lock:
            if per_client is not None and per_client < self.max_sessions:  # else: "full" says it all
                held = sum(1 for s in self._sessions.values() if s.client == client)
                if held >= per_client:
                    raise ClientLimitError(
                        f"this address already holds {held} sessions, the most one address may; end one "
                        "(or wait for an unused one to time out) and try again"
                    )
            if len(self._sessions) >= self.max_sessions:
                raise ServerBusyError(
                    f"server busy: all {self.max_sessions} session slots are in use, try again later"
                )
            if admit is not None:
                admit()
            session = LiveSession(
                id=secrets.token_hex(16), relative=relative, show_depth=show_depth, client=client
            )
            self._sessions[session.id] = session
            self.created_total += 1
            return session

    def get(self, session_id: str) -> LiveSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFoundError(f"no session {session_id!r} (it ended, timed out or never existed)")
        return session

    def pop(self, session_id: str) -> LiveSession | None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
        return session

    def snapshot(self) -> list[LiveSession]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._sessions
