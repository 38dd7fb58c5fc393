"""``dagan prepare``, ``landmarks``, ``pack-data``, ``kp-follow`` and ``train depth|dagan|lids`` (loaded by
the dispatcher, :mod:`commands.cli`).

Multi-GPU: ``torchrun --nproc_per_node N -m commands.cli train dagan ...`` (multi-node: add torchrun's
``--nnodes/--node_rank/--rdzv_endpoint``); the trainer reads torchrun's environment.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from dagan.config import PRESETS


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare_dataset

    report = prepare_dataset(
        args.raw_dir,
        args.out_root,
        size=args.size,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        split=args.split,
        cut_threshold=args.cut_threshold,
        progress=not args.quiet,
    )
    print(
        f"{report.videos} videos: {report.processed} processed, {report.already_done} already done, "
        f"{len(report.broken)} broken (skipped); wrote {report.clips} clips, {report.frames} frames "
        f"into {args.out_root}"
    )
    return 0


def _cmd_landmarks(args: argparse.Namespace) -> int:
    from .landmarks import annotate_dataset, clip_folders

    if not clip_folders(args.root):
        print(f"dagan: error: {args.root} has no clip folders (expected ROOT/train/<clip>/)", file=sys.stderr)
        return 2
    written, frames, missing = annotate_dataset(args.root, progress=not args.quiet)
    print(
        f"landmark tracks for {written} clips ({frames} frames, {missing} without a face) under {args.root}"
    )
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from .pack import pack_dataset, print_report

    report = pack_dataset(
        args.data_root,
        args.out_dir,
        stride=args.frame_stride,
        quality=args.quality,
        max_mb=args.max_mb,
        points=args.points,
        assets=args.assets,
        progress=not args.quiet,
    )
    print_report(report)
    return 0


def _cmd_kp_follow(args: argparse.Namespace) -> int:
    import json

    from .config import TrainConfig, load_train_config
    from .kp_follow import keypoint_follow, markdown, model_scorers

    stage = (load_train_config(args.config) if args.config else TrainConfig()).dagan
    points = args.points or list(stage.kp_landmark_points)
    results = {}
    for checkpoint in [args.checkpoint, *(args.compare or [])]:
        keypoints, warp, size = model_scorers(checkpoint)
        result = keypoint_follow(
            keypoints,
            args.data,
            points,
            size,
            frame_stride=args.frame_stride,
            max_frames=args.max_frames,
            warp=warp,
        )
        print(f"## {checkpoint}\n\n{markdown(result)}")
        results[str(checkpoint)] = result
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"points": points, "checkpoints": results}, indent=2))
    return 0


def _cmd_train_lids(args: argparse.Namespace) -> int:
    from dagan.checkpoint import CheckpointError
    from dagan.config import ConfigError

    from .lid_reader import LidDataError, train_lids

    try:
        result = train_lids(
            args.init, args.data, args.out, tuple(args.keypoints), args.test, args.steps, not args.quiet
        )
    except (LidDataError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"dagan: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    if result:
        print(
            f"held-out clips: the reading follows the mesh's eye opening at median r {result['clip_r']:.2f}, "
            f"gain {result['clip_gain']:.2f} ({result['eyes_scored']} eyes that move); "
            f"mean absolute error {result['mae']:.3f}"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_train_config, parse_override
    from .trainer import Trainer, cleanup_distributed

    overrides = dict(parse_override(s) for s in args.set or [])
    stage = args.stage
    if args.model:
        overrides["model"] = args.model
    if args.steps is not None:
        overrides[f"{stage}.steps"] = args.steps
    if args.batch_size is not None:
        overrides[f"{stage}.batch_size"] = args.batch_size
    if args.precision:
        overrides["precision"] = args.precision
    if args.device:
        overrides["device"] = args.device
    model = overrides.pop("model", None)
    run_dir = args.run_dir or str(Path("runs") / f"{stage}-{datetime.now():%Y%m%d-%H%M%S}")
    if args.resume and not args.run_dir:
        print("dagan: error: --resume needs --run-dir (the run folder to continue)", file=sys.stderr)
        return 2
    cfg = None
    if not args.resume:
        from .config import train_config_from_dict

        base = load_train_config(args.config)
        data = base.to_dict()
        if model is not None:
            data["model"] = model
        cfg = train_config_from_dict(data)
        if overrides:
            cfg = cfg.replace(**overrides)
        overrides = {}
    try:
        trainer = Trainer(
            stage,
            cfg,
            run_dir,
            data_root=args.data,
            depth_checkpoint=getattr(args, "depth", None),
            init_checkpoint=args.init,
            resume=args.resume,
            progress=not args.quiet,
            overrides=overrides or None,
        )
        time_limit = args.time_limit * 60.0 if args.time_limit is not None else None
        result = trainer.run(time_limit_s=time_limit)
    finally:
        cleanup_distributed()
    if result.time_limited:
        print(
            f"time limit of {args.time_limit:g} min reached at step {result.step} of {result.total_steps}: "
            f"checkpoint and weights written; continue with --resume --run-dir {result.run_dir}"
        )
    if result.weights is not None:
        print(f"wrote {result.weights} after {result.step} steps (run folder {result.run_dir})")
    return 0


def _minutes(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0 minutes")
    return value


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="face-crop raw talking-head videos into a training dataset")
    p.add_argument("raw_dir", metavar="RAW_VIDEOS_DIR", help="folder of videos (train/ and test/ kept)")
    p.add_argument("out_root", metavar="OUT_ROOT", help="dataset root to write (OUT_ROOT/<split>/<clip>/)")
    p.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--min-frames", type=int, default=32, help="drop clips shorter than this")
    p.add_argument("--max-frames", type=int, default=1024, help="split longer clips")
    p.add_argument(
        "--split", default="train", choices=("train", "test"), help="split for videos outside train/ test/"
    )
    p.add_argument(
        "--cut-threshold", type=float, default=0.5, help="histogram distance that marks a shot cut"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = subparsers.add_parser(
        "landmarks",
        help="face-mesh landmark tracks beside prepared or synthetic clips (the kp_landmarks prior)",
    )
    p.add_argument("root", metavar="DATA_ROOT", help="dataset root with train/<clip>/ (and test/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_landmarks)

    p = subparsers.add_parser(
        "pack-data",
        help="compact copy of a dataset's train split (JPEG frames, packed tracks, face-api weights) "
        "for a lent GPU",
        description="Copy DATA_ROOT/train as JPEG frames (every N-th; N raised until the copy fits "
        "--max-mb) with each clip's face-mesh tracks cut to the kept frames and points "
        "(landmarks478.npz), plus face-api's landmark-68 weights; see docs/training.md.",
    )
    p.add_argument("data_root", metavar="DATA_ROOT", help="prepared dataset (DATA_ROOT/train/<clip>/)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (e.g. gpu_data)")
    p.add_argument("--frame-stride", type=int, default=1, help="keep every N-th frame (default 1)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--max-mb", type=float, default=36.0, help="size cap of the copy in MiB (default 36)")
    p.add_argument(
        "--points",
        type=int,
        nargs="+",
        metavar="P",
        help="face-mesh points whose tracks are kept (default: dagan.kp_landmark_points, "
        "training.config.EXPRESSION_MESH_POINTS, which dagan.flow_points may read, and "
        "dagan.head_pose.POSE_POINTS, which dagan.reshape_nod reads)",
    )
    p.add_argument(
        "--assets",
        help="folder with face_landmark_68_model* (default $DAGAN_EVAL_ASSETS or ~/.cache/dagan/eval-assets)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)

    p = subparsers.add_parser(
        "kp-follow",
        help="do the keypoints follow their face-mesh anchors? lip and lid gaps, motion (needs tracks)",
        description="Score a checkpoint's keypoints against the face-mesh points the landmark prior "
        "anchors them to, on prepared clips with `dagan landmarks` tracks: the inner-lip and eyelid gaps "
        "(mouth opening, blinks) and each keypoint's motion, r and gain per clip; then whether the "
        "generator's warp opens those gaps and which keypoints carry them. Says whether a mouth the "
        "avatar does not open is lost in the keypoints or in the generator (docs/evaluation.md).",
    )
    p.add_argument("--checkpoint", required=True, help="model weights (.safetensors)")
    p.add_argument("--compare", action="append", metavar="CKPT", help="more checkpoints, same clips")
    p.add_argument("--data", required=True, help="prepared clips with tracks: DATA_ROOT or DATA_ROOT/test")
    p.add_argument(
        "--config",
        help="training config YAML whose dagan.kp_landmark_points name the anchors (default: built-in)",
    )
    p.add_argument("--points", type=int, nargs="+", metavar="P", help="the anchors' mesh indices instead")
    p.add_argument("--frame-stride", type=int, default=2, help="use every K-th frame (default 2)")
    p.add_argument("--max-frames", type=int, default=120, help="at most N frames per clip (default 120)")
    p.add_argument("--json", help="also write the result as JSON")
    p.set_defaults(func=_cmd_kp_follow)

    train = subparsers.add_parser("train", help="train the face depth net, then DaGAN")
    stages = train.add_subparsers(dest="stage", required=True)
    for stage, help_text in (
        ("depth", "stage 1: self-supervised face depth (depth + pose/intrinsics nets)"),
        ("dagan", "stage 2: keypoints + generator + discriminator, depth net frozen"),
    ):
        s = stages.add_parser(stage, help=help_text)
        s.add_argument("--data", help="dataset root with train/<video> (default: data.root of the config)")
        s.add_argument("--config", help="training config YAML (see docs/training.md); default: built-in")
        s.add_argument(
            "--model", help=f"model preset ({', '.join(PRESETS)}) or model YAML; overrides the config"
        )
        s.add_argument("--run-dir", help="run folder (default runs/<stage>-<time>)")
        s.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
        s.add_argument("--steps", type=int, help=f"total steps (overrides {stage}.steps)")
        s.add_argument("--batch-size", type=int, help="per-process batch size")
        s.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
        s.add_argument("--device", help="auto, cpu or cuda")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.add_argument(
            "--init",
            metavar="CKPT",
            help="start from these weights (fine-tuning; optimizers start fresh), e.g. the bundled file",
        )
        s.add_argument(
            "--time-limit",
            type=_minutes,
            metavar="MINUTES",
            help="stop cleanly after this much wall time (checkpoint + weights written; --resume continues)",
        )
        if stage == "dagan":
            s.add_argument("--depth", help="checkpoint from `dagan train depth` (F_d is loaded and frozen)")
        s.set_defaults(func=_cmd_train)
    s = stages.add_parser(
        "lids",
        help="the lid reader that makes the avatar blink (a few CPU-minutes, after stage 2)",
        description="Train the small net that reads how open the driver's eyes are (dagan.nets.lid_reader) "
        "on prepared clips with face-mesh tracks, and write the --init weights with it and blink.keypoints "
        "in the config (docs/training.md, 'Blinks').",
    )
    s.add_argument("--init", required=True, metavar="CKPT", help="the trained model (stage 2) to add it to")
    s.add_argument("--data", required=True, help="prepared clips with landmarks478.npy, e.g. DATA_ROOT/train")
    s.add_argument("--test", help="held-out clips to score it on, e.g. DATA_ROOT/test")
    s.add_argument("--out", required=True, help="the new checkpoint (.safetensors)")
    s.add_argument(
        "--keypoints",
        type=int,
        nargs=4,
        default=[0, 1, 2, 3],
        metavar="K",
        help="upper and lower lid keypoint of the image-left eye, then the image-right (default 0 1 2 3: "
        "the landmark prior's anchors at mesh points 159, 145, 386, 374)",
    )
    s.add_argument("--steps", type=int, default=3000, help="training steps at batch 256 (default 3000)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_train_lids)
