"""``dagan export onnx|trt``: the ONNX graphs with their manifest, and TensorRT engines built from them."""

from __future__ import annotations

import argparse


def _cmd_onnx(args: argparse.Namespace) -> int:
    from dagan.checkpoint import CheckpointError

    from .onnx_export import check_parity, export_onnx

    try:
        manifest = export_onnx(args.checkpoint, args.out, progress=not args.quiet, opset=args.opset)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}") from exc
    for entry in manifest["graphs"].values():
        ins = ", ".join(f"{i['name']}{i['shape'][1:]}" for i in entry["inputs"])
        print(f"{args.out}/{entry['file']}: {entry['nodes']} nodes; inputs {ins}")
    if args.check:
        from dagan.checkpoint import load_model

        errors = check_parity(load_model(args.checkpoint), args.out)
        print(
            "onnxruntime vs PyTorch, max abs error: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        )
    print(f"wrote {args.out}/manifest.json")
    return 0


def _cmd_trt(args: argparse.Namespace) -> int:
    from .trt_build import build_engines, check_batch

    check_batch(args.max_batch, args.opt_batch)  # bad numbers fail before TensorRT is even imported
    result = build_engines(
        args.onnx, args.out, fp16=args.fp16, max_batch=args.max_batch, opt_batch=args.opt_batch,
        progress=not args.quiet,
    )  # fmt: skip
    for entry in result["engines"].values():
        print(f"{args.out}/{entry['file']}: built in {entry['build_s']} s")
    print(
        f"engines for {result['gpu']} (TensorRT {result['tensorrt']}, "
        f"{'fp16' if result['fp16'] else 'fp32'}, batch 1..{result['max_batch']})"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export to ONNX or build TensorRT engines")
    sub = p.add_subparsers(dest="export_command", required=True)

    o = sub.add_parser("onnx", help="depth, keypoint, source-encoder, generator and per-frame graphs")
    o.add_argument("--checkpoint", required=True, help="model weights (.safetensors)")
    o.add_argument("--out", required=True, help="output directory (graphs + manifest.json)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch after export")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.set_defaults(func=_cmd_onnx)

    t = sub.add_parser("trt", help="build a TensorRT engine per graph (needs TensorRT and a GPU)")
    t.add_argument("--onnx", required=True, help="directory written by `dagan export onnx`")
    t.add_argument("--out", required=True, help="output directory (engines + engines.json + timing cache)")
    t.add_argument("--fp16", action="store_true", help="allow FP16 kernels (recommended)")
    t.add_argument("--max-batch", type=int, default=32, help="largest batch the engines accept")
    t.add_argument("--opt-batch", type=int, help="batch size to tune for (default: min(max, 8))")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_trt)
