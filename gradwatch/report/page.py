"""The report page: one self-contained HTML document of a recorded run.

The plots are PNGs embedded as ``data:`` URIs, there is no script and no external
request, and every name and string from the record is escaped.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .plots import (
    EVENT_STYLE,
    MAX_HEATMAP_COLUMNS,
    plot_actions,
    plot_distributions,
    plot_global_norm,
    plot_heatmap,
    bin_starts,
)
from .summary import _int, _num, layer_summary, run_summary

if TYPE_CHECKING:
    import pandas as pd

    from ..run_record import RunData

MAX_HEATMAP_LAYERS = 60
MAX_TABLE_LAYERS = 20
MAX_DISTRIBUTION_LAYERS = 12
MAX_EVENT_ROWS = 500

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#222;margin:0;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:24px 28px 60px;background:#fff;
box-shadow:0 0 0 1px #e3e5e8}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 8px;padding-top:8px;
border-top:1px solid #e3e5e8}h3{font-size:15px;margin:0 0 6px}
.sub{color:#666;margin:0 0 14px;word-break:break-all}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px;
margin:14px 0}
.fact{background:#f3f5f8;border-radius:6px;padding:8px 10px}
.fact b{display:block;font-size:18px}.fact span{color:#666;font-size:12px}
.note{color:#555;font-size:13px;margin:4px 0 8px}
.banner{background:#fff4e5;border:1px solid #f0c36d;border-radius:6px;padding:8px 12px}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e7e9ec;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f8;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.reason{font-size:12px;color:#444;max-width:560px;word-break:break-word}
td.name{word-break:break-all;max-width:320px}
.kind{border-radius:4px;padding:1px 6px;color:#fff;font-size:12px;white-space:nowrap}
.kind-explosion{background:#d62728}.kind-nonfinite{background:#111}
.kind-amp_overflow{background:#ff7f0e}
.advice{border-left:4px solid #d62728;background:#fbf3f3;padding:10px 14px;margin:12px 0;
border-radius:0 6px 6px 0}
.advice.ok{border-color:#2ca02c;background:#f2f9f2}
.advice table{width:auto;margin-top:8px}.advice td,.advice th{border:0;padding:1px 10px 1px 0}
details{margin:8px 0}summary{cursor:pointer;color:#1f5fa8}
pre{background:#f3f5f8;padding:8px;overflow:auto;font-size:12px}
"""

_SECTIONS = (
    ("advice", "Advice"),
    ("global-norm", "Global norm"),
    ("heatmap", "Layers x steps"),
    ("clipping", "Clipping"),
    ("layers", "Anomalous layers"),
    ("distributions", "Distributions"),
    ("events", "Events"),
)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<p class="note">No steps recorded yet.</p>'
    return f'<img src="{uri}" alt="{_e(alt)}">'


