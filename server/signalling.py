"""WebRTC signalling: the checks an SDP offer passes before aiortc parses it, the peer connection that
answers it (non-trickle: the answer carries every ICE candidate), and a teardown that never raises.

Offers come from untrusted clients: each m= section costs aiortc a transceiver with its own ICE and DTLS
transports (UDP sockets), and some malformed offers are accepted by aiortc's parser only to fail later in
a background task, leaving a dead call behind a 200. :func:`check_sdp` refuses both with a 400.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from .compat import stop_transports
from .guard import check_ice_candidates
from .schemas import ApiError
from .settings import IceServer

log = logging.getLogger("dagan.server")

_CONTROL_CHARS = {chr(c) for c in range(32)} - {"\r", "\n", "\t"} | {"\x7f"}


def check_sdp(sdp: str, max_media: int, max_candidates: int = 32) -> None:
    """Cheap checks before aiortc parses an offer: SDP text, a video section, a bounded media count.

    Each m= section costs aiortc a transceiver with its own ICE and DTLS transports (UDP sockets), so a
    64 KB offer with hundreds of them must not get that far.
    """
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it must start with v=0 and offer a video track")
    if any(ch in _CONTROL_CHARS for ch in sdp):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it contains control characters")
    media = [line for line in sdp.splitlines() if line.startswith("m=")]
    if not any(line.startswith("m=video ") for line in media):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: it must offer a video track (m=video)")
    if len(media) > max_media:
        raise ApiError(
            400, "bad_sdp", f"the SDP offer has {len(media)} media sections; at most {max_media} are accepted"
        )
    # Every candidate field, since aiortc only int()s them (server.guard.check_ice_candidates).
    problem = check_ice_candidates(sdp, max_candidates)
    if problem is not None:
        raise ApiError(400, "bad_sdp", f"malformed SDP offer: {problem}")
    # What aiortc accepts here but fails on later, in a background task, leaving a dead call behind a
    # 200: every section needs its ICE credentials, a DTLS fingerprint and a mid of its own.
    from aiortc.sdp import SessionDescription

    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as err:
        raise ApiError(400, "bad_sdp", f"malformed SDP offer ({type(err).__name__})") from err
    mids = [m.rtp.muxId for m in parsed.media]
    if len(set(mids)) != len(mids) or not all(mids):
        raise ApiError(400, "bad_sdp", "malformed SDP offer: every media section needs its own a=mid")
    for m in parsed.media:
        if not (m.ice and m.ice.usernameFragment and m.ice.password):
            missing = "ICE credentials"
        elif not (m.dtls and m.dtls.fingerprints):
            missing = "DTLS fingerprint"
        else:
            continue
        raise ApiError(400, "bad_sdp", f"malformed SDP offer: the {m.kind} section has no {missing}")


def new_peer_connection(ice_servers: Iterable[IceServer]) -> Any:
    """An ``RTCPeerConnection`` with exactly these ICE servers. ``iceServers`` is a list, never None:
    aiortc falls back to a public STUN server on None."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

    servers = [RTCIceServer(list(s.urls), s.username, s.credential) for s in ice_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


async def answer_offer(pc: Any, offer_sdp: str, track: Any) -> str:
    """Apply the offer, send ``track`` on its video section and return the answer's SDP; raises (aiortc's
    errors, or ValueError for an offer without video) when the offer cannot be answered."""
    from aiortc import RTCSessionDescription

    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    if not any(t.kind == "video" for t in pc.getTransceivers()):
        raise ValueError("no video media section")
    pc.addTrack(track)
    await pc.setLocalDescription(await pc.createAnswer())
    return pc.localDescription.sdp


async def close_quietly(pc: Any) -> None:
    """Close a peer connection that may be half-built (a refused offer) without ever raising.

    aiortc's ``close`` can fail part-way on a connection whose remote description was rejected mid-way;
    the transports it did create are then stopped one by one (server.compat) so no UDP socket is left
    open.
    """
    pc.remove_all_listeners()  # its "closed" state must not end the session it failed to join
    try:
        await asyncio.wait_for(pc.close(), 5)
        return
    except Exception as err:
        log.debug("closing a half-built peer connection: %s: %s", type(err).__name__, err)
    await stop_transports(pc)
