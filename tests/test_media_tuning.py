"""The avatar video's encoder settings (server.tracks.tune_encoders): aiortc's VP8 and H.264 encoders
open their codecs with the cheaper measured options and still produce decodable video."""

from __future__ import annotations

import fractions

import numpy as np


def _frames(n: int = 4, size: int = 64):
    from server.pipeline import rgb_to_video_frame

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        vf = rgb_to_video_frame(np.roll(base, 2 * i, axis=1))
        vf.pts, vf.time_base = i * 3600, fractions.Fraction(1, 90_000)
        out.append(vf)
    return out


def test_encoders_open_with_the_tuned_options_and_stay_decodable():
    import av
    from aiortc.codecs import H264Encoder, Vp8Encoder, h264, vpx

    from server.tracks import ENCODER_OPTIONS, tune_encoders

    tune_encoders()
    tune_encoders()  # idempotent
    assert vpx.av.VideoFrame is av.VideoFrame and h264.av.CodecContext is not av.CodecContext
    for encoder, name in ((Vp8Encoder(), "libvpx"), (H264Encoder(), "libx264")):
        sizes = [sum(len(p) for p in encoder.encode(f)[0]) for f in _frames()]
        assert sizes[0] > 0
        options = encoder.codec.requested_options
        for key, value in ENCODER_OPTIONS[name].items():
            assert options[key] == value
        assert "deadline" in options or "tune" in options  # aiortc's own options are kept
    # decoders are untouched
    assert type(vpx.av.CodecContext.create("libvpx", "r")) is type(av.CodecContext.create("libvpx", "r"))
