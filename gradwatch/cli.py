"""The ``gradwatch`` command line.

``gradwatch config --set clip=norm --set max_norm=1.0`` validates monitor options and
prints the effective configuration as JSON. ``gradwatch report RUN_DIR`` writes the
HTML report of a recorded run (or its tables, ``--format csv|parquet``), and
``gradwatch summary RUN_DIR`` prints a plain-text summary. ``gradwatch demo`` trains a
small model with faults injected at known steps, with the monitor attached, and prints
what was caught (see :mod:`gradwatch.demo`). Errors (a missing,
truncated or foreign run directory included) are one line on stderr and exit code 2;
``gradwatch --debug COMMAND ...`` shows the traceback instead. Without a command it
prints its usage and exits 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

from .version import __version__


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return text  # a bare word such as auto or module


def _config(args: argparse.Namespace) -> int:
    from .config import MonitorConfig

    values = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE, for example clip=norm")
        values[key.strip()] = _parse_value(raw.strip())
    config = MonitorConfig.from_dict(values)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import export_report

    out = args.output or ("report.html" if args.format == "html" else f"report-{args.format}")
    path = export_report(args.run_dir, out, format=args.format)
    print(f"wrote {path}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .report import read_run, summary_text

    if args.top < 1:
        raise ValueError(f"--top {args.top} must be at least 1")
    print(summary_text(read_run(args.run_dir), source=args.run_dir, top=args.top))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .report import _require
    from .report.compare import write_compare

    _require("matplotlib")
    print(f"wrote {write_compare([args.run_a, args.run_b], args.output)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import run

    return run(Path(args.out), seed=args.seed, steps=args.steps, lr=args.lr,
               use_wandb=not args.no_wandb)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Per-layer gradient monitoring, explosion detection and adaptive clipping "
        "for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    # --debug also after the command (gradwatch report RUN --debug); set only if given.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[debug], **kwargs)

    cfg = command(
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
    rep = command(
        "report",
        help="write the report of a recorded run (HTML, or its tables as CSV/Parquet)",
        description="Write a self-contained HTML report of a run directory (plots, "
        "anomalous layers, events, advice), or its steps/layers/events tables.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (has meta.json)")
    rep.add_argument(
        "-o", "--output", metavar="PATH",
        help="the HTML file, or the directory for csv/parquet tables (default: "
        "report.html, report-csv/ or report-parquet/)",
    )
    rep.add_argument("--format", choices=("html", "csv", "parquet"), default="html",
                     help="html (default), or the three tables as csv or parquet files")
    rep.set_defaults(func=_report)
    summ = command(
        "summary",
        help="print a plain-text summary of a recorded run",
        description="Print a run's status, steps, clip rate, events by kind and its "
        "worst layers by max z-score.",
    )
    summ.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (has meta.json)")
    summ.add_argument("--top", type=int, default=10, metavar="N",
                      help="how many layers to list (default 10)")
    summ.set_defaults(func=_summary)
    comp = command(
        "compare",
        help="overlay two recorded runs in one HTML page",
        description="Write one HTML page with two runs side by side: their summaries "
        "(steps, clip and skip rates, events, median norm, final loss) in one table, and "
        "their global norms, losses and clip rates overlaid over the steps.",
    )
    comp.add_argument("run_a", metavar="RUN_A", help="a run directory (has meta.json)")
    comp.add_argument("run_b", metavar="RUN_B", help="another run directory")
    comp.add_argument("-o", "--output", metavar="PATH", default="compare.html",
                      help="the HTML file (default compare.html)")
    comp.set_defaults(func=_compare)
    demo = command(
        "demo",
        help="train a small model with injected faults and show what gradwatch catches",
        description="Train a digits MLP twice on the same batches, plainly and with "
        "gradwatch attached, with a loss spike, an outlier input, bad labels, a NaN and a "
        "learning-rate blow-up injected at known steps. Prints what was caught, records "
        "the run, logs it to an offline W&B run and writes the HTML report. Needs "
        "scikit-learn (gradwatch[examples]).",
    )
    demo.add_argument("--out", default="gradwatch_demo", metavar="DIR",
                      help="where the run record, W&B files and report go "
                      "(default gradwatch_demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument("--steps", type=int, default=400,
                      help="optimizer steps, at least 200 (default 400)")
    demo.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    demo.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("gradwatch: error: a command is needed (gradwatch --help lists them)",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - one line, unless --debug asks for more
        if args.debug:
            raise
        # RunDirError is a ValueError; OSError: the output cannot be written; anything
        # else is a file we could not make sense of.
        message = " ".join(str(err).split())[:500] or type(err).__name__
        print(f"gradwatch {args.command}: error: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
