"""Reports of a recorded run: one self-contained HTML page, or the tables as files.

``export_report(run_dir, "report.html")`` reads a run directory
(:mod:`gradwatch.run_record`) and writes one HTML file that needs nothing else: the
plots are PNGs embedded as ``data:`` URIs, there is no script and no external
request, and every name and string from the record is escaped. It holds the global
norm over time, a layers x steps heatmap, the clipping timeline, the most anomalous
layers, per-layer distributions, the events and the advice of
:mod:`gradwatch.advice`. ``format="csv"`` or ``"parquet"`` writes the three tables
into a directory instead.

The package composes: the statistics were computed by the monitor, the advice by
:mod:`gradwatch.advice`. :mod:`.summary` puts the run in numbers, :mod:`.plots` draws
the figures and :mod:`.page` fills the page's Jinja2 templates (``templates/``).
pandas, matplotlib, scipy and jinja2 are imported inside the functions, so
``import gradwatch`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from ..run_record import RunData, RunDirError
from .notebook import load_shown_run as load_run
from .page import render_html
from .plots import bin_max as bin_max  # importable from here before the split
from .plots import bin_starts as bin_starts
from .summary import layer_summary, run_summary, summary_text

__all__ = [
    "FORMATS",
    "RunData",
    "RunDirError",
    "export_report",
    "layer_summary",
    "load_run",
    "read_run",
    "render_html",
    "run_summary",
    "summary_text",
]

FORMATS = ("html", "csv", "parquet")
_STEP_COLUMNS = ("step", "global_norm", "clipped_norm", "threshold", "action", "z",
                 "typical_norm", "coef", "nonfinite")
_LAYER_COLUMNS = ("step", "layer", "grad_norm", "z", "max_abs", "value_threshold", "flagged")
_EVENT_COLUMNS = ("step", "kind", "layer", "layers", "action", "reason")


# ---------------------------------------------------------------------- entry points
def export_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], format: str = "html"
) -> Path:
    """Write a report of the run recorded in ``run_dir``.

    Args:
        run_dir: a run directory (see :mod:`gradwatch.run_record`).
        out: the HTML file to write (``format="html"``), or the directory that
            receives ``steps``, ``layers`` and ``events`` as ``.csv`` or ``.parquet``
            files (created if missing).
        format: ``"html"``, ``"csv"`` or ``"parquet"``.

    Returns:
        The path written.

    Raises:
        RunDirError: the run directory is missing, truncated or not a gradwatch run.
        ValueError: ``format`` is not one of the above.
        ImportError: matplotlib or scipy (needed for HTML) is not installed; the
            message has the ``pip install`` command.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(map(repr, FORMATS))}")
    if format == "html":
        _require("matplotlib", "scipy")
    run = read_run(run_dir)
    out = Path(out)
    if format == "html":
        _write_text(out, render_html(run, source=str(run_dir)))
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("steps", "layers", "events"):
        frame = getattr(run, name)
        path = out / f"{name}.{format}"
        if format == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    return out


def _write_text(out: Path, text: str) -> None:
    """Write ``text`` to ``out`` whole or not at all (a temporary file renamed)."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # The user's path, not the temporary one beside it.
        raise OSError(err.errno, f"cannot write {out}: {err.strerror}") from None


def read_run(run_dir: str | os.PathLike[str]) -> RunData:
    """:func:`load_run`, and a check that the tables have the columns a report reads.

    Raises:
        RunDirError: as :func:`load_run`, or a part lacks a column (one line).
    """
    try:
        run = load_run(run_dir)
    except (KeyError, TypeError, AttributeError) as err:  # a foreign part or layer table
        raise RunDirError(
            f"{run_dir}: not the layout gradwatch writes ({type(err).__name__}: {err})"
        ) from None
    for table, columns in (("steps", _STEP_COLUMNS), ("layers", _LAYER_COLUMNS),
                           ("events", _EVENT_COLUMNS)):
        missing = [c for c in columns if c not in getattr(run, table).columns]
        if missing:
            raise RunDirError(
                f"{Path(run_dir) / table}: parts lack the column(s) {', '.join(missing)}; "
                "not written by this gradwatch"
            )
    return run


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"the HTML report needs {' and '.join(missing)}: pip install 'gradwatch[report]'"
        )
