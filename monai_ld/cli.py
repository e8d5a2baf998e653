"""`monai-ld` command line. Each sub-command lives beside the code it drives; this file only wires them.

A feature module exposes ``add_parser(subparsers)`` which registers its sub-command and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that register sub-commands, in --help order
_COMMANDS: list[str] = [
    "monai_ld.bundle_cli",
    "monai_ld.data.phantoms_cli",
    "monai_ld.evaluation_cli",
    "monai_ld.label.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-ld",
        description="Latent Drifting counterfactuals for medical images (MONAI extension).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .transforms.io import ImageLoadError  # an unreadable input file: one line, not a traceback

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, ImageLoadError) as e:
        print(f"monai-ld {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
