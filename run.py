#!/usr/bin/env python3
"""DF-DAM pipeline command line.

One subcommand per stage of the pipeline; each builds its arguments (or one typed
config) and calls one function. Run ``python run.py <command> --help`` for details.
"""
from __future__ import annotations

import argparse
import sys


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="count parameters and multiply-accumulates of DF-DAM and reference models",
        description=(
            "Count DF-DAM's parameters and multiply-accumulates (MACs) at a given input "
            "size, with torch.utils.flop_counter on the meta device (no weights, no "
            "compute). The auxiliary heads are excluded, as in the paper's Tables 4 and "
            "6. Prints DF-DAM beside torchvision's fcn_resnet101 and deeplabv3_resnet101 "
            "at the same input, and the paper's own figures."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50", "resnet101"])
    p.add_argument("--variant", default="dafm+2dpam", choices=["sum", "dafm", "dafm+2dpam"],
                   help="ablation variant of the paper's Tables 1-2")
    p.add_argument("--size", default="320x640", help="input size as HxW (the paper: 320x640)")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--no-reference", action="store_true",
                   help="skip the torchvision reference models (faster)")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from pipeline.profiling import format_rows, parse_size, profile_rows

    size = parse_size(args.size)
    rows = profile_rows(args.backbone, size, args.num_classes, variant=args.variant,
                        references=not args.no_reference)
    print(format_rows(rows, args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description=(
            "DF-DAM scene segmentation pipeline: synthetic data, WebDataset sharding, "
            "Ray Train training, Ray Tune search and MLflow tracking."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
