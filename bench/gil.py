"""``python -m bench.gil``: which libraries of the server's media pipeline release the GIL.

For each one (OpenCV's conversion and crop, libvpx decoding through PyAV, mediapipe's face detection,
and pure Python as the reference that holds it): the throughput of 2 threads ÷ 1 thread on the same work.
~2 means the call releases the GIL (on a machine with 2 free cores); ~1 means it serialises. This is
what decides which stages of server/pipeline.py run on its thread pool and which need processes. On a
shared machine the absolute times are noisy; the ratio is what matters, and the report gives the load.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from .media import vp8_packets
from .report import load_average, machine_description, timestamp, write_report


def thread_ratio(make: Callable[[], Callable[[], Any]], seconds: float) -> float:
    """Calls per second of two threads, each running its own ``make()``, over one thread's."""
    fns = [make(), make()]
    for fn in fns:
        fn()
    n = [0, 0]

    def loop(k: int, deadline: float) -> None:
        while time.perf_counter() < deadline:
            fns[k]()
            n[k] += 1

    loop(0, time.perf_counter() + seconds)
    single = n[0] / seconds
    n[:] = [0, 0]
    deadline = time.perf_counter() + seconds
    threads = [threading.Thread(target=loop, args=(k, deadline)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(n) / seconds / single, 2)


def measure_gil(seconds: float = 1.0) -> dict[str, float]:
    """For each library the pipeline uses: throughput of 2 threads ÷ 1 thread on the same work."""
    import av

    from dagan.face import FaceDetector
    from dagan.samples import astronaut

    rng = np.random.default_rng(0)
    frame = cv2.resize(astronaut(), (640, 480))
    vf = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
    yuv = vf.to_ndarray(format="yuv420p")
    packets = vp8_packets([np.roll(frame, 3 * i, axis=1) for i in range(8)])
    noise = rng.integers(0, 255, (480, 640, 3), np.uint8)

    def vp8_decoder() -> Callable[[], Any]:
        codec = av.CodecContext.create("libvpx", "r")
        return lambda: [codec.decode(p) for p in packets]

    def detector() -> Callable[[], Any]:
        det = FaceDetector()
        return lambda: det.detect(frame)

    def crop() -> None:
        shifted = cv2.warpAffine(noise, np.float64([[1, 0, 5], [0, 1, 3]]), (320, 320))
        cv2.resize(shifted, (64, 64), interpolation=cv2.INTER_AREA)

    return {
        "python (reference: holds the GIL)": thread_ratio(lambda: lambda: sum(range(20000)), seconds),
        "opencv yuv420p->rgb 640x480": thread_ratio(
            lambda: lambda: cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420), seconds
        ),
        "opencv warpAffine crop 320->64": thread_ratio(lambda: crop, seconds),
        "libvpx vp8 decode 640x480 (pyav)": thread_ratio(vp8_decoder, seconds),
        "mediapipe face detection 640x480": thread_ratio(detector, seconds),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs; {report['date']}, load average (1/5/15 min) before "
        f"{report['load_before']}, after {report['load_after']}; {report['seconds']:g} s per measurement.",
        "",
        "| work | 2 threads ÷ 1 thread |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ratio:.2f} |" for name, ratio in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gil", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    p.add_argument(
        "--seconds", type=float, default=1.0, help="length of each 1- and 2-thread run (default %(default)g)"
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine_description(torch.device("cpu")),
        "date": timestamp(),
        "seconds": a.seconds,
        "load_before": load_average(),
    }
    report["ratios"] = measure_gil(a.seconds)
    report["load_after"] = load_average()
    write_report(report, markdown(report), a.json, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
