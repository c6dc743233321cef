"""The report page: one self-contained HTML document of a recorded run.

The markup lives in Jinja2 templates next to this module (``templates/``):
``report.html.j2`` lays out the page, ``sections.html.j2`` holds one macro per
section and ``report.css`` the style. This module prepares plain values for them:
numbers formatted as text, table rows as dicts, the plots as ``data:`` URIs. It
writes no markup and escapes nothing by hand; autoescaping is on, so every name and
string from the record is escaped once, by the template engine. The page has no
script and makes no external request.
"""

from __future__ import annotations

import functools
import html
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .plots import (
    EVENT_STYLE,
    MAX_HEATMAP_COLUMNS,
    bin_starts,
    plot_actions,
    plot_distributions,
    plot_global_norm,
    plot_heatmap,
    plot_loss,
    plot_update_ratio,
    warmup_span,
)
from .summary import _int, _num, layer_summary, run_summary

if TYPE_CHECKING:
    import jinja2
    import pandas as pd

    from ..advice import Advice
    from ..run_record import RunData

MAX_HEATMAP_LAYERS = 60
MAX_TABLE_LAYERS = 20
MAX_DISTRIBUTION_LAYERS = 12
MAX_EVENT_ROWS = 500
MAX_EVENT_LAYERS = 5  # an event's layers cell names this many, then "and N more"


def render_html(run: RunData, source: str = "") -> str:
    """The report of ``run`` as one self-contained HTML page (a string).

    Args:
        run: the recorded run (see :func:`gradwatch.report.read_run`).
        source: where it was read from; shown under the title. The run's name
            (the directory's, see :func:`run_name`) names the page.

    Returns:
        The page. Every string that comes from the record (layer names, reasons,
        metadata) is escaped by the template engine; the plots are ``data:`` URIs;
        there is no script.
    """
    from ..advice import advise

    summary = layer_summary(run)
    ranked = list(summary["layer"])
    names = [str(rec["layer"]) for rec in run.meta.get("layers", [])]
    # The heatmap keeps model order; when there are too many layers it shows the most
    # anomalous ones (by max z), still in model order.
    keep = set(ranked[:MAX_HEATMAP_LAYERS])
    heat_layers = [n for n in names if n in keep]
    distributed = ranked[:MAX_DISTRIBUTION_LAYERS]
    page = _environment().get_template("report.html.j2")
    return page.render(
        title=run_name(source),
        source=source,
        header=_header(run),
        advice=_advice(run, advise(run.meta, run.steps, run.layers, run.events)),
        warmup=_warmup(run),
        global_norm=plot_global_norm(run),
        loss=plot_loss(run),
        update_ratio=plot_update_ratio(run),
        heatmap=_heatmap(run, names, heat_layers),
        actions=plot_actions(run),
        layers=_layer_table(run, summary),
        distributions={"layers": len(distributed),
                       "plot": plot_distributions(run, distributed)},
        events=_events(run),
    )


def run_name(source: str) -> str:
    """The name of the run recorded in the directory ``source``: the directory's name.

    The path is made absolute first (without following links), so ``"."``, ``".."``
    or ``"runs/x/"`` name the directory they point at. ``"run"`` when there is no
    ``source``.
    """
    if not source:
        return "run"
    return Path(os.path.abspath(source)).name or source


@functools.cache
def _environment() -> jinja2.Environment:
    """The Jinja2 environment of the report templates (made once, then shared)."""
    # Imported at the first page rendered, like matplotlib, so that importing
    # gradwatch.report costs nothing for the text summary and the table export.
    import jinja2

    return jinja2.Environment(
        # Found through the package, so it works from a wheel as well as a checkout.
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        finalize=_escape,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails instead of vanishing
        trim_blocks=True,  # a line that holds only a tag leaves no line behind
        lstrip_blocks=True,
    )


def _escape(value: Any) -> Any:
    """Every value a template prints, escaped as :func:`html.escape` does it.

    Autoescaping alone would write ``"`` and ``'`` as markupsafe does (``&#34;``,
    ``&#39;``); the page has always had ``&quot;`` and ``&#x27;``, which tests and
    readers of saved reports match. A value escaped here comes back as markup, which
    autoescaping leaves alone, so it is escaped exactly once. Markup (a macro's
    output) passes through untouched.
    """
    from markupsafe import Markup

    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


def _fmt(value: Any) -> str:
    """A configuration or evidence value as text (floats to 4 significant digits)."""
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


