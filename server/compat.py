"""Every use of aiortc's and aioice's private internals, in one place, with the versions it was checked on.

The service needs five things neither library offers publicly:

- :func:`stop_transports`: stopping the transports of a half-built ``RTCPeerConnection`` whose ``close``
  failed part-way (a refused offer), so no UDP socket is left open (name-mangled
  ``_RTCPeerConnection__transceivers`` and ``__sctp``);
- :func:`replace_host_addresses`: restricting ICE host candidates to chosen addresses (aioice reads the
  interface list through the module-level ``aioice.ice.get_host_addresses`` and has no per-connection
  setting);
- :func:`override_encoder_options`: extra libvpx/libx264 options for aiortc's encoders (they create their
  codec inside ``encode`` through the ``av`` name of ``aiortc.codecs.vpx`` / ``aiortc.codecs.h264``);
- :func:`time_codec_calls`: timing aiortc's VP8/H.264 ``decode`` and ``encode`` methods;
- :func:`nominated_local_candidate_types`: which candidate types ICE chose (``RTCIceTransport._connection``
  and aioice's ``Connection._nominated``), for tests of relay-only calls.

Checked against **aiortc 1.16.0** with **aioice 0.13.0**. ``pyproject.toml`` pins aiortc to
:data:`AIORTC_RANGE`; ``tests/test_compat.py`` fails with a clear message when the installed aiortc is
outside it or when :func:`missing_internals` finds an internal gone. Moving to a new aiortc: read the
functions below against its source, run that test and the WebRTC tests, then widen the range here and in
pyproject.toml together.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

#: The aiortc versions this module was checked against (pyproject.toml pins the same range).
AIORTC_RANGE = (">=1.9", "<1.17")
#: The versions the last check ran on.
CHECKED_ON = {"aiortc": "1.16.0", "aioice": "0.13.0"}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def aiortc_in_range(version: str) -> bool:
    """True when ``version`` satisfies :data:`AIORTC_RANGE` (``>=low`` and ``<high``)."""
    low, high = (_version_tuple(bound.lstrip("<>=")) for bound in AIORTC_RANGE)
    return low <= _version_tuple(version) < high


def missing_internals() -> list[str]:
    """The private names this module relies on that the installed aiortc/aioice lack (empty: all there)."""
    import aioice.ice
    from aiortc import RTCIceGatherer, RTCIceTransport, RTCPeerConnection
    from aiortc.codecs import h264, vpx

    missing = []
    pc = RTCPeerConnection()
    for name in ("_RTCPeerConnection__transceivers", "_RTCPeerConnection__sctp"):
        if not hasattr(pc, name):
            missing.append(f"RTCPeerConnection.{name}")
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        missing.append("aioice.ice.get_host_addresses")
    connection = getattr(RTCIceTransport(RTCIceGatherer()), "_connection", None)
    if connection is None:
        missing.append("RTCIceTransport._connection")
    elif not isinstance(getattr(connection, "_nominated", None), dict):
        missing.append("aioice.Connection._nominated")
    for module, classes in ((vpx, ("Vp8Decoder", "Vp8Encoder")), (h264, ("H264Decoder", "H264Encoder"))):
        if getattr(module, "av", None) is None:
            missing.append(f"{module.__name__}.av")
        for cls in classes:
            method = "decode" if cls.endswith("Decoder") else "encode"
            if not callable(getattr(getattr(module, cls, None), method, None)):
                missing.append(f"{module.__name__}.{cls}.{method}")
    return missing


# ------------------------------------------------------------------------------------ peer teardown


async def stop_transports(pc: Any) -> None:
    """Stop, one by one and never raising, every transport a peer connection created: for a connection
    whose ``close()`` failed part-way (its remote description was rejected mid-way)."""
    for transceiver in list(getattr(pc, "_RTCPeerConnection__transceivers", [])):
        for part in (transceiver.sender, transceiver.receiver):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part.stop(), 2)
        dtls = transceiver.sender.transport if transceiver.sender else None
        with contextlib.suppress(Exception):
            if dtls is not None:
                await asyncio.wait_for(dtls.stop(), 2)
                await asyncio.wait_for(dtls.transport.stop(), 2)
    sctp = getattr(pc, "_RTCPeerConnection__sctp", None)
    if sctp is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sctp.stop(), 2)
            await asyncio.wait_for(sctp.transport.stop(), 2)
            await asyncio.wait_for(sctp.transport.transport.stop(), 2)


# --------------------------------------------------------------------------------------- ICE hosts


@contextlib.contextmanager
def replace_host_addresses(lookup: Callable[[bool, bool], list[str]]) -> Iterator[None]:
    """While the block runs, aioice gathers host candidates from ``lookup(use_ipv4, use_ipv6)`` instead
    of the machine's interface list (process-wide: every peer connection gathered meanwhile)."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lookup
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


