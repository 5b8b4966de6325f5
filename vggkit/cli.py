"""The ``vggkit`` command: ``info | train | evaluate | finetune | extract | predict | bench``.

Wiring only: each subcommand parses its arguments and calls the library.
"""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import layer_table, runtime_report

    if args.runtime:
        print(runtime_report())
    if args.model or not args.runtime:
        print(layer_table(args.model or "vgg16", input_size=args.input_size, width=args.width))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vggkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="layer table of a model: shapes, parameters, receptive fields, FLOPs",
                          description="Print a model's layers with output shapes, parameters, receptive "
                                      "field/stride/padding and multiply-adds.")
    info.add_argument("model", nargs="?", help="model name, e.g. vgg16, D, vgg19_bn (default vgg16)")
    info.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    info.add_argument("--width", type=float, default=1.0, help="channel multiplier (default 1.0)")
    info.add_argument("--runtime", action="store_true", help="print the device/precision vggkit will use")
    info.set_defaults(handler=_info)

    # Further subcommands register here (train, evaluate, finetune, extract, predict, bench).
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"vggkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
