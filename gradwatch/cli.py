"""The ``gradwatch`` command line.

``gradwatch config --set clip=norm --set max_norm=1.0`` validates monitor options and
prints the effective configuration as JSON. Errors are one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

from . import __version__
from .config import MonitorConfig


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as auto or module


def _config(args: argparse.Namespace) -> int:
    values = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE, for example clip=norm")
        values[key.strip()] = _parse_value(raw.strip())
    config = MonitorConfig.from_dict(values)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Per-layer gradient monitoring, explosion detection and adaptive clipping "
        "for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cfg = sub.add_parser(
        "config",
        help="validate monitor options and print the effective configuration",
        description="Validate MonitorConfig options and print the result as JSON.",
    )
    cfg.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MonitorConfig field, e.g. clip=zscore or z_threshold=5 (repeatable)",
    )
    cfg.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"gradwatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
