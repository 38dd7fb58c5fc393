"""``dagan`` command line: one entry point, one sub-command per job.

The dispatcher sits on top of the layering (README.md, tests/test_layers.py): it is the one module that
imports other applications, and only their ``cli`` module (``add_commands``; ``bench.model`` for
``dagan bench``); the commands of this package (``animate``, ``demo``, ``init-checkpoint``, ``import``,
``synth``, ``export``) use the library layers ``dagan``, ``export`` and ``engine``. No module of any
other package imports this one.

Errors a user can fix (missing file, no face, wrong checkpoint, bad config) are printed as one line and
exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType

from dagan.checkpoint import CheckpointError
from dagan.config import PRESETS
from dagan.errors import UserError
from dagan.picture_options import add_picture_arguments, picture_options


# Sub-commands that live in other modules: each loader imports (statically, so tools and readers see
# the dependency) a module with ``add_commands(subparsers)``. A loader whose optional extra is missing
# raises ImportError, and every other command keeps working.
def _vcam() -> ModuleType:
    from vcam import cli

    return cli


def _importer() -> ModuleType:
    from . import import_cli

    return import_cli


def _evaluation() -> ModuleType:
    from evaluation import cli

    return cli


def _synth() -> ModuleType:
    from . import synth_cli

    return synth_cli


def _training() -> ModuleType:
    from training import cli

    return cli


def _export() -> ModuleType:
    from . import export_cli

    return export_cli


def _server() -> ModuleType:
    from server import cli

    return cli


def _bench() -> ModuleType:
    from bench import model

    return model


COMMAND_MODULES: tuple[Callable[[], ModuleType], ...] = (
    _vcam,
    _importer,
    _evaluation,
    _synth,
    _training,
    _export,
    _server,
    _bench,
)


def _cmd_animate(args: argparse.Namespace) -> int:
    from .animate import animate_video

    report = animate_video(
        args.source,
        args.driving,
        args.out,
        checkpoint=args.checkpoint,
        relative=not args.absolute,
        adapt_scale=not args.no_adapt_scale,
        show_depth=args.show_depth,
        device=args.device,
        crop=not args.no_crop,
        max_frames=args.max_frames,
        progress=not args.quiet,
        threads=args.threads,
        backend=args.backend,
        precision=args.precision,
        **picture_options(args),
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

    from dagan.checkpoint import resolve_checkpoint
    from dagan.media import write_video
    from dagan.samples import astronaut, driving_frames, grace_hopper

    from .animate import animate_video

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
        print("no weights found: the demo runs on UNTRAINED tiny weights to show the pipeline")
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

    from dagan.checkpoint import save_checkpoint
    from dagan.config import load_config
    from dagan.model import DaGAN

    cfg = load_config(args.config)
    torch.manual_seed(args.seed)
    save_checkpoint(args.out, cfg, DaGAN(cfg), extra_metadata={"trained": "false"})
    print(f"wrote {args.out}: UNTRAINED {cfg.name} weights (seed {args.seed}), for pipeline tests only")
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
    motion = p.add_mutually_exclusive_group()
    motion.add_argument(
        "--relative",
        action="store_true",
        help="move the photo by the driver's motion since the first frame (the default, as in cam/serve)",
    )
    motion.add_argument(
        "--absolute", action="store_true", help="copy the driver's keypoints instead (face shape too)"
    )
    p.add_argument(
        "--no-adapt-scale",
        action="store_true",
        help="relative motion without movement-scale adaptation (the authors' --relative alone)",
    )
    p.add_argument("--show-depth", action="store_true", help="append source and driving depth maps")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--backend", default="auto", help="auto, torch, onnxruntime or tensorrt")
    p.add_argument(
        "--precision",
        help="fp32, int8 (onnxruntime), bf16 (torch) or fp16 (CUDA); default: on a CPU the fastest that "
        "holds quality, prepared on first use (docs/export.md)",
    )
    p.add_argument(
        "--no-crop", action="store_true", help="inputs are already face crops: skip face detection"
    )
    p.add_argument("--max-frames", type=int, help="stop after this many driving frames")
    p.add_argument(
        "--threads",
        type=int,
        help="inference CPU threads (default: one per core; 1 is faster on a busy machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_picture_arguments(p)
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

    unavailable = []
    for load in COMMAND_MODULES:
        try:
            module = load()
        except ImportError as exc:  # an optional extra is not installed: keep every other command working
            name = load.__name__.strip("_")
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
