"""``dagan export onnx|trt|optimize|quantize``: the ONNX graphs with their manifest, TensorRT engines built
from them, the frame graph rewritten for the CPU provider, and an int8 copy of the graphs for the CPU."""

from __future__ import annotations

import argparse


def _cmd_onnx(args: argparse.Namespace) -> int:
    from dagan.checkpoint import CheckpointError
    from export.onnx_export import check_parity, export_onnx

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
    from export.trt_build import build_engines, check_batch_profile

    check_batch_profile(args.max_batch, args.opt_batch)  # bad numbers fail before TensorRT is even imported
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


def _cmd_quantize(args: argparse.Namespace) -> int:
    from export.onnx_export import read_manifest
    from export.quantize import GROUPS, face_clips, find_clips, held_out_psnr, quantize_export

    size = int(read_manifest(args.onnx)["image_size"])  # a bad --onnx fails before any video is read
    keep = [g for g in args.keep_float.split(",") if g] if args.keep_float != "none" else []
    paths = find_clips(args.calib_clips)
    clips = face_clips(paths, size, frames_per_clip=args.frames_per_clip, stride=args.stride)
    manifest = quantize_export(
        args.onnx, args.out, clips, keep_float=keep, per_channel=not args.per_tensor,
        method=args.method, quant_format=args.format, progress=not args.quiet,
    )  # fmt: skip
    q = manifest["quantization"]
    print(
        f"wrote {args.out}: int8 frame graph ({q['format']}, {q['weights']}; float: "
        f"{', '.join(q['keep_float']) or 'nothing'} of {', '.join(GROUPS)} + every non-conv op), "
        f"calibrated on {q['calibration']['frames']} frames of {len(clips)} clips in {q['seconds']} s"
    )
    if args.check_clips:
        held = face_clips(find_clips(args.check_clips), size, frames_per_clip=args.frames_per_clip)
        result = held_out_psnr(args.onnx, args.out, held)
        print(
            f"int8 vs fp32 on {result['frames']} frames of {len(held)} held-out clips: output PSNR "
            f"{result['psnr_db']:.2f} dB (min {result['psnr_min_db']:.2f})"
        )
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from export.optimize import PASSES, optimize_export

    passes = [x for x in args.passes.split(",") if x] if args.passes else list(PASSES)
    manifest = optimize_export(args.onnx, args.out, passes, progress=not args.quiet)
    for name, entry in manifest["cpu_graph"]["report"].items():
        diff = entry.get("max_abs_diff")
        note = f", max abs difference {diff:.1e}" if diff is not None else ""
        if "dropped" in entry:
            note += f"; {entry['dropped']}"
        print(f"  {name}: {entry['rewrites']} rewrite(s){note}")
    print(f"wrote {args.out}: the frame graph for the CPU provider, same function and weights")
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
    t.add_argument(
        "--opt-batch",
        type=int,
        help="batch size to tune for (default: the largest power of two ≤ min(max, 8))",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_trt)

    c = sub.add_parser(
        "optimize",
        help="the frame graph rewritten for ONNX Runtime's CPU kernels (same function; docs/export.md)",
    )
    c.add_argument("--onnx", required=True, help="fp32 directory written by `dagan export onnx`")
    c.add_argument("--out", required=True, help="output directory (a complete export)")
    c.add_argument("--passes", help="comma-separated subset of the rewrites (default: all)")
    c.add_argument("--quiet", action="store_true", help="no progress messages")
    c.set_defaults(func=_cmd_optimize)

    q = sub.add_parser(
        "quantize", help="int8 copy of an ONNX export (static, calibrated on real face clips) for the CPU"
    )
    q.add_argument("--onnx", required=True, help="fp32 directory written by `dagan export onnx`")
    q.add_argument(
        "--calib-clips", nargs="+", required=True, help="calibration videos or folders of them (real faces)"
    )
    q.add_argument("--out", required=True, help="output directory (a complete export, precision int8)")
    q.add_argument("--frames-per-clip", type=int, default=4, help="driving frames taken from each clip")
    q.add_argument("--stride", type=int, default=8, help="take every K-th frame of a clip")
    q.add_argument(
        "--keep-float",
        default="kp_detector",
        help="comma-separated sub-networks of the frame graph left in float (depth_net, kp_detector, "
        "dense_motion_network, generator), or 'none' (default: kp_detector)",
    )
    q.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    q.add_argument("--format", default="qdq", choices=("qdq", "qoperator"))
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    q.add_argument("--check-clips", nargs="+", help="held-out clips: print int8-vs-fp32 output PSNR on them")
    q.add_argument("--quiet", action="store_true", help="no progress messages")
    q.set_defaults(func=_cmd_quantize)
