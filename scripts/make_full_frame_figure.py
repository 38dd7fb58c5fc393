"""README figure docs/img/full-frame.png: the full-picture output of the bundled weights on a held-out
photo driven by a held-out clip (issue 19), four moments of the clip, each 1280×720 frame shown at half
size with the driving frame as a small inset.

    nice -n 15 python scripts/make_full_frame_figure.py --photo s42 --clip d3 --out docs/img/full-frame.png

It runs exactly what ``dagan animate --output-size 1280x720`` runs (relative motion, the One-Euro
filters, the default mask); ``--frames`` are the moments shown (the reference frame first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data/real-faces")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default="s42")
    ap.add_argument("--clip", default="d3")
    ap.add_argument("--frames", nargs="+", type=int, default=[0, 75, 160, 250])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "full-frame.png")
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "dagan-default.safetensors"))
    args = ap.parse_args()

    import torch

    from dagan.face import DrivingCropper, locate_source
    from dagan.media import VideoReader, load_image
    from dagan.paste import DEFAULT_MASK, plan_paste
    from dagan.smoothing import DEFAULT_PARAMS, OneEuroFilter
    from engine import create_engine
    from engine.paste import Paster

    torch.set_num_threads(1)
    engine = create_engine(args.checkpoint, backend="torch", device="cpu")
    photo = load_image(DATA / "photos" / f"{args.photo}.jpg")
    face = locate_source(photo)
    crop = face.crop_box.crop(photo, engine.image_size)
    paster = Paster(plan_paste(photo, face, crop, (1280, 720), DEFAULT_MASK))
    session = engine.set_source(crop, relative=True)
    wanted = set(args.frames)
    tiles = {}
    with VideoReader(DATA / "clips" / f"{args.clip}.mp4") as reader:
        session.kp_filter = OneEuroFilter(DEFAULT_PARAMS, rate=reader.fps)
        cropper = DrivingCropper(engine.image_size, box_filter=DEFAULT_PARAMS)
        for i, frame in enumerate(reader):
            if i > max(wanted):
                break
            t = i / reader.fps
            session.frame_time = t
            picture = paster(engine.animate(cropper(frame, t)).image)
            if i in wanted:
                tile = cv2.resize(picture, (640, 360), interpolation=cv2.INTER_AREA)
                h = 110
                inset = cv2.resize(frame, (round(frame.shape[1] * h / frame.shape[0]), h), cv2.INTER_AREA)
                tile[360 - h - 6 : 360 - 6, 6 : 6 + inset.shape[1]] = inset
                cv2.rectangle(tile, (5, 360 - h - 7), (6 + inset.shape[1], 360 - 6), (255, 255, 255), 1)
                tiles[i] = tile
        cropper.close()
    row = [tiles[i] for i in sorted(tiles)]
    grid = np.concatenate([np.concatenate(row[:2], axis=1), np.concatenate(row[2:4], axis=1)], axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({grid.shape[1]}×{grid.shape[0]}): frames {sorted(tiles)} of {args.clip}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
