"""``dagan eval``, ``dagan eval-cross`` and ``dagan fetch-eval-assets`` (registered through
``COMMAND_MODULES`` in commands/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalDataError, evaluate, markdown_table, write_report

    if args.relative and args.mode not in (None, "relative"):
        raise EvalDataError("--relative is short for --mode relative; give one of them")
    result = evaluate(
        args.checkpoint,
        args.data,
        assets=args.assets,
        use_identity=not args.no_identity,
        max_videos=args.max_videos,
        max_frames=args.max_frames,
        frame_stride=args.frame_stride,
        batch_size=args.batch_size,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        mode="relative" if args.relative else (args.mode or "both"),
        threads=args.threads,
        progress=not args.quiet,
    )
    out_dir = Path(args.out_dir)
    json_path = Path(args.json) if args.json else out_dir / "eval.json"
    md_path = Path(args.markdown) if args.markdown else out_dir / "eval.md"
    write_report(result, json_path, md_path)
    print(markdown_table(result), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def _cmd_eval_cross(args: argparse.Namespace) -> int:
    from dagan.face import DEFAULT_DETECT_EVERY
    from dagan.smoothing import DEFAULT_PARAMS

    from .cross import evaluate_cross
    from .cross_report import markdown_report, write_outputs

    result, run = evaluate_cross(
        args.photos,
        args.clips,
        args.checkpoint,
        baseline_checkpoints=args.baseline_checkpoint or (),
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        frame_stride=args.frame_stride,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        smoothing=None if args.no_smooth else DEFAULT_PARAMS,
        detect_every=DEFAULT_DETECT_EVERY if args.detect_every is None else args.detect_every,
        assets=args.assets,
        use_identity=not args.no_identity,
        progress=not args.quiet,
        self_reenact=args.self_reenact,
    )
    written = write_outputs(result, run, args.out)
    sheets = [p.name for k, p in written.items() if k.startswith("sheet-")]
    print(markdown_report(result, sheets), end="")
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


def _cmd_eval_depth(args: argparse.Namespace) -> int:
    import json

    if args.mesh:
        from .depth_mesh import evaluate_depth_mesh, markdown_mesh

        nets: dict[str, str | None] = {Path(c).name: c for c in [args.checkpoint, *(args.compare or [])]}
        nets["centre distance (baseline)"] = None
        result = evaluate_depth_mesh(nets, args.data, frame_stride=args.frame_stride)
        print(markdown_mesh(result), end="")
    else:
        from .depth_gt import evaluate_depth, markdown

        result = evaluate_depth(args.checkpoint, args.data, frame_stride=args.frame_stride)
        print(markdown(result), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .assets import default_assets_dir, fetch_eval_assets

    out = Path(args.dir) if args.dir else default_assets_dir()
    written = fetch_eval_assets(out)
    print(f"wrote {len(written)} files of @vladmandic/face-api 1.7.15 (MIT) to {out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="self-reenactment metrics (L1, PSNR, SSIM, AKD, PRMSE, AED, CSIM, ...) with baselines"
    )
    p.add_argument(
        "--checkpoint",
        help="model weights (.safetensors; an export/engine directory for onnxruntime/tensorrt); "
        "default: $DAGAN_CHECKPOINT, then the bundled weights",
    )
    p.add_argument(
        "--data", required=True, help="test folder: one sub-folder of frames or one video per clip"
    )
    p.add_argument("--out-dir", default="eval-output", help="where eval.json and eval.md are written")
    p.add_argument("--json", help="JSON report path (default OUT_DIR/eval.json)")
    p.add_argument("--markdown", help="markdown table path (default OUT_DIR/eval.md)")
    p.add_argument(
        "--assets",
        help="face-api weights folder (default $DAGAN_EVAL_ASSETS, else ~/.cache/dagan/eval-assets)",
    )
    p.add_argument("--no-identity", action="store_true", help="skip AED, CSIM and expression agreement")
    p.add_argument("--max-videos", type=int, help="evaluate only the first N videos")
    p.add_argument("--max-frames", type=int, help="use at most N frames per video (after --frame-stride)")
    p.add_argument("--frame-stride", type=int, default=1, help="use every K-th frame")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime", "tensorrt", "served"),
        help="inference engine to measure; 'served': the engine `dagan serve` would pick here (on a CPU "
        "the fastest that holds quality, e.g. onnxruntime int8); default torch",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "bf16", "int8"),
        help="engine precision: fp16 GPU only; bf16 torch on a CPU with AVX-512 BF16; int8 onnxruntime "
        "on an export made by `dagan export quantize`",
    )
    p.add_argument(
        "--mode",
        choices=("absolute", "relative", "both"),
        help="motion transfer: absolute keypoints (the paper's protocol), relative to the source frame "
        "(the server's default), or both as two rows of one report (default)",
    )
    p.add_argument("--relative", action="store_true", help="short for --mode relative")
    p.add_argument("--threads", type=int, help="torch (and onnxruntime) CPU threads; default one per core")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser(
        "eval-cross",
        help="cross-identity reenactment: every photo × every driving clip, motion gains, identity, jitter",
    )
    p.add_argument("--photos", help="folder of source photos (jpg/png/...); or --self")
    p.add_argument(
        "--self",
        dest="self_reenact",
        action="store_true",
        help="self-reenactment instead: each clip drives its own first frame, the same measures (what the "
        "generator makes of a motion, apart from carrying it to another face)",
    )
    p.add_argument(
        "--clips",
        required=True,
        help="folder of driving clips: video files (.mp4, .mpg, ...) or frame folders",
    )
    p.add_argument(
        "--checkpoint",
        help="the model measured (row `dagan`): .safetensors, or an export/engine directory for "
        "onnxruntime/tensorrt; default: $DAGAN_CHECKPOINT, then the bundled weights",
    )
    p.add_argument(
        "--baseline-checkpoint",
        action="append",
        metavar="CKPT",
        help="another model through the same engine path, one row named after its file (repeatable); "
        "the `photo_copy` baseline (output = the photo) is always there",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "onnxruntime", "tensorrt", "served"),
        help="'served': the engine `dagan serve` would pick here (on a CPU the fastest that holds quality)",
    )
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16", "int8"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch (and onnxruntime) CPU threads; default one per core")
    p.add_argument("--frame-stride", type=int, default=1, help="animate and score every K-th frame")
    p.add_argument("--max-frames", type=int, help="at most N scored frames per clip (after --frame-stride)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--no-smooth",
        action="store_true",
        help="no One-Euro filter on the crop box and the keypoints (the server filters both by default)",
    )
    p.add_argument(
        "--detect-every",
        type=int,
        metavar="K",
        help="face detection on every K-th driving frame, tracking between (default: the server's, 3)",
    )
    p.add_argument("--out", default="eval-cross-output", help="folder for cross.md/json, pairs.csv, sheets")
    p.add_argument(
        "--assets",
        help="face-api weights folder (default $DAGAN_EVAL_ASSETS, else ~/.cache/dagan/eval-assets)",
    )
    p.add_argument(
        "--no-identity", action="store_true", help="skip face-api (identity distance, CSIM, expression)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval_cross)

    p = subparsers.add_parser(
        "eval-depth",
        help="predicted depth vs ground truth on `dagan synth` clips, or (--mesh) vs mediapipe's face-mesh "
        "z on real frames (scale-free)",
    )
    p.add_argument("--checkpoint", required=True, help="a depth-stage or full checkpoint")
    p.add_argument(
        "--data",
        required=True,
        help="folder of synth clips, or with --mesh of real frame folders (ROOT/test)",
    )
    p.add_argument(
        "--mesh",
        action="store_true",
        help="real frames: Spearman ρ between depth and mediapipe's mesh z at the 478 landmarks, with a "
        "centre-distance baseline",
    )
    p.add_argument("--compare", action="append", metavar="CKPT", help="with --mesh: more checkpoints")
    p.add_argument("--frame-stride", type=int, default=4)
    p.add_argument("--json", help="also write the result as JSON")
    p.set_defaults(func=_cmd_eval_depth)

    p = subparsers.add_parser(
        "fetch-eval-assets", help="data preparation: fetch face-api's identity/expression weights with npm"
    )
    p.add_argument("dir", nargs="?", help="target folder (default ~/.cache/dagan/eval-assets)")
    p.set_defaults(func=_cmd_fetch)