def nominated_local_candidate_types(pc: Any) -> set[str]:
    """Candidate types (host, srflx, relay) of the local side of every nominated ICE pair of ``pc``."""
    types = set()
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport
        for pair in ice._connection._nominated.values():
            types.add(pair.local_candidate.type)
    return types


# ------------------------------------------------------------------------------------------ codecs


def override_encoder_options(extra: dict[str, dict[str, str]]) -> None:
    """Make aiortc's VP8 and H.264 encoders open their codecs with ``extra[codec name]`` merged over
    aiortc's own options (bitrate control, keyframes, packetisation untouched).

    aiortc creates the codec inside ``encode`` and assigns its options right after
    ``CodecContext.create``, so the modules' ``av`` is given a stand-in whose ``create`` returns the
    context behind a thin wrapper that adds the extra options to that assignment (and keeps the merged
    dictionary as ``requested_options``: libav keeps only the options it did not use). Not idempotent:
    call it once per process (server.tracks.tune_encoders does).
    """
    import av
    from aiortc.codecs import h264, vpx

    class _Context:
        def __init__(self, ctx: Any, name: str) -> None:
            object.__setattr__(self, "_ctx", ctx)
            object.__setattr__(self, "_name", name)

        def __getattr__(self, key: str) -> Any:
            return getattr(self._ctx, key)

        def __setattr__(self, key: str, value: Any) -> None:
            if key == "options":
                value = {**value, **extra.get(self._name, {})}
                object.__setattr__(self, "requested_options", value)
            setattr(self._ctx, key, value)

    class _CodecContext:
        @staticmethod
        def create(name: str, mode: str = "r") -> Any:
            ctx = av.CodecContext.create(name, mode)
            return _Context(ctx, name) if mode == "w" and name in extra else ctx

    class _Av:
        CodecContext = _CodecContext

        def __getattr__(self, key: str) -> Any:
            return getattr(av, key)

    for module in (vpx, h264):
        module.av = _Av()


def time_codec_calls(record: Callable[[str, float, float], None]) -> None:
    """Wrap aiortc's VP8/H.264 decoders' ``decode`` and encoders' ``encode`` so each call reports
    ``record(stage, wall_s, thread_cpu_s)`` with stage "decode" or "encode". Not idempotent: call it once
    per process (server.pipeline.instrument_codecs does)."""
    from aiortc.codecs import h264, vpx

    def wrap(cls: type, name: str, stage: str) -> None:
        original = getattr(cls, name)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(self, *args, **kwargs)
            finally:
                record(stage, time.perf_counter() - w0, time.thread_time() - c0)

        timed.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(cls, name, timed)

    for module, dec, enc in ((vpx, "Vp8Decoder", "Vp8Encoder"), (h264, "H264Decoder", "H264Encoder")):
        wrap(getattr(module, dec), "decode", "decode")
        wrap(getattr(module, enc), "encode", "encode")
