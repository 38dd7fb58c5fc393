"""``dagan synth``: render synthetic talking-head clips with ground truth from still portraits."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_synth(args: argparse.Namespace) -> int:
    from dagan.synth.dataset import SynthError, collect_identities, write_dataset

    builtin = args.builtin or not args.portraits
    if args.size < 64:
        raise SynthError(f"--size must be at least 64, got {args.size}")
    report = collect_identities(
        args.portraits or (),
        builtin=builtin,
        size=args.size,
        min_face=args.min_face,
        progress=not args.quiet,
        max_yaw=args.max_yaw,
    )
    skipped = []
    if report.skipped_small:
        skipped.append(f"{report.skipped_small} faces smaller than {args.min_face:g} px")
    if report.skipped_no_face:
        skipped.append(f"{len(report.skipped_no_face)} images without a face")
    if report.skipped_turned:
        skipped.append(f"{report.skipped_turned} near-profile faces")
    if report.skipped_no_mesh:
        skipped.append(f"{report.skipped_no_mesh} faces without a fitted mesh")
    if report.unreadable:
        skipped.append(f"{len(report.unreadable)} unreadable files")
    print(
        f"{len(report.identities)} identities from {report.images} images"
        + (f" (skipped {', '.join(skipped)})" if skipped else "")
    )
    summary = write_dataset(
        args.out,
        report,
        test_identities=args.test_identities,
        clips_per_identity=args.clips_per_identity,
        frames=args.frames,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    held = summary["test_identities"]
    videos = summary["videos"]
    print(
        f"wrote {args.out}: {len(videos['train'])} train and {len(videos['test'])} test "
        f"clips, {summary['frames_written']} frames ({summary['frames_per_second']} frames/s); "
        f"held-out identities: {', '.join(held) if held else 'none'}"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="render synthetic talking-head clips with pose/depth/landmark ground truth from portraits",
        description="Fit a 3D face mesh to every face in the portraits and re-render it under random head "
        "motion, mouth opening, blinks and lighting. Writes ROOT/train/<clip> and ROOT/test/<clip> "
        "folders of PNG frames with gt.npz and meta.json beside them (see docs/synth.md).",
    )
    p.add_argument("--out", required=True, help="dataset root to write (ROOT/train, ROOT/test)")
    p.add_argument(
        "--portraits",
        nargs="+",
        action="extend",
        metavar="DIR",
        help="folders of images (or image files); every face found becomes an identity",
    )
    p.add_argument(
        "--builtin",
        action="store_true",
        help="add the two offline sample portraits (astronaut, grace_hopper); default without --portraits",
    )
    p.add_argument("--clips-per-identity", type=_positive, default=4)
    p.add_argument("--frames", type=_positive, default=64, help="frames per clip (25 fps)")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--test-identities",
        metavar="NAMES|N",
        help="held-out identities (test/ only): comma-separated names or a count; default ~15%% (at least 1)",
    )
    p.add_argument("--min-face", type=float, default=100.0, help="skip faces smaller than this (pixels)")
    p.add_argument(
        "--max-yaw", type=float, default=60.0, help="skip faces turned further than this (rough degrees)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace clips an earlier dagan synth wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_synth)
