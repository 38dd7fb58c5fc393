"""``dagan import``: convert the published DaGAN or FOMM checkpoints into our checkpoint format."""

from __future__ import annotations

import argparse

from dagan.importer import CheckpointImportError, import_release


def _cmd_import(args: argparse.Namespace) -> int:
    depth = (args.depth_encoder, args.depth_decoder)
    if (args.dagan is None) == (args.fomm is None):
        raise CheckpointImportError("give exactly one of --dagan GENERATOR_CKPT or --fomm VOX_CKPT")
    if args.dagan is not None:
        if None in depth:
            raise CheckpointImportError(
                "--dagan also needs the face depth network: "
                "--depth-encoder ENCODER_PTH --depth-decoder DECODER_PTH"
            )
        release, paths = "dagan", [args.dagan, *depth]
    else:
        if any(p is not None for p in depth):
            raise CheckpointImportError("--fomm takes no depth files: FOMM has no depth network")
        release, paths = "fomm", [args.fomm]
    align = None if args.align_corners is None else args.align_corners == "true"
    report = import_release(
        release,
        paths,
        args.out,
        allow_partial=args.allow_partial,
        seed=args.seed,
        config=args.config,
        align_corners=align,
    )
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="convert the published DaGAN or FOMM VoxCeleb checkpoints into a .safetensors checkpoint",
        description="Import reference checkpoints (downloaded by you from the authors' pages; non-commercial "
        "licences) into our format. Files are read with torch.load(weights_only=True): no pickled code runs.",
    )
    p.add_argument(
        "--dagan", metavar="GENERATOR_CKPT", help="DaGAN release checkpoint (generator + keypoint detector)"
    )
    p.add_argument("--depth-encoder", metavar="ENCODER_PTH", help="DaGAN face depth encoder (encoder.pth)")
    p.add_argument("--depth-decoder", metavar="DECODER_PTH", help="DaGAN face depth decoder (depth.pth)")
    p.add_argument(
        "--fomm", metavar="VOX_CKPT", help="FOMM vox-256 / vox-adv-256 checkpoint (vox-cpk.pth.tar)"
    )
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument(
        "--config",
        metavar="CONFIG",
        help="model size of the checkpoint: the YAML the authors' code trained it with (their "
        "config/*.yaml, read for model_params and frame_shape), one of our config YAMLs, or a preset; "
        "default: the release's published size (vox-256 / fomm)",
    )
    p.add_argument(
        "--align-corners",
        choices=("true", "false"),
        help="grid_sample convention the checkpoint was trained with; default: DaGAN false (PyTorch "
        ">= 1.3), FOMM true (its published weights were trained on PyTorch 1.0). FOMM models you "
        "trained yourself on PyTorch >= 1.3 need false",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="write the checkpoint even if tensors are missing or mis-shaped (they stay random; listed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random init for tensors left random")
    p.set_defaults(func=_cmd_import)
