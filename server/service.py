"""The service behind the routes: sessions, their photos, peer connections and control messages, the
inference worker and the clean-up of sessions nobody uses. One :class:`AvatarService` per app.

Flow of one viewer: a session reserves a slot (rate and share per client address checked), the photo is
decoded and face-cropped off the event loop on a small pool of its own (the engine caches the source
once, on the worker thread), the offer gets the session's one peer connection, and media flows until the
client deletes the session, hangs up, or goes silent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import time
from typing import Any

import numpy as np

from dagan.face import NoFaceError, locate_source
from dagan.paste import DEFAULT_MASK, plan_paste
from dagan.smoothing import OneEuroFilter
from engine import Engine
from engine.base import EngineError, check_mouth_gain
from engine.paste import Paster

from .guard import Bucket, TokenBucket, client_key, ice_servers_for
from .metrics import Metrics
from .pipeline import instrument_codecs
from .schemas import ApiError, CheckedSource, SdpMessage, SessionOptions, SourceInfo
from .sessions import (
    ClientLimitError,
    LiveSession,
    OutputFrame,
    ServerBusyError,
    SessionNotFoundError,
    SessionRegistry,
)
from .settings import ServerSettings
from .signalling import answer_offer, check_sdp, close_quietly, new_peer_connection
from .tracks import AvatarTrack, consume_input, host_candidates, send_json
from .uploads import decode_upload, sample_source_jpeg
from .worker import InferenceWorker

log = logging.getLogger("dagan.server")
#: The automatic neutral pose's window (seconds) for a session that asks for it when the server's own
#: setting (--auto-neutral) is off.
AUTO_NEUTRAL_S = 2.0


class AvatarService:
    """Owns the registry, the worker, the peer connections and the clean-up loop of one app."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = SessionRegistry(settings.max_sessions)
        self.metrics = Metrics(
            backend=getattr(engine, "backend", "?"),
            image_size=engine.image_size,
            device=str(getattr(engine, "device", "?")),
            untrained=settings.untrained,
        )
        self.metrics.active_sessions = lambda: len(self.registry)
        self.metrics.max_sessions = settings.max_sessions
        self.metrics.replica = settings.replica_id
        self.worker = InferenceWorker(
            engine,
            self.registry,
            self.metrics,
            settings.output_size,
            pool_size=settings.media_threads,
            detect_every=settings.detect_every,
            detect_processes=settings.detect_processes,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session_limiter = TokenBucket(settings.sessions_per_minute, settings.session_burst_size)
        # Camera frames that cannot be cropped: counted, logged once a minute, the peer told why.
        self.worker.min_video_side = settings.min_video_side
        self.worker.max_video_side = settings.max_video_side
        self.worker.bad_video_notice_s = settings.bad_video_notice_s
        self.worker.on_notice = self.notify
        self.worker.smoothing = settings.smoothing  # the One-Euro filter of each session's crop box
        # Photos are decoded and face-searched on their own few threads: that bounds how many run at once,
        # and only these threads' malloc arenas ever hold a big decoded picture (with asyncio's shared
        # executor every one of its threads kept hundreds of MB after a burst of uploads).
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_concurrent_decodes, thread_name_prefix="decode"
        )
        self._stack = contextlib.ExitStack()
        self._background: set[asyncio.Task] = set()
        self._sample: bytes | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stack.enter_context(host_candidates(self.settings.ice_host_addresses))
        instrument_codecs()  # decode/encode stage timers (server.pipeline)
        self.worker.start()
        self._spawn(self._cleanup_loop())

    async def stop(self) -> None:
        for session in self.registry.snapshot():
            await self.close_session(session.id, "server shutting down")
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.worker.stop)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._stack.close()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- sessions ----------------------------------------------------------------------------------
    def create_session(self, options: SessionOptions, client: str = "?") -> LiveSession:
        """A new session for ``client`` (the address the request guard resolved): 429 over the
        per-address rate or share of the slots, 503 when every slot is taken."""
        relative = self.settings.relative if options.relative is None else options.relative
        mouth_gain = self.check_mouth_gain(options.mouth_gain, 422)
        key = client_key(client)

        def admit() -> None:  # there is room: within the per-address rate?
            wait = self.session_limiter.take(key)
            if wait > 0:
                self.metrics.count("sessions_limited", "rate")
                seconds = max(1, math.ceil(wait))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many new sessions from this address; try again in {seconds} s",
                    {"Retry-After": str(seconds)},
                )

        try:
            session = self.registry.create(
                relative=relative,
                show_depth=options.show_depth,
                client=key,
                per_client=self.settings.sessions_per_client,
                admit=admit,
            )
        except ClientLimitError as err:
            self.metrics.count("sessions_limited", "per_client")
            raise ApiError(429, "too_many_sessions", str(err), {"Retry-After": "10"}) from err
        except ServerBusyError as err:
            self.metrics.add("sessions_rejected")
            raise ApiError(503, "server_busy", str(err), {"Retry-After": "10"}) from err
        s = self.settings
        session.messages = Bucket(s.messages_per_s, s.message_burst)
        session.picture = options.picture or s.picture
        session.mouth_gain = mouth_gain
        auto = s.auto_neutral_s > 0 if options.auto_neutral is None else options.auto_neutral
        session.auto_neutral = (s.auto_neutral_s or AUTO_NEUTRAL_S) if auto else 0.0
        self.metrics.add("sessions_created")
        log.info("session %s created (%d/%d)", session.id, len(self.registry), self.settings.max_sessions)
        return session

    def check_mouth_gain(self, value: Any, status: int) -> float | None:
        """A mouth gain a person asked for (session options, the "mouth_gain" message), checked against
        the served model (:func:`engine.base.check_mouth_gain`): ApiError ``status`` "bad_mouth_gain"
        with the engine's one-line reason otherwise, so a refusal never reaches the worker's frames."""
        try:
            return check_mouth_gain(value, bool(self.engine.mouth_keypoints))
        except EngineError as err:
            raise ApiError(status, "bad_mouth_gain", str(err)) from err

    def get(self, session_id: str) -> LiveSession:
        try:
            return self.registry.get(session_id)
        except SessionNotFoundError as err:
            raise ApiError(404, "session_not_found", str(err)) from err

    async def decode_and_crop(self, data: bytes) -> tuple[np.ndarray, np.ndarray, Any]:
        """Decode the photo and find its face, at most ``max_concurrent_decodes`` at once.

        A decoded 4096² photo and the face search on it take ~200 MB for a moment; without the bound,
        a dozen parallel uploads took 2 GB. The bound is the decode pool's size, so it holds even for a
        request cancelled meanwhile (its thread runs to the end but no other one starts).
        """
        side = self.settings.max_image_side

        def work() -> tuple[np.ndarray, np.ndarray, Any]:
            rgb = decode_upload(data, side)
            try:
                face = locate_source(rgb)  # the face and its crop box (kept for the paste-back)
            except NoFaceError as err:
                raise ApiError(422, "no_face", str(err)) from err
            return rgb, face.crop_box.crop(rgb, self.engine.image_size), face

        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, work)

    async def check_source(self, data: bytes) -> CheckedSource:
        rgb, _, face = await self.decode_and_crop(data)
        return CheckedSource(width=rgb.shape[1], height=rgb.shape[0], face_box=face.crop_box.to_dict())

    async def set_source(self, session: LiveSession, data: bytes) -> SourceInfo:
        rgb, crop, face = await self.decode_and_crop(data)
        box = face.crop_box
        # The paste-back plan (framed photo, mask) for full-picture frames: per photo, on a decode thread.
        plan = await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, plan_paste, rgb, face, crop, self.settings.picture_size, DEFAULT_MASK
        )
        size = (rgb.shape[1], rgb.shape[0])
        del rgb  # only the plan's frame-sized picture of it is kept

        def build() -> Any:  # on the worker thread: the engine is only ever used there
            engine_session = self.engine.new_session(crop, relative=session.relative)
            if self.settings.smoothing is not None:
                engine_session.kp_filter = OneEuroFilter(self.settings.smoothing)
            if session.auto_neutral > 0:
                engine_session.choose_neutral_automatically(session.auto_neutral)
            session.paster = Paster(plan, getattr(self.engine, "device", "cpu"))
            session.source_crop = crop
            session.engine_session = engine_session
            session.source_size = size
            return engine_session

        built = await self.worker.call(build)
        if session.closed:  # deleted while the photo was being processed
            session.engine_session = session.source_crop = session.paster = None
            raise ApiError(404, "session_not_found", f"session {session.id!r} ended during the upload")
        blinks = built.lids is not None  # this photo's session, whatever another upload did since
        return SourceInfo(id=session.id, width=size[0], height=size[1], face_box=box.to_dict(), blinks=blinks)

    async def answer(self, session: LiveSession, offer: SdpMessage) -> SdpMessage:
        """The session's one peer connection: the offer checked (server.signalling), the avatar track
        added, the answer returned. A refused offer leaves the session as it was, ready for another."""
        if offer.type != "offer":
            raise ApiError(400, "bad_sdp", f"expected an SDP of type 'offer', got {offer.type!r}")
        if session.engine_session is None:
            raise ApiError(
                409, "no_source", "upload a source photo (PUT .../source) before starting the video"
            )
        if session.pc is not None:
            raise ApiError(409, "already_connected", "this session already has a peer; create a new session")
        check_sdp(offer.sdp, self.settings.max_sdp_media, self.settings.max_ice_candidates)
        pc = new_peer_connection(ice_servers_for(self.settings, f"server-{session.id}"))
        session.pc = pc
        session.connected_at = time.monotonic()
        assert self.loop is not None
        session.output = AvatarTrack(
            self.loop,
            on_sent=lambda item, pts: self._on_sent(session, item, pts),
            on_drop=self._on_output_drop,
        )
        self._wire(session, pc)
        try:
            sdp = await answer_offer(pc, offer.sdp, session.output)
        except Exception as err:
            log.info("session %s: offer refused: %s: %s", session.id, type(err).__name__, err)
            session.pc = None
            if session.output is not None:
                session.output.stop()
            session.output = None
            session.connected_at = None
            await close_quietly(pc)
            if session.closed:
                raise ApiError(404, "session_not_found", f"session {session.id!r} ended") from err
            if isinstance(err, ApiError):
                raise
            text = " ".join(str(err).split())[:120] or type(err).__name__
            raise ApiError(400, "bad_sdp", f"malformed or unsupported SDP offer ({text})") from err
        if session.closed:  # deleted while the answer was made: close_session already ran without it
            await close_quietly(pc)
            raise ApiError(404, "session_not_found", f"session {session.id!r} ended during the offer")
        return SdpMessage(sdp=sdp, type="answer")

    def _wire(self, session: LiveSession, pc: Any) -> None:
        sid = session.id

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind != "video":
                return
            task = self._spawn(consume_input(session, track, self._on_input))
            session.tasks.append(task)
            task.add_done_callback(lambda _: self._spawn(self.close_session(sid, "peer hung up")))

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            session.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self.handle_message(session, message)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", sid, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self.close_session(sid, f"connection {pc.connectionState}"))

    def handle_message(self, session: LiveSession, message: Any) -> None:
        """Control messages from the page: ``recalibrate``, ``{"type": "show_depth", "value": bool}``,
        ``{"type": "picture", "value": "crop" | "full"}`` and ``{"type": "mouth_gain", "value": number |
        null}`` (null: the model's own gain).

        Runs inside aiortc's SCTP receive path, where an exception would end the whole connection, so
        nothing escapes: an oversized, undecodable or unknown message gets one short error reply that
        never repeats what was sent. Over the session's message rate, messages are dropped before they
        are looked at (counted; the peer is told once): a flood must not cost the call its frames.
        """
        if session.messages is not None and not session.messages.allow():
            session.messages_dropped += 1
            self.metrics.add("messages_dropped")
            if not session.messages_told:
                session.messages_told = True
                rate = self.settings.messages_per_s
                log.warning("session %s: data-channel messages over %g/s are being dropped", session.id, rate)
                send_json(
                    session.channel,
                    {
                        "type": "error",
                        "error": "rate_limited",
                        "message": f"too many control messages: at most {rate:g} a second are read, the "
                        "rest are dropped",
                    },
                )
            return
        try:
            error = self._control(session, message)
        except Exception:  # pragma: no cover - _control handles every input; this guards the DTLS loop
            log.exception("session %s: control message failed", session.id)
            error = ("bad_message", "the control message could not be handled")
        if error is not None:
            code, text = error
            send_json(session.channel, {"type": "error", "error": code, "message": text})

    def _control(self, session: LiveSession, message: Any) -> tuple[str, str] | None:
        limit = self.settings.max_message_bytes
        if not isinstance(message, (str, bytes)):
            return ("bad_message", "control messages are text")
        size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "replace"))
        if len(message) > limit or size > limit:
            return ("message_too_large", f"control messages are limited to {limit} bytes")
        if isinstance(message, bytes):
            try:
                message = message.decode("utf-8")
            except UnicodeDecodeError:
                return ("bad_message", "control messages must be UTF-8 text")
        text = message.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                return ("bad_message", "the control message is not valid JSON")
        else:
            data = {"type": text}
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "recalibrate":
            session.recalibrate = True
            send_json(session.channel, {"type": "recalibrated"})
            return None
        if kind == "show_depth":
            value = data.get("value", True)
            if not isinstance(value, bool):
                return ("bad_message", 'show_depth needs "value": true or false')
            session.show_depth = value
            return None
        if kind == "picture":
            value = data.get("value")
            if value not in ("crop", "full"):
                return ("bad_message", 'picture needs "value": "crop" or "full"')
            session.picture = value
            return None
        if kind == "mouth_gain":
            try:
                session.mouth_gain = self.check_mouth_gain(data.get("value"), 400)
            except ApiError as err:
                return (err.code, err.message)
            return None
        return (
            "unknown_message",
            'unknown control message; known types: "recalibrate", "show_depth", "picture", "mouth_gain"',
        )

    def notify(self, session: LiveSession, message: dict) -> None:
        """Send ``message`` on the session's data channel from any thread (the worker tells the peer
        why its video cannot be used); aiortc's objects are only touched on the event loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(lambda: session.closed or send_json(session.channel, message))

    def _on_input(self, dropped: bool) -> None:
        self.metrics.add("frames_in")
        if dropped:
            self.metrics.drop("input")
        self.worker.wake()

    def _on_output_drop(self) -> None:
        self.metrics.drop("output")

    def _on_sent(self, session: LiveSession, item: OutputFrame, pts: int) -> None:
        server_s = time.monotonic() - item.arrived
        self.metrics.observe_frame(server_s)
        session.frames_out += 1
        # The frame-id side channel: which webcam frame (receiver pts) this avatar frame (pts) came from.
        send_json(
            session.channel,
            {
                "type": "frame",
                "pts": pts,
                "src_pts": item.src_pts,
                "server_ms": round(server_s * 1000, 2),
                "infer_ms": round(item.infer_s * 1000, 2),
                "batch": item.batch,
                "face": item.face,
                "dropped": session.input.dropped,
                "stages": getattr(item, "stages", None),  # wall ms per server stage (server.pipeline)
            },
        )

    async def close_session(self, session_id: str, reason: str) -> bool:
        session = self.registry.pop(session_id)
        if session is None:
            return False
        log.info("session %s closed: %s", session_id, reason)
        current = asyncio.current_task()
        for task in session.tasks:
            if task is not current:
                task.cancel()
        if session.output is not None:
            session.output.stop()
        if session.pc is not None:
            await close_quietly(session.pc)
        session.input.clear()
        session.engine_session = session.source_crop = session.channel = session.pc = None
        session.paster = None
        session.tasks.clear()
        self.worker.wake()  # lets the worker free the session's face tracker now
        return True

    async def _cleanup_loop(self) -> None:
        """Free sessions nobody uses: never connected, peer gone silent, connection failed."""
        s = self.settings
        while True:
            await asyncio.sleep(s.cleanup_interval_s)
            now = time.monotonic()
            for session in self.registry.snapshot():
                if session.pc is None:
                    if now - session.created > s.idle_timeout_s:
                        await self.close_session(
                            session.id, f"no peer connected within {s.idle_timeout_s:g} s"
                        )
                    continue
                since = session.last_input or session.connected_at or now
                if now - since > s.peer_timeout_s:
                    await self.close_session(session.id, f"no video from the peer for {s.peer_timeout_s:g} s")

    def sample(self) -> bytes:
        if self._sample is None:
            self._sample = sample_source_jpeg()
        return self._sample