def _header(run: RunData) -> dict[str, Any]:
    """The status, the facts at a glance and the configuration."""
    meta, s = run.meta, run_summary(run)
    a = s["actions"]
    facts = [
        ("steps", s["steps"], f"steps {s['first_step']}..{s['last_step']}"
         if s["steps"] else "none recorded"),
        ("layers", s["layers"], f"granularity {meta.get('config', {}).get('granularity')}"),
        ("clip", s["clip"], f"{s['sessions']} session(s)"),
        ("clip rate", f"{s['clip_rate']:.2%}", f"norm {a['clip_norm']}, value {a['clip_value']}"),
        ("skipped", a["skip"], f"{s['skip_rate']:.2%} of steps"),
    ] + [(EVENT_STYLE[k][2], v, "events") for k, v in s["events"].items()]
    config = dict(meta.get("config", {}))
    config["per-layer z threshold"] = meta.get("layer_z_threshold")
    config["per-layer clip z"] = meta.get("layer_clip_z")
    return {
        "status": s["status"],
        "error": s["error"],
        "version": s["gradwatch_version"],
        "created": s["created"],
        "facts": [{"label": k, "value": v, "detail": d} for k, v, d in facts],
        "config": [(k, _fmt(v)) for k, v in config.items()],
    }


def _warmup(run: RunData) -> dict[str, int] | None:
    """The warm-up shaded on the plots over steps (``None``: none in the record)."""
    span = warmup_span(run)
    if span is None:
        return None
    return {"first": span[0], "last": span[1] - 1,
            "steps": int(run.meta["config"]["warmup_steps"])}


def _advice(run: RunData, advice: list[Advice]) -> dict[str, Any]:
    """What :func:`gradwatch.advice.advise` found, and the checks it ran."""
    from ..advice import CHECKS

    return {
        "found": [
            {"rule": a.rule, "title": a.title, "detail": a.detail,
             "evidence": [(k.replace("_", " "), _fmt(v)) for k, v in a.evidence.items()]}
            for a in advice
        ],
        "checks": CHECKS,
        "steps": len(run.steps),
        "events": len(run.events),
    }


def _heatmap(run: RunData, names: list[str], shown: list[str]) -> dict[str, Any]:
    """The layers x steps plots (``relative`` is ``None`` without layer records)."""
    n_steps = run.layers["step"].nunique() if len(run.layers) else 0
    return {
        "steps": n_steps,
        "columns": (len(bin_starts(n_steps, MAX_HEATMAP_COLUMNS))
                    if n_steps > MAX_HEATMAP_COLUMNS else None),
        "shown": len(shown),
        "layers": len(names),
        "absolute": plot_heatmap(run, shown),
        "relative": (plot_heatmap(run, shown, relative=True)
                     if shown and len(run.layers) else None),
    }


def _layer_table(run: RunData, summary: pd.DataFrame) -> dict[str, Any]:
    """The most anomalous layers, one row each (no rows without layer records)."""
    shown = summary.head(MAX_TABLE_LAYERS)
    return {
        "total": len(summary),
        "z_event": _fmt(run.meta.get("layer_z_threshold")),
        "z_clip": _fmt(run.meta.get("layer_clip_z")),
        "rows": [
            {"layer": r.layer,
             "numbers": [_num(r.max_z, ".2f"), _int(r.max_z_step), str(int(r.flagged)),
                         str(int(r.norm_clips)), str(int(r.value_clips)),
                         _num(r.typical_norm, ".3g"), _num(r.max_norm, ".3g"),
                         _int(r.max_norm_step), str(int(r.nonfinite))]}
            for r in shown.itertuples()
        ],
    }


def _events(run: RunData) -> dict[str, Any]:
    """The first ``MAX_EVENT_ROWS`` events, one row each, and how many there are.

    An event's layers cell names the first ``MAX_EVENT_LAYERS`` layers and counts the
    rest; ``layers_cut`` says whether any row was shortened so.
    """
    ev = run.events
    shown = ev.head(MAX_EVENT_ROWS)
    return {
        "count": len(ev),
        "layer_limit": MAX_EVENT_LAYERS,
        "layers_cut": any(len(_layer_names(layers)) > MAX_EVENT_LAYERS
                          for layers in shown["layers"].astype(str)),
        "rows": [
            {"step": int(r.step), "kind": str(r.kind), "action": str(r.action),
             "layers": _layer_list(str(r.layers)), "z": _num(r.z, "+.2f"),
             "global_norm": _num(r.global_norm, ".3g"), "threshold": _num(r.threshold, ".3g"),
             "reason": str(r.reason)}
            for r in shown.itertuples()
        ],
    }


def _layer_list(layers: str, limit: int = MAX_EVENT_LAYERS) -> str:
    """An event's comma-joined ``layers`` as text: the first ``limit`` of them, then
    how many more (an event that involves every layer of a large model names 5)."""
    names = _layer_names(layers)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _layer_names(layers: str) -> list[str]:
    """The names in an event's comma-joined ``layers`` (none for a model-level event)."""
    return [n for n in layers.split(",") if n]
