"""The picture flags ``dagan animate`` and ``dagan cam`` share: paste-back, smoothing, neutral pose and
mouth gain.

Two applications parse the same flags into the same keyword arguments; the one definition lives in the
library so that neither imports the other (the layering in README.md). A bad value is a
:class:`~dagan.errors.UserError`, printed by the ``dagan`` dispatcher as one line.
"""

from __future__ import annotations

import argparse

from .config import MAX_MOUTH_GAIN, is_mouth_gain
from .errors import UserError
from .paste import MASKS, parse_size
from .smoothing import DEFAULT_PARAMS, OneEuroParams


def add_picture_arguments(p: argparse.ArgumentParser, full_default: bool = False) -> None:
    """The paste-back, smoothing, neutral-pose and mouth-gain flags ``dagan animate`` and ``dagan cam``
    share."""
    if not full_default:
        p.add_argument(
            "--full-picture",
            action="store_true",
            help="write the avatar pasted back into the whole photo instead of source | driving | result",
        )
    p.add_argument(
        "--output-size",
        metavar="WxH",
        help="fit the full picture into this frame, e.g. 1280x720 (cropped or padded to the aspect, the "
        "face in the upper middle)" + ("; default 1280x720" if full_default else "; implies --full-picture"),
    )
    p.add_argument(
        "--mask", choices=MASKS, default="ellipse", help="paste-back mask (default ellipse; docs/server.md)"
    )
    p.add_argument(
        "--smooth-min-cutoff",
        type=float,
        default=DEFAULT_PARAMS.min_cutoff,
        metavar="HZ",
        help="One-Euro filter on the crop box and keypoints: cutoff of a still face "
        f"(lower: steadier; default {DEFAULT_PARAMS.min_cutoff:g})",
    )
    p.add_argument(
        "--smooth-beta",
        type=float,
        default=DEFAULT_PARAMS.beta,
        metavar="BETA",
        help=f"One-Euro speed coefficient (higher: less lag on fast motion; default {DEFAULT_PARAMS.beta:g})",
    )
    p.add_argument("--no-smooth", action="store_true", help="no motion filtering (the pipeline before it)")
    p.add_argument(
        "--auto-neutral",
        type=float,
        nargs="?",
        const=2.0,
        default=0.0,
        metavar="SECONDS",
        help="choose the neutral pose automatically: the frame closest to the photo's pose and expression "
        "in the first SECONDS (default 2) instead of the first frame",
    )
    p.add_argument(
        "--mouth-gain",
        type=float,
        default=None,
        metavar="G",
        help="relative motion: open the avatar's lips G times as far as the driver's opens (1: as the "
        f"driver's; at most {MAX_MOUTH_GAIN:g}; default: the model's own, 2.5 for the bundled weights). "
        "Lower it for a photo whose mouth opens too wide, raise it for one that hardly opens",
    )


def picture_options(args: argparse.Namespace) -> dict:
    """:func:`add_picture_arguments`'s flags as keyword arguments, checked (a bad value is a UserError)."""
    try:
        size = parse_size(args.output_size) if args.output_size else None
        smoothing = (
            None
            if args.no_smooth
            else OneEuroParams(min_cutoff=args.smooth_min_cutoff, beta=args.smooth_beta)
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if args.auto_neutral < 0:
        raise UserError(f"--auto-neutral must be a number of seconds > 0, got {args.auto_neutral:g}")
    gain = args.mouth_gain
    if gain is not None and not is_mouth_gain(gain):
        raise UserError(
            f"--mouth-gain must be in (0, {MAX_MOUTH_GAIN:g}] (1 = the driver's opening), got {gain:g}"
        )
    out = {
        "output_size": size,
        "mask": args.mask,
        "smoothing": smoothing,
        "auto_neutral": args.auto_neutral,
        "mouth_gain": gain,
    }
    if hasattr(args, "full_picture"):
        out["full_picture"] = args.full_picture
    return out