def render_html(run: RunData, source: str = "") -> str:
    """The report of ``run`` as one self-contained HTML page (a string).

    Every string that comes from the record (layer names, reasons, metadata) goes
    through :func:`html.escape`; the plots are ``data:`` URIs; there is no script.
    """
    from ..advice import advise

    summary = layer_summary(run)
    ranked = list(summary["layer"])
    names = [str(rec["layer"]) for rec in run.meta.get("layers", [])]
    # The heatmap keeps model order; when there are too many layers it shows the most
    # anomalous ones (by max z), still in model order.
    keep = set(ranked[:MAX_HEATMAP_LAYERS])
    heat_layers = [n for n in names if n in keep]
    advice = advise(run.meta, run.steps, run.layers, run.events)
    title = Path(source).name if source else "run"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>gradwatch report: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        _html_header(run, title, source),
        _html_advice(run, advice),  # (g) first: it is what the reader came for
        _html_global_norm(run),  # (a)
        _html_heatmap(run, names, heat_layers),  # (b)
        _html_actions(run),  # (c)
        _html_layer_table(run, summary),  # (d)
        _html_distributions(run, ranked[:MAX_DISTRIBUTION_LAYERS]),  # (e)
        _html_events(run),  # (f)
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _table(head: tuple[str, ...], rows: list[str]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def _html_header(run: RunData, title: str, source: str) -> str:
    meta, s = run.meta, run_summary(run)
    parts = [
        f"<h1>gradwatch report: {_e(title)}</h1>",
        f'<p class="sub">{_e(source)} &middot; recorded with gradwatch '
        f"{_e(s['gradwatch_version'])}, created {_e(s['created'])}</p>",
        "<nav>" + "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in _SECTIONS) + "</nav>",
    ]
    if s["status"] == "crashed":
        parts.append(
            f'<p class="banner">Status <b>crashed</b>: the program ended with an uncaught '
            f'{_e(str(s["error"]))}; every step it recorded is here.</p>'
        )
    elif s["status"] != "finished":
        parts.append(
            f'<p class="banner">Status <b>{_e(s["status"])}</b>: the run was still running, '
            "or was killed, when this report was made; it shows the steps on disk so far.</p>"
        )
    a = s["actions"]
    facts = [
        ("steps", s["steps"], f"steps {s['first_step']}..{s['last_step']}"
         if s["steps"] else "none recorded"),
        ("layers", s["layers"], f"granularity {meta.get('config', {}).get('granularity')}"),
        ("clip", s["clip"], f"{s['sessions']} session(s)"),
        ("clip rate", f"{s['clip_rate']:.2%}", f"norm {a['clip_norm']}, value {a['clip_value']}"),
        ("skipped", a["skip"], f"{s['skip_rate']:.2%} of steps"),
    ] + [(EVENT_STYLE[k][2], v, "events") for k, v in s["events"].items()]
    parts.append('<div class="facts">' + "".join(
        f'<div class="fact"><span>{_e(k)}</span><b>{_e(v)}</b><span>{_e(d)}</span></div>'
        for k, v, d in facts) + "</div>")
    config = dict(meta.get("config", {}))
    config["per-layer z threshold"] = meta.get("layer_z_threshold")
    config["per-layer clip z"] = meta.get("layer_clip_z")
    parts.append(
        "<details><summary>Configuration</summary><table>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in config.items())
        + "</table></details>"
    )
    return "\n".join(parts)


def _html_advice(run: RunData, advice: list[Any]) -> str:
    from ..advice import CHECKS

    parts = ['<h2 id="advice">Advice</h2>']
    for a in advice:
        rows = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td>{_e(_fmt(v))}</td></tr>"
                       for k, v in a.evidence.items())
        parts.append(f'<div class="advice" data-rule="{_e(a.rule)}"><h3>{_e(a.title)}</h3>'
                     f"<p>{_e(a.detail)}</p><table>{rows}</table></div>")
    if not advice and run.steps.empty:
        parts.append('<div class="advice ok"><h3>No steps recorded yet</h3></div>')
    elif not advice:
        single = (f" The {len(run.events)} single event(s) of this run, and what was done "
                  'about each, are under <a href="#events">Events</a>.' if len(run.events) else "")
        parts.append(
            '<div class="advice ok"><h3>No recurring problem found</h3><p>None of these '
            f"checks fired on this record:</p><ul>"
            + "".join(f"<li>{_e(c)}</li>" for c in CHECKS) + f"</ul><p>{single}</p></div>"
        )
    return "\n".join(parts)


def _html_global_norm(run: RunData) -> str:
    return "\n".join([
        '<h2 id="global-norm">Global gradient norm</h2>',
        '<p class="note">Before clipping, log scale, with the clipping threshold and the '
        "events. Non-finite steps have no norm and are marked along the top edge.</p>",
        _img(plot_global_norm(run), "global gradient norm over steps"),
    ])


def _html_heatmap(run: RunData, names: list[str], shown: list[str]) -> str:
    note = "log10 of each layer's gradient norm before clipping."
    n_steps = run.layers["step"].nunique() if len(run.layers) else 0
    if n_steps > MAX_HEATMAP_COLUMNS:
        note += (f" {n_steps} steps binned into "
                 f"{len(bin_starts(n_steps, MAX_HEATMAP_COLUMNS))} columns (the max of each "
                 "bin).")
    if len(names) > len(shown):
        note += (f" Showing {len(shown)} of {len(names)} layers: the most anomalous by max z, "
                 "in model order.")
    parts = [
        '<h2 id="heatmap">Layers x steps</h2>',
        f'<p class="note">{_e(note)} Gray: no gradient; red: NaN/Inf.</p>',
        _img(plot_heatmap(run, shown), "heatmap of log10 gradient norm per layer"),
    ]
    if shown and len(run.layers):
        parts.append(
            "<details><summary>The same, relative to each layer's median (shows a layer's "
            "anomalies whatever its scale)</summary>"
            + _img(plot_heatmap(run, shown, relative=True),
                   "heatmap of log10 gradient norm relative to each layer's median")
            + "</details>"
        )
    return "\n".join(parts)


