"""Reports of a recorded run: one self-contained HTML page, or the tables as files.

``export_report(run_dir, "report.html")`` reads a run directory
(:mod:`gradwatch.run_record`) and writes one HTML file that needs nothing else: the
plots are PNGs embedded as ``data:`` URIs, there is no script and no external
request, and every name and string from the record is escaped. It holds the global
norm over time, a layers x steps heatmap, the clipping timeline, the most anomalous
layers, per-layer distributions, the events and the advice of
:mod:`gradwatch.advice`. ``format="csv"`` or ``"parquet"`` writes the three tables
into a directory instead.

This module composes: the statistics were computed by the monitor, the advice by
:mod:`gradwatch.advice`. pandas, matplotlib and scipy are imported inside the
functions, so ``import gradwatch`` stays light.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .rows import ACTIONS
from .run_record import RunData, RunDirError, load_run

if TYPE_CHECKING:
    import pandas as pd

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
MAX_HEATMAP_COLUMNS = 400  # steps are binned (max per bin) down to this many columns
MAX_HEATMAP_LAYERS = 60
MAX_TABLE_LAYERS = 20
MAX_DISTRIBUTION_LAYERS = 12
MAX_EVENT_ROWS = 500
MAX_LINE_POINTS = 4000  # beyond this the global norm is drawn as a binned envelope
# Every plot over steps uses the same horizontal extent, so they line up on the page.
_LEFT, _RIGHT = 0.16, 0.86
EVENT_STYLE = {  # kind: (marker, colour, label)
    "explosion": ("^", "#d62728", "explosion"),
    "nonfinite": ("X", "#111111", "non-finite (NaN/Inf)"),
    "amp_overflow": ("v", "#ff7f0e", "AMP overflow"),
}
ACTION_COLOURS = {"none": "#c7c7c7", "clip_norm": "#1f77b4", "clip_value": "#9467bd",
                  "skip": "#d62728"}
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
        text = render_html(run, source=str(run_dir))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
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


# ---------------------------------------------------------------------- statistics
def layer_summary(run: RunData) -> pd.DataFrame:
    """One row per layer, most anomalous first.

    Columns: ``layer``, ``max_z`` and ``max_z_step``, ``flagged`` (steps beyond the
    event threshold), ``norm_clips`` (norm-clipped steps where this layer was beyond
    its clipping boundary), ``value_clips``, ``typical_norm`` (median),
    ``max_norm`` and ``max_norm_step``, ``nonfinite`` (steps with a NaN/Inf norm),
    ``steps`` (steps with a gradient). Sorted by ``max_z``, then ``flagged``.
    """
    import pandas as pd

    from .advice import layer_names, value_clipped

    names = layer_names(run.meta)
    lay = run.layers
    columns = ["layer", "max_z", "max_z_step", "flagged", "norm_clips", "value_clips",
               "typical_norm", "max_norm", "max_norm_step", "nonfinite", "steps"]
    if lay.empty or not names:
        return pd.DataFrame(columns=columns)
    clip_z = float(run.meta.get("layer_clip_z", run.meta.get("config", {}).get("clip_z", 2.5)))
    coef = run.steps.set_index("step")["coef"].astype(float) if len(run.steps) else None
    norm = lay["grad_norm"].to_numpy(dtype=float)
    z = lay["z"].to_numpy(dtype=float)
    finite = np.isfinite(norm)
    step_coef = (
        coef.reindex(lay["step"]).to_numpy(dtype=float) if coef is not None
        else np.ones(len(lay))
    )
    frame = pd.DataFrame({
        "layer": pd.Categorical(lay["layer"].astype(str), categories=names),
        "step": lay["step"].to_numpy(),
        "z": np.where(np.isfinite(z), z, np.nan),
        "norm": np.where(finite, norm, np.nan),
        "flagged": lay["flagged"].astype(bool).to_numpy(),
        "norm_clip": (step_coef < 1.0) & (z > clip_z),
        "value_clip": value_clipped(lay),
        "nonfinite": ~finite,
    })
    g = frame.groupby("layer", observed=False)
    out = pd.DataFrame({
        "max_z": g["z"].max(),
        "flagged": g["flagged"].sum(),
        "norm_clips": g["norm_clip"].sum(),
        "value_clips": g["value_clip"].sum(),
        "typical_norm": g["norm"].median(),
        "max_norm": g["norm"].max(),
        "nonfinite": g["nonfinite"].sum(),
        "steps": g["step"].count(),
    })
    out["max_z_step"] = _step_of(frame, "z")
    out["max_norm_step"] = _step_of(frame, "norm")
    out = out.reset_index()
    out["layer"] = out["layer"].astype(str)
    out = out[out["steps"] > 0]
    out = out.sort_values(["max_z", "flagged"], ascending=False, na_position="last",
                          kind="stable")
    return out[columns].reset_index(drop=True)


def _step_of(frame: pd.DataFrame, column: str) -> pd.Series:
    """The step at which each layer's ``column`` is largest (layers without one absent)."""
    import pandas as pd

    valid = frame[frame[column].notna()]
    best = valid.groupby("layer", observed=True)[column].idxmax()
    return pd.Series(frame.loc[best.to_numpy(), "step"].to_numpy(), index=best.index)


