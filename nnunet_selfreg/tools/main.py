"""``nnunet-selfreg`` command line: one sub-command per module in ``nnunet_selfreg.tools``.

Each tool module provides ``add_parser(subparsers)`` which registers its sub-command and sets
``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nnunet_selfreg.errors import UserError

__all__ = ["TOOLS", "build_parser", "main"]

#: sub-command modules, in the order ``--help`` lists them
TOOLS = ("demo", "compare", "sweep", "doctor", "export_stock", "add_unlabeled", "analyze")


def build_parser() -> argparse.ArgumentParser:
    from nnunet_selfreg import __version__

    parser = argparse.ArgumentParser(
        prog="nnunet-selfreg",
        description="SelfReg-UNet, SS-Net and M2SNet for nnU-Net v2: tools around nnU-Net's own CLIs.",
    )
    parser.add_argument("--version", action="version", version=f"nnunet-selfreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in TOOLS:
        importlib.import_module(f"nnunet_selfreg.tools.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for tools that record it
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"nnunet-selfreg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