def _html_actions(run: RunData) -> str:
    return "\n".join([
        '<h2 id="clipping">Clipping actions</h2>',
        '<p class="note">What the monitor did at each step (bins of consecutive steps on '
        "long runs; a bar means the action happened in that bin).</p>",
        _img(plot_actions(run), "clipping action per step"),
    ])


def _html_layer_table(run: RunData, summary: pd.DataFrame) -> str:
    parts = ['<h2 id="layers">Most anomalous layers</h2>']
    if summary.empty:
        parts.append('<p class="note">No layer records yet.</p>')
        return "\n".join(parts)
    shown = summary.head(MAX_TABLE_LAYERS)
    z_event = _fmt(run.meta.get("layer_z_threshold"))
    z_clip = _fmt(run.meta.get("layer_clip_z"))
    parts.append(_e(
        f"Top {len(shown)} of {len(summary)} layers by max z-score of the log norm. Flagged: z "
        f"above the per-layer event threshold ({z_event}); norm clips: norm-clipped steps "
        f"where the layer was beyond its clipping boundary (z > {z_clip}); value clips: steps "
        "where its max |g| was cut by value; typical: median norm."
    ).join(('<p class="note">', "</p>")))
    rows = [
        f'<tr><td class="name">{_e(r.layer)}</td>'
        + "".join(f'<td class="n">{_e(v)}</td>' for v in (
            _num(r.max_z, ".2f"), _int(r.max_z_step), int(r.flagged), int(r.norm_clips),
            int(r.value_clips), _num(r.typical_norm, ".3g"), _num(r.max_norm, ".3g"),
            _int(r.max_norm_step), int(r.nonfinite)))
        + "</tr>"
        for r in shown.itertuples()
    ]
    parts.append(_table(("layer", "max z", "at step", "flagged", "norm clips", "value clips",
                         "typical norm", "max norm", "at step", "non-finite"), rows))
    return "\n".join(parts)


def _html_distributions(run: RunData, layers: list[str]) -> str:
    return "\n".join([
        '<h2 id="distributions">Per-layer distributions</h2>',
        f'<p class="note">log10 gradient norm of the {len(layers)} most anomalous layers '
        "(violin; box with quartiles, whiskers at 1.5 IQR and the outliers beyond).</p>",
        _img(plot_distributions(run, layers), "distribution of log10 gradient norm"),
    ])


def _html_events(run: RunData) -> str:
    ev = run.events
    parts = [f'<h2 id="events">Events ({len(ev)})</h2>']
    if ev.empty:
        parts.append('<p class="note">No events: no explosion, non-finite gradient or AMP '
                     "overflow was recorded.</p>")
        return "\n".join(parts)
    if len(ev) > MAX_EVENT_ROWS:
        parts.append(f'<p class="note">Showing the first {MAX_EVENT_ROWS} of {len(ev)}; all '
                     "of them: <code>gradwatch report RUN_DIR --format csv</code>.</p>")
    rows = [
        f'<tr><td class="n">{_e(int(r.step))}</td>'
        f'<td><span class="kind kind-{_e(r.kind)}">{_e(r.kind)}</span></td>'
        f"<td>{_e(r.action)}</td>"
        f'<td class="name">{_e(str(r.layers).replace(",", ", "))}</td>'
        f'<td class="n">{_e(_num(r.z, "+.2f"))}</td>'
        f'<td class="n">{_e(_num(r.global_norm, ".3g"))}</td>'
        f'<td class="n">{_e(_num(r.threshold, ".3g"))}</td>'
        f'<td class="reason">{_e(r.reason)}</td></tr>'
        for r in ev.head(MAX_EVENT_ROWS).itertuples()
    ]
    parts.append(_table(("step", "kind", "action", "layers", "z", "global norm", "threshold",
                         "reason"), rows))
    return "\n".join(parts)