def run_summary(run: RunData) -> dict[str, Any]:
    """The run at a glance: status, steps, actions, clip rate, events by kind."""
    meta, steps, events = run.meta, run.steps, run.events
    n = len(steps)
    actions = steps["action"].astype(str).value_counts() if n else {}
    counts = {a: int(actions.get(a, 0)) for a in ACTIONS}
    kinds = events["kind"].astype(str).value_counts() if len(events) else {}
    return {
        "status": meta.get("status", "unknown"),
        "error": meta.get("error"),
        "created": meta.get("created", ""),
        "gradwatch_version": meta.get("gradwatch_version", ""),
        "sessions": len(meta.get("sessions", [])),
        "layers": len(meta.get("layers", [])),
        "clip": meta.get("config", {}).get("clip", ""),
        "steps": n,
        "first_step": int(steps["step"].min()) if n else None,
        "last_step": int(steps["step"].max()) if n else None,
        "actions": counts,
        "clip_rate": (counts["clip_norm"] + counts["clip_value"]) / n if n else 0.0,
        "skip_rate": counts["skip"] / n if n else 0.0,
        "events": {k: int(kinds.get(k, 0)) for k in EVENT_STYLE},
    }


# ---------------------------------------------------------------------- text summary
def summary_text(run: RunData, source: str = "", top: int = 10) -> str:
    """A plain-text table for the terminal (what ``gradwatch summary`` prints)."""
    s = run_summary(run)
    span = f" (steps {s['first_step']}..{s['last_step']})" if s["steps"] else ""
    a = s["actions"]
    lines = [
        f"run          {_printable(source)}",
        f"status       {s['status']}"
        + (f" ({_printable(str(s['error']))})" if s["error"] else "")
        + f", {s['sessions']} session(s), gradwatch "
        f"{s['gradwatch_version']}, created {s['created']}",
        f"steps        {s['steps']}{span}, {s['layers']} layer(s), clip={s['clip']!r}",
        f"clip rate    {s['clip_rate']:.2%} (norm {a['clip_norm']}, value {a['clip_value']}), "
        f"skipped {a['skip']} ({s['skip_rate']:.2%})",
        "events       " + ", ".join(f"{k} {v}" for k, v in s["events"].items()),
    ]
    table = layer_summary(run).head(top)
    if len(table):
        head = ("layer", "max z", "at step", "flagged", "norm clips", "value clips",
                "typical norm", "max norm", "non-finite")
        rows = [
            (_ellipsis(_printable(r.layer), 40), _num(r.max_z, ".2f"), _int(r.max_z_step),
             str(int(r.flagged)), str(int(r.norm_clips)), str(int(r.value_clips)),
             _num(r.typical_norm, ".3g"), _num(r.max_norm, ".3g"), str(int(r.nonfinite)))
            for r in table.itertuples()
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

        def fmt(cells: Any) -> str:  # the name column left-aligned, numbers right
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines += ["", f"worst layers by max z (top {len(table)} of {s['layers']}):",
                  fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(lines)


def _num(value: Any, spec: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, spec)


def _int(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else str(int(value))


def _printable(text: str) -> str:
    """A layer name safe to print on a terminal (no escape sequences, one line)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _ellipsis(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


# ---------------------------------------------------------------------- plots
def _png(fig: Any) -> str:
    """A figure as a ``data:`` URI (Agg canvas, no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bin_starts(n: int, max_bins: int) -> np.ndarray:
    """Start indices of at most ``max_bins`` bins of nearly equal size over ``n`` items."""
    bins = max(1, min(n, max_bins))
    return np.unique(np.linspace(0, n, bins + 1)[:-1].astype(np.int64))


def bin_max(matrix: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Downsample the columns of ``matrix`` to at most ``max_cols`` by a NaN-ignoring max.

    Returns:
        The binned matrix and the start column of each bin.
    """
    starts = bin_starts(matrix.shape[1], max_cols)
    if matrix.shape[1] == 0:
        return matrix, starts[:0]
    return np.fmax.reduceat(matrix, starts, axis=1), starts


def _plot_global_norm(run: RunData) -> str | None:
    from matplotlib.figure import Figure

    steps = run.steps
    if steps.empty:
        return None
    x = steps["step"].to_numpy(dtype=float)
    y = steps["global_norm"].to_numpy(dtype=float)
    ok = np.isfinite(y) & (y > 0)
    fig = Figure(figsize=(12, 4.2))
    ax = fig.add_subplot()
    if ok.sum() > MAX_LINE_POINTS:
        xs, ys = x[ok], y[ok]
        starts = bin_starts(len(xs), MAX_LINE_POINTS // 2)
        ax.fill_between(xs[starts], np.minimum.reduceat(ys, starts),
                        np.maximum.reduceat(ys, starts), color="#1f77b4", alpha=0.35, lw=0,
                        label="global norm (min-max per bin)")
    elif ok.any():
        ax.plot(x[ok], y[ok], color="#1f77b4", lw=0.8, label="global norm (before clipping)")
    clipped = steps["clipped_norm"].to_numpy(dtype=float)
    cut = ok & np.isfinite(clipped) & (clipped < y * (1 - 1e-4)) & (clipped > 0)
    if cut.any():
        ax.scatter(x[cut], clipped[cut], s=8, color="#2ca02c", zorder=3, label="after clipping")
    typical = steps["typical_norm"].to_numpy(dtype=float)
    if np.isfinite(typical).any():
        ax.plot(x, typical, color="#7f7f7f", lw=1, ls=":", label="typical norm (running)")
    clip_mode = run.meta.get("config", {}).get("clip")
    thr = steps["threshold"].to_numpy(dtype=float)
    if clip_mode not in ("value", "agc") and (np.isfinite(thr) & (thr > 0)).any():
        ax.plot(x, np.where(thr > 0, thr, np.nan), color="#d62728", lw=1, ls="--",
                label="clipping threshold")
    by_step = dict(zip(steps["step"].to_numpy(), y))
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for kind, (marker, colour, label) in EVENT_STYLE.items():
        ev = run.events[run.events["kind"] == kind]
        if ev.empty:
            continue
        ex = ev["step"].to_numpy(dtype=float)
        ey = np.array([by_step.get(s, np.nan) for s in ev["step"].to_numpy()], dtype=float)
        on = np.isfinite(ey) & (ey > 0)
        label = f"{label} ({len(ev)})"
        if on.any():
            ax.scatter(ex[on], ey[on], marker=marker, s=60, color=colour, zorder=4,
                       edgecolors="white", linewidths=0.6, label=label)
            label = None
        if (~on).any():  # NaN/Inf norm: mark at the top edge
            ax.scatter(ex[~on], np.full((~on).sum(), 0.97), marker=marker, s=60,
                       color=colour, transform=top, zorder=4, clip_on=False, label=label)
    if ok.any():
        ax.set_yscale("log")
    ax.set_xlim(x.min(), x.max() + 1)  # the same step axis as the plots below
    ax.set_xlabel("step")
    ax.set_ylabel("L2 norm of all gradients")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8,
              frameon=False)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=0.13, top=0.84)
    return _png(fig)


def _layer_matrix(
    run: RunData, layers: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log10 gradient norms, ``layers`` x steps (NaN where absent or non-finite), a mask
    of the non-finite cells, and the steps of the columns."""
    lay = run.layers
    lay = lay[lay["layer"].astype(str).isin(layers)]
    all_steps = np.unique(run.layers["step"].to_numpy())
    row = {name: i for i, name in enumerate(layers)}
    r = lay["layer"].astype(str).map(row).to_numpy()
    c = np.searchsorted(all_steps, lay["step"].to_numpy())
    norm = lay["grad_norm"].to_numpy(dtype=float)
    values = np.full((len(layers), len(all_steps)), np.nan)
    bad = np.zeros_like(values, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        values[r, c] = np.where(np.isfinite(norm) & (norm > 0), np.log10(norm), np.nan)
    bad[r, c] = ~np.isfinite(norm)
    return values, bad, all_steps


def _plot_heatmap(run: RunData, shown: list[str], relative: bool = False) -> str | None:
    """Layers x steps of log10 norm; ``relative``: minus each layer's median log10 norm,
    so a layer's anomalies show whatever its scale."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if run.layers.empty or not shown:
        return None
    values, bad, all_steps = _layer_matrix(run, shown)
    if relative:
        with warnings.catch_warnings():  # a layer with no finite norm has no median
            warnings.simplefilter("ignore", RuntimeWarning)
            values = values - np.nanmedian(values, axis=1, keepdims=True)
    binned, starts = bin_max(values, MAX_HEATMAP_COLUMNS)
    bad_binned = np.maximum.reduceat(bad, starts, axis=1) if len(starts) else bad
    edges = np.append(all_steps[starts], all_steps[-1] + 1)
    finite = binned[np.isfinite(binned)]
    if relative:
        # Symmetric around "typical", at least one decade each way.
        span = max(1.0, float(np.percentile(np.abs(finite), 99.5))) if finite.size else 1.0
        lo, hi, name = -span, span, "RdBu_r"
    else:
        # Robust limits: a few extreme cells must not flatten everything else.
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        name = "viridis"
    fig = Figure(figsize=(12, max(2.6, 0.2 * len(shown) + 1.4)))
    ax = fig.add_subplot()
    cmap = colormaps[name].with_extremes(bad="#e5e5e5")
    mesh = ax.pcolormesh(edges, np.arange(len(shown) + 1), np.ma.masked_invalid(binned),
                         cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6), shading="flat",
                         rasterized=True)
    if bad_binned.any():
        ax.pcolormesh(edges, np.arange(len(shown) + 1),
                      np.ma.masked_where(~bad_binned, np.ones_like(binned)),
                      cmap=ListedColormap(["#d62728"]), shading="flat", rasterized=True)
    ax.set_ylim(len(shown), 0)
    ax.set_yticks(np.arange(len(shown)) + 0.5)
    ax.set_yticklabels([_ellipsis(_printable(n), 40) for n in shown],
                       fontsize=7 if len(shown) > 30 else 8)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)  # a '$' in a layer name is not mathtext
    ax.set_xlabel("step")
    bottom = max(0.5 / fig.get_figheight(), 0.06)
    top = 1 - 0.25 / fig.get_figheight()
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=bottom, top=top)
    cax = fig.add_axes((_RIGHT + 0.012, bottom, 0.012, top - bottom))
    extend = "neither"
    if finite.size:
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
                  (True, True): "both"}[(bool(finite.min() < lo), bool(finite.max() > hi))]
    fig.colorbar(mesh, cax=cax, extend=extend).set_label(
        "log10 (norm / layer median)" if relative else "log10 norm", fontsize=8)
    return _png(fig)


def _plot_actions(run: RunData) -> str | None:
    from matplotlib.figure import Figure

    steps = run.steps
    if steps.empty:
        return None
    x = steps["step"].to_numpy()
    order = np.argsort(x, kind="stable")
    x = x[order]
    action = steps["action"].astype(str).to_numpy()[order]
    starts = bin_starts(len(x), 1500)
    edges = np.append(x[starts], x[-1] + 1)
    fig = Figure(figsize=(12, 2.2))
    ax = fig.add_subplot()
    labels = []
    for row, name in enumerate(ACTIONS):
        hit = np.maximum.reduceat((action == name).astype(np.int8), starts) > 0
        labels.append(f"{name} ({int((action == name).sum())})")
        if not hit.any():
            continue
        # Runs of consecutive bins with this action, drawn as bars.
        padded = np.concatenate([[0], hit.astype(np.int8), [0]])
        begin = np.flatnonzero(np.diff(padded) == 1)
        end = np.flatnonzero(np.diff(padded) == -1)
        spans = [(edges[b], max(edges[e] - edges[b], 0.6)) for b, e in zip(begin, end)]
        ax.broken_barh(spans, (row - 0.35, 0.7), color=ACTION_COLOURS[name])
    ax.set_yticks(range(len(ACTIONS)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(ACTIONS) - 0.5, -0.5)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("step")
    ax.grid(True, axis="x", alpha=0.3)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=0.25, top=0.95)
    return _png(fig)


def _horizontal() -> dict[str, Any]:
    """Keywords for a horizontal violin/box plot (``vert`` is deprecated from 3.10)."""
    import matplotlib

    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _plot_distributions(run: RunData, layers: list[str]) -> str | None:
    from matplotlib.figure import Figure

    if run.layers.empty or not layers:
        return None
    lay = run.layers
    layer_col = lay["layer"].astype(str)
    data, names = [], []
    for name in layers:
        v = lay.loc[layer_col == name, "grad_norm"].to_numpy(dtype=float)
        v = v[np.isfinite(v) & (v > 0)]
        if len(v):
            data.append(np.log10(v))
            names.append(name)
    if not data:
        return None
    fig = Figure(figsize=(12, max(2.4, 0.42 * len(data) + 1.0)))
    ax = fig.add_subplot()
    parts = ax.violinplot(data, showextrema=False, widths=0.8, **_horizontal())
    for body in parts["bodies"]:
        body.set_facecolor("#1f77b4")
        body.set_alpha(0.25)
    ax.boxplot(data, widths=0.25, **_horizontal(), showfliers=True,
               flierprops={"markersize": 3, "markeredgecolor": "#d62728"},
               medianprops={"color": "#111111"})
    ax.set_yticks(np.arange(1, len(names) + 1))
    ax.set_yticklabels([_ellipsis(_printable(n), 40) for n in names], fontsize=8)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_ylim(len(names) + 0.6, 0.4)
    ax.set_xlabel("log10 gradient norm")
    ax.grid(True, axis="x", alpha=0.3)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=max(0.55 / fig.get_figheight(), 0.08),
                        top=1 - 0.2 / fig.get_figheight())
    return _png(fig)


# ---------------------------------------------------------------------- HTML
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
    from .advice import advise

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
    from .advice import CHECKS

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
        _img(_plot_global_norm(run), "global gradient norm over steps"),
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
        _img(_plot_heatmap(run, shown), "heatmap of log10 gradient norm per layer"),
    ]
    if shown and len(run.layers):
        parts.append(
            "<details><summary>The same, relative to each layer's median (shows a layer's "
            "anomalies whatever its scale)</summary>"
            + _img(_plot_heatmap(run, shown, relative=True),
                   "heatmap of log10 gradient norm relative to each layer's median")
            + "</details>"
        )
    return "\n".join(parts)


def _html_actions(run: RunData) -> str:
    return "\n".join([
        '<h2 id="clipping">Clipping actions</h2>',
        '<p class="note">What the monitor did at each step (bins of consecutive steps on '
        "long runs; a bar means the action happened in that bin).</p>",
        _img(_plot_actions(run), "clipping action per step"),
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
        _img(_plot_distributions(run, layers), "distribution of log10 gradient norm"),
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
