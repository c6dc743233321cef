"""Two runs side by side (``gradwatch compare RUN_A RUN_B``): their summaries in one table,
and their global norms, losses and clip rates overlaid on one step axis, in one
self-contained HTML page (embedded PNGs, every name escaped, no script)."""

from __future__ import annotations

import html
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from .plots import MAX_LINE_POINTS, _png, bin_starts
from .summary import run_summary

if TYPE_CHECKING:
    from ..run_record import RunData

COLOURS = ("#1f77b4", "#d62728")
CLIP_BINS = 100  # the clip rate is drawn as the share of clipped steps per bin


def compare_html(runs: list[RunData], names: list[str]) -> str:
    """The comparison page of ``runs`` (two, in practice), labelled ``names``."""
    summaries = [run_summary(r) for r in runs]
    rows = [
        ("status", [s["status"] + (f" ({s['error']})" if s["error"] else "") for s in summaries]),
        ("steps", [str(s["steps"]) for s in summaries]),
        ("layers", [str(s["layers"]) for s in summaries]),
        ("clip mode", [str(s["clip"]) for s in summaries]),
        ("steps clipped", [f"{s['clip_rate']:.2%}" for s in summaries]),
        ("steps skipped", [f"{s['skip_rate']:.2%}" for s in summaries]),
        *((f"{kind} events", [str(s["events"][kind]) for s in summaries])
          for kind in summaries[0]["events"]),
        ("median global norm", [_median(r, "global_norm") for r in runs]),
        ("final loss (median of the last 5%)", [_final(r, "loss") for r in runs]),
    ]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>gradwatch compare: {html.escape(' vs '.join(names))}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "th:first-child,td:first-child{text-align:left}</style></head><body>",
           f"<h1>gradwatch compare: {html.escape(' vs '.join(names))}</h1>",
           '<table id="summary"><tr><th></th>'
           + "".join(f'<th style="color:{c}">{html.escape(n)}</th>'
                     for n, c in zip(names, COLOURS)) + "</tr>"]
    out += ["<tr><td>" + html.escape(label) + "</td>"
            + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>"
            for label, values in rows]
    out.append("</table>")
    for section, title, plot in (
        ("global-norm", "Global gradient norm (before clipping)", _plot(runs, names, "global_norm", log=True)),
        ("loss", "Training loss", _plot(runs, names, "loss", log=None)),
        ("clip-rate", f"Share of steps clipped ({CLIP_BINS} bins)", _plot_clip(runs, names)),
    ):
        if plot is not None:
            out.append(f'<h2 id="{section}">{title}</h2><img src="{plot}" alt="{title}">')
    out.append("</body></html>")
    return "\n".join(out)


def write_compare(run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str]) -> str:
    """Read the runs, write the page to ``out``; returns its path."""
    from pathlib import Path

    from . import _write_text, read_run
    from .page import run_name

    runs = [read_run(d) for d in run_dirs]
    names = [run_name(str(d)) for d in run_dirs]
    if len(set(names)) < len(names):  # two directories of one name: say which is which
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    path = Path(out)
    _write_text(path, compare_html(runs, names))
    return str(path)


def _values(run: RunData, column: str) -> tuple[np.ndarray, np.ndarray]:
    steps = run.steps
    if steps.empty or column not in steps:
        return np.zeros(0), np.zeros(0)
    x = steps["step"].to_numpy(dtype=float)
    y = steps[column].to_numpy(dtype=float)
    ok = np.isfinite(y)
    return x[ok], y[ok]


def _median(run: RunData, column: str) -> str:
    _, y = _values(run, column)
    return f"{float(np.median(y)):.4g}" if len(y) else "-"


def _final(run: RunData, column: str) -> str:
    _, y = _values(run, column)
    if not len(y):
        return "-"
    return f"{float(np.median(y[-max(1, math.ceil(len(y) * 0.05)):])):.4g}"


def _plot(runs: list[RunData], names: list[str], column: str, log: bool | None) -> str | None:
    from matplotlib.figure import Figure

    series = [_values(r, column) for r in runs]
    if not any(len(x) for x, _ in series):
        return None
    fig = Figure(figsize=(12, 3.4))
    ax = fig.add_subplot()
    for (x, y), name, colour in zip(series, names, COLOURS):
        if not len(x):
            continue
        if len(x) > MAX_LINE_POINTS:  # a binned median: the line stays readable
            starts = bin_starts(len(x), MAX_LINE_POINTS // 2)
            bounds = [*starts[1:], len(x)]
            x = x[starts]
            y = np.array([np.median(y[a:b]) for a, b in zip(starts, bounds)])
        ax.plot(x, y, color=colour, lw=0.8, label=name)
    positive = all((y > 0).all() for _, y in series if len(y))
    if log or (log is None and positive
               and max(y.max() for _, y in series if len(y))
               > 100 * min(y.min() for _, y in series if len(y))):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.95)
    return _png(fig)


def _plot_clip(runs: list[RunData], names: list[str]) -> str | None:
    from matplotlib.figure import Figure

    if all(r.steps.empty for r in runs):
        return None
    fig = Figure(figsize=(12, 2.8))
    ax = fig.add_subplot()
    for run, name, colour in zip(runs, names, COLOURS):
        if run.steps.empty:
            continue
        x = run.steps["step"].to_numpy(dtype=float)
        clipped = (run.steps["action"].astype(str) != "none").to_numpy(dtype=float)
        starts = bin_starts(len(x), CLIP_BINS)
        share = np.add.reduceat(clipped, starts) / np.diff([*starts, len(x)])
        ax.step(x[starts], share, where="post", color=colour, lw=1, label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share clipped")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.18, top=0.95)
    return _png(fig)
