"""``dagan cam``: webcam → avatar → virtual camera, with a local engine or a remote ``dagan serve``.

The local engine's flags and variables are the shared rows :data:`dagan.options.ENGINE_OPTIONS`, read
by the one reader :func:`dagan.options.read_options`, as in ``dagan serve``.
"""

from __future__ import annotations

import argparse
import sys
import threading

from dagan.options import ENGINE_OPTIONS, add_options, read_options

from .pipeline import CamRunner, Controls


def _camera_arg(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _stdin_keys(controls: Controls) -> None:
    """Terminal controls: type r / p / q / + / - and Enter (works without a preview window)."""
    for line in sys.stdin:
        controls.handle_key(line)
        if controls.quit.is_set():
            return


def run_cam(args: argparse.Namespace, source=None, sink=None) -> int:
    """Build sink, camera and animator from ``args``; ``source``/``sink`` can be injected (tests)."""
    from dagan.media import load_image
    from dagan.picture_options import picture_options

    from .io import OpenCVCamera, VirtualCameraSink

    photo = load_image(args.source)
    options = picture_options(args)
    width, height = options["output_size"] or (1280, 720)
    width, height = args.width or width, args.height or height  # the older --width/--height
    full = args.picture == "full"
    # Open the virtual camera first: a missing device is the most common problem and should be reported
    # before minutes are spent loading models.
    sink = sink or VirtualCameraSink(
        width, height, args.fps, backend=args.vcam_backend, device=args.vcam_device
    )
    source = source or OpenCVCamera(args.camera, fps=args.fps)
    if args.server:
        from .remote import RemoteAnimator

        # The server's own settings (size, filters) apply; what comes back is fitted to the camera.
        animator = RemoteAnimator(
            args.server,
            photo,
            relative=not args.absolute,
            verify_tls=not args.insecure,
            token=args.token,
            **({"picture": "full"} if full else {}),
            **({"auto_neutral": True} if options["auto_neutral"] > 0 else {}),
            mouth_gain=options["mouth_gain"],
        )
    else:
        from dagan.checkpoint import resolve_checkpoint, warn_if_untrained
        from engine.select import default_engine

        from .pipeline import LocalAnimator

        opts = read_options(ENGINE_OPTIONS, args)
        checkpoint = resolve_checkpoint(opts["checkpoint"])
        # on a CPU the fastest engine that holds quality, prepared on first use, cores split with the
        # camera and tracking by measured cost (engine.select, as `dagan serve`)
        engine, choice = default_engine(
            checkpoint,
            opts["backend"],
            opts["device"],
            opts["precision"],
            threads=opts["threads"],
            parallel=opts["parallel"],
        )
        print(f"engine: {choice.describe()}", file=sys.stderr)
        warn_if_untrained(checkpoint)
        animator = LocalAnimator(
            engine,
            photo,
            relative=not args.absolute,
            crop=not args.no_crop,
            full_picture=full,
            output_size=(sink.width, sink.height),
            mask=options["mask"],
            smoothing=options["smoothing"],
            auto_neutral=options["auto_neutral"],
            mouth_gain=options["mouth_gain"],
        )
    controls = Controls()
    print(f"virtual camera ready ({sink.width}×{sink.height}); {Controls.HELP}", file=sys.stderr)
    if sys.stdin is not None and sys.stdin.isatty():
        threading.Thread(target=_stdin_keys, args=(controls,), daemon=True).start()
    runner = CamRunner(source, sink, animator, controls=controls, preview=args.preview)
    try:
        stats = runner.run(max_frames=args.max_frames)
    finally:
        animator.close()
        source.close()
        sink.close()
    print(
        f"sent {stats.frames_out} frames ({stats.fps_out:.1f} fps), "
        f"dropped {stats.dropped} stale camera frames",
        file=sys.stderr,
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cam", help="the avatar as a virtual camera for OBS / Zoom / Meet / Teams")
    p.add_argument("--source", required=True, help="photo of the face to animate")
    p.add_argument("--camera", type=_camera_arg, default=0, help="webcam index (default 0) or a video file")
    p.add_argument(
        "--server", help="use a remote `dagan serve` (https://host:port) instead of a local engine"
    )
    p.add_argument(
        "--insecure", action="store_true", help="accept a self-signed TLS certificate (remote mode)"
    )
    p.add_argument(
        "--token",
        help="the server's access token (remote mode; default $DAGAN_ACCESS_TOKEN or the URL's #token=)",
    )
    add_options(p.add_argument_group("local engine (without --server)"), ENGINE_OPTIONS)
    p.add_argument("--absolute", action="store_true", help="absolute instead of relative motion transfer")
    p.add_argument("--no-crop", action="store_true", help="camera frames are already face crops")
    p.add_argument(
        "--picture",
        choices=("full", "crop"),
        default="full",
        help="full: the avatar pasted back into the whole photo, fitted to --output-size (default); "
        "crop: the model's square face crop, centred with bars",
    )
    from dagan.picture_options import add_picture_arguments

    add_picture_arguments(p, full_default=True)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)  # before --output-size: still accepted
    p.add_argument("--height", type=int, help=argparse.SUPPRESS)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--vcam-backend", help="pyvirtualcam backend (v4l2loopback, obs, unitycapture)")
    p.add_argument("--vcam-device", help="virtual camera device, e.g. /dev/video10")
    p.add_argument("--preview", action="store_true", help="show a preview window (keys r, p, q)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.set_defaults(func=run_cam)
