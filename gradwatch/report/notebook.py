"""A run at a glance in a notebook: what ``RunData`` and ``GradMonitor`` display as
(``_repr_html_``). The numbers are :func:`~gradwatch.report.summary.run_summary`'s and
:func:`~gradwatch.report.summary.layer_summary`'s, the ones ``gradwatch summary`` and the
report print; every string from the record is escaped."""

from __future__ import annotations

import html
import os

from ..run_record import RunData, load_run
from .summary import _ellipsis, _int, _num, _printable, layer_summary, run_summary

TOP = 5  # layers listed


class ShownRun(RunData):
    """A run read back (:func:`gradwatch.report.load_run`) that a notebook displays as
    :func:`run_html`."""

    def _repr_html_(self) -> str:
        return run_html(self)


def load_shown_run(run_dir: str | os.PathLike[str]) -> ShownRun:
    """Read a run directory back: ``meta.json`` and the steps, layers and events
    tables (:func:`gradwatch.run_record.load_run`, whose :class:`RunDirError` it
    raises), as a :class:`ShownRun`, which a notebook displays as the run at a glance."""
    run = load_run(run_dir)
    return ShownRun(run.meta, run.steps, run.layers, run.events)


def run_html(run: RunData, title: str = "gradwatch run", top: int = TOP) -> str:
    """An HTML fragment: status, steps, clip rate, events by kind and the ``top``
    layers by max z-score."""
    s = run_summary(run)
    a = s["actions"]
    span = f" (steps {s['first_step']}..{s['last_step']})" if s["steps"] else ""
    events = ", ".join(f"{k} {v}" for k, v in s["events"].items())
    status = s["status"] + (f" ({_printable(str(s['error']))})" if s["error"] else "")
    rows = [
        ("status", status),
        ("steps", f"{s['steps']}{span}, {s['layers']} layer(s), clip={s['clip']!r}"),
        ("clip rate", f"{s['clip_rate']:.2%} (norm {a['clip_norm']}, value "
                      f"{a['clip_value']}), skipped {a['skip']}"),
        ("events", events),
    ]
    out = [f"<div><strong>{html.escape(title)}</strong>", "<table>"]
    out += [f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    table = layer_summary(run).head(top)
    if len(table):
        head = ("layer", "max z", "at step", "flagged", "typical norm", "max norm")
        out.append(f"<p>Worst layers by max z (top {len(table)} of {s['layers']}):</p>")
        out.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        for r in table.itertuples():
            cells = (_ellipsis(_printable(str(r.layer)), 40), _num(r.max_z, ".2f"),
                     _int(r.max_z_step), str(int(r.flagged)), _num(r.typical_norm, ".3g"),
                     _num(r.max_norm, ".3g"))
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    out.append("</div>")
    return "\n".join(out)
