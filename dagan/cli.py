"""``dagan`` command line: one entry point, one sub-command per job.

Errors a user can fix (missing file, no face, wrong checkpoint, bad config) are printed as one line and
exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .checkpoint import CheckpointError
from .config import PRESETS
from .errors import UserError

# Sub-commands that live in other packages (training, export, server, ...): each module named here has
# ``add_commands(subparsers)``; this keeps one ``dagan`` entry point without this file knowing them all.
COMMAND_MODULES: tuple[str, ...] = (
    "vcam.cli",
    "dagan.import_cli",
    "evaluation.cli",
    "dagan.synth.cli",
    "training.cli",
    "export.cli",
    "server.cli",
)


def _cmd_animate(args: argparse.Namespace) -> int:
    from .animate import animate_video

    report = animate_video(
        args.source,
        args.driving,
        args.out,
        checkpoint=args.checkpoint,
        relative=args.relative,
        show_depth=args.show_depth,
        device=args.device,
        crop=not args.no_crop,
        max_frames=args.max_frames,
        progress=not args.quiet,
    )
    lost = (
        f", no face found in {report.lost_face_frames} (kept the last crop)"
        if report.lost_face_frames
        else ""
    )
    print(f"wrote {report.out} ({report.frames} frames at {report.fps:g} fps{lost})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The README's first command: a real photo, a generated driving video, the offline pipeline."""
    from pathlib import Path

    import cv2

    from .animate import animate_video, resolve_checkpoint
    from .media import write_video
    from .samples import astronaut, driving_frames, grace_hopper

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "source.png"
    cv2.imwrite(str(source), cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    driving = out_dir / "driving.mp4"
    write_video(driving, driving_frames(grace_hopper(), num_frames=args.frames), fps=25)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except CheckpointError:
        checkpoint = out_dir / "untrained-tiny.safetensors"
        print("no trained weights ship yet: the demo runs on UNTRAINED tiny weights to show the pipeline")
        _cmd_init_checkpoint(argparse.Namespace(config="tiny", out=str(checkpoint), seed=0))
    result = out_dir / "result.mp4"
    report = animate_video(
        source,
        driving,
        result,
        checkpoint=str(checkpoint),
        relative=True,
        show_depth=True,
        device=args.device,
    )
    print(
        f"wrote {result}: source | driving | avatar | source depth | driving depth ({report.frames} frames)"
    )
    return 0


def _cmd_init_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_checkpoint
    from .config import load_config
    from .model import DaGAN

    cfg = load_config(args.config)
    torch.manual_seed(args.seed)
    save_checkpoint(args.out, cfg, DaGAN(cfg), extra_metadata={"trained": "false"})
    print(f"wrote {args.out}: UNTRAINED {cfg.name} weights (seed {args.seed}), for pipeline tests only")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import run_bench

    presets = args.preset if args.preset is not None else ([] if args.checkpoint else list(PRESETS))
    run_bench(presets, args.checkpoint, args.frames, args.warmup, args.device, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dagan", description="DaGAN talking-head avatars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("animate", help="animate a photo with a driving video into an mp4")
    p.add_argument("--source", required=True, help="photo of the face to animate")
    p.add_argument("--driving", required=True, help="driving video (mp4/avi/...) or a folder of frames")
    p.add_argument("--out", required=True, help="output .mp4 (source | driving | result [| depths])")
    p.add_argument(
        "--checkpoint",
        help="model weights (.safetensors); default: $DAGAN_CHECKPOINT, then the bundled weights",
    )
    p.add_argument("--relative", action="store_true", help="transfer motion relative to the first frame")
    p.add_argument("--show-depth", action="store_true", help="append source and driving depth maps")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--no-crop", action="store_true", help="inputs are already face crops: skip face detection"
    )
    p.add_argument("--max-frames", type=int, help="stop after this many driving frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_animate)

    p = sub.add_parser("demo", help="animate a sample portrait with a generated driving video (offline)")
    p.add_argument("--out-dir", default="demo-output", help="where source, driving and result are written")
    p.add_argument(
        "--checkpoint",
        help="model weights; default: $DAGAN_CHECKPOINT, then the bundled weights, else untrained tiny",
    )
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("init-checkpoint", help="write randomly initialised (untrained) weights for a config")
    p.add_argument("--config", default="tiny", help=f"preset ({', '.join(PRESETS)}) or YAML file")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_init_checkpoint)

    p = sub.add_parser("bench", help="per-frame latency: cached engine path vs uncached forward")
    p.add_argument("--checkpoint", help="time this checkpoint's model")
    p.add_argument("--preset", action="append", choices=PRESETS, help="time a preset (repeatable)")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_bench)

    unavailable = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional extra is not installed: keep every other command working
            unavailable.append(f"{name} ({exc}; install the project's extras, see README)")
            continue
        module.add_commands(sub)
    if unavailable:
        parser.epilog = "commands not available here: " + "; ".join(unavailable)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"dagan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dagan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
