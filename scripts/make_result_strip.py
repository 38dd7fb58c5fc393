"""README figure docs/img/result-strip.png: the bundled weights on a held-out photo driven by a held-out
clip, as ``dagan animate --show-depth`` renders it (relative motion): source | driving | avatar | source
depth | driving depth, one row per moment, each panel as animate writes it (256 px for the 128-px model).

    nice -n 15 python scripts/make_result_strip.py --photo s42 --clip d3 --out docs/img/result-strip.png

The moments are picked on the driver by the cross-identity contact sheet's own rule
(:func:`evaluation.cross.pick_moments`, mediapipe face mesh on the driving panel): the reference pose,
the widest mouth, the largest head turn and the most closed eyes, in frame order.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "real-faces"


def driver_moments(driving: list[np.ndarray]) -> list[tuple[int, str]]:
    """The contact sheet's moments (:func:`evaluation.cross.pick_moments`) of the driving panels."""
    from evaluation import motion
    from evaluation.cross import measure_landmarks, pick_moments

    tracks = [measure_landmarks(f) for f in driving]
    return pick_moments(motion.signal_track(tracks, driving[0].shape[:2]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default="s42")
    ap.add_argument("--clip", default="d3")
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "dagan-default.safetensors"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "result-strip.png")
    args = ap.parse_args()

    from dagan.media import VideoReader

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "strip.mp4"
        cmd = [
            sys.executable,
            "-m",
            "commands.cli",
            "animate",
            "--source",
            str(DATA / "photos" / f"{args.photo}.jpg"),
            "--driving",
            str(DATA / "clips" / f"{args.clip}.mp4"),
            "--out",
            str(video),
            "--show-depth",
            "--checkpoint",
            args.checkpoint,
            "--backend",
            "torch",
            "--device",
            "cpu",
            "--quiet",
        ]
        subprocess.run(cmd, cwd=ROOT, check=True)
        with VideoReader(video) as reader:
            frames = list(reader)
    panel, width = frames[0].shape[:2]  # square panels side by side
    if width != 5 * panel:
        raise SystemExit(f"expected 5 square panels side by side, got a {width}×{panel} video")
    moments = driver_moments([f[:, panel : 2 * panel] for f in frames])
    rows = [frames[i] for i, _ in moments]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}: frames {', '.join(f'{i} ({label})' for i, label in moments)} of {len(frames)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
