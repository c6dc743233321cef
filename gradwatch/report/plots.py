"""The report's figures: matplotlib plots rendered to PNG ``data:`` URIs.

Every plot over steps shares one horizontal extent, so the figures line up on the page.
matplotlib is imported inside the functions (on an Agg canvas, without pyplot and its
global state), so importing this module stays light.
"""

from __future__ import annotations

import base64
import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..advice._common import layer_grid, layer_positions
from ..rows import ACTIONS
from .summary import _middle_ellipsis, _printable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..run_record import RunData

MAX_HEATMAP_COLUMNS = 400  # steps are binned (max per bin) down to this many columns
MAX_LINE_POINTS = 4000  # beyond this the global norm is drawn as a binned envelope
MAX_LABEL_CHARS = 30  # a layer name on an axis is cut in the middle beyond this
# Every plot over steps uses the same horizontal extent, so they line up on the page.
_LEFT, _RIGHT = 0.16, 0.86
EVENT_STYLE = {  # kind: (marker, colour, label)
    "explosion": ("^", "#d62728", "explosion"),
    "drift": (">", "#8c564b", "drift (sustained rise)"),
    "nonfinite": ("X", "#111111", "non-finite (NaN/Inf)"),
    "amp_overflow": ("v", "#ff7f0e", "AMP overflow"),
}
ACTION_COLOURS = {"none": "#c7c7c7", "clip_norm": "#1f77b4", "clip_value": "#9467bd",
                  "skip": "#d62728"}
WARMUP_COLOUR = "#f2c14e"


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


def layer_labels(names: list[str], fontsize: float, room: float) -> list[str]:
    """Layer names as axis labels that fit: printable, cut in the middle (start and end
    kept) to at most ``MAX_LABEL_CHARS`` characters, and further until each is at most
    ``room`` points wide in ``fontsize`` (the width left of the axes).

    Args:
        names: the layer names.
        fontsize: the labels' font size, in points.
        room: the width they may take, in points.

    Returns:
        One label per name, in order.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    # Measured with the font the labels are drawn in, in points (independent of dpi).
    measure, prop = TextToPath(), FontProperties(size=fontsize)
    labels = []
    for name in names:
        text, width = _printable(name), MAX_LABEL_CHARS
        label = _middle_ellipsis(text, width)
        while (width > 8
               and measure.get_text_width_height_descent(label, prop, ismath=False)[0] > room):
            width -= 1
            label = _middle_ellipsis(text, width)
        labels.append(label)
    return labels


def _set_layer_ticks(fig: Figure, ax: Axes, names: list[str], fontsize: float) -> None:
    """Label the y ticks of ``ax`` with ``names``, shortened to fit left of the axes."""
    from matplotlib import rcParams

    # The room between the figure's edge and the axes, less the tick and its padding.
    room = (_LEFT * fig.get_figwidth() * 72 - rcParams["ytick.major.size"]
            - rcParams["ytick.major.pad"] - 2)
    ax.set_yticklabels(layer_labels(names, fontsize, room), fontsize=fontsize)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)  # a '$' in a layer name is not mathtext


def warmup_span(run: RunData) -> tuple[int, int] | None:
    """The warm-up steps the record holds, as ``(first, end)``, ``end`` excluded.

    The warm-up is the monitor's first ``config.warmup_steps`` steps (numbered from
    0), while it gathers the statistics a layer needs before the adaptive modes may
    flag or clip it.

    Returns:
        ``None`` when no step was recorded, the configuration has no
        ``warmup_steps``, or the record starts after the warm-up (a monitor restored
        from a checkpoint and recorded into a new directory).
    """
    config = run.meta.get("config")
    n = config.get("warmup_steps") if isinstance(config, dict) else None
    if run.steps.empty or not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    steps = run.steps["step"].to_numpy()
    first, last = int(steps.min()), int(steps.max())
    if first >= n:
        return None
    return first, min(n, last + 1)


def _shade_warmup(ax: Axes, span: tuple[int, int] | None) -> None:
    """Shade the warm-up on a plot over steps (step ``s`` spans ``[s, s + 1)``)."""
    if span is None:
        return
    first, end = span
    ax.axvspan(first, end, color=WARMUP_COLOUR, alpha=0.25, lw=0, zorder=0,
               label=f"warm-up (steps {first}..{end - 1})")


def plot_global_norm(run: RunData) -> str | None:
    """The global norm over steps, with the clipped norms, the threshold and the events.

    Returns:
        A PNG ``data:`` URI, or ``None`` when no step was recorded.
    """
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
    _shade_warmup(ax, warmup_span(run))
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


def plot_loss(run: RunData) -> str | None:
    """The training loss over steps, on the global norm's step axis, with the learning
    rate on a second axis where it was recorded.

    Returns:
        A PNG ``data:`` URI, or ``None`` when no loss was recorded (runs recorded
        before the loss was kept, or whose steps were not given one).
    """
    from matplotlib.figure import Figure

    steps = run.steps
    if steps.empty or "loss" not in steps:
        return None
    x = steps["step"].to_numpy(dtype=float)
    y = steps["loss"].to_numpy(dtype=float)
    ok = np.isfinite(y)
    if not ok.any():
        return None
    fig = Figure(figsize=(12, 3.2))
    ax = fig.add_subplot()
    xs, ys = x[ok], y[ok]
    if len(xs) > MAX_LINE_POINTS:
        starts = bin_starts(len(xs), MAX_LINE_POINTS // 2)
        ax.fill_between(xs[starts], np.minimum.reduceat(ys, starts),
                        np.maximum.reduceat(ys, starts), color="#ff7f0e", alpha=0.35, lw=0,
                        label="loss (min-max per bin)")
    else:
        ax.plot(xs, ys, color="#ff7f0e", lw=0.8, label="loss")
    # Log scale for a positive loss that falls over orders of magnitude.
    if (ys > 0).all() and ys.max() > 100 * ys.min():
        ax.set_yscale("log")
    _shade_warmup(ax, warmup_span(run))
    handles, labels = ax.get_legend_handles_labels()
    lr = steps["lr"].to_numpy(dtype=float) if "lr" in steps else np.full(len(x), np.nan)
    if np.isfinite(lr).any():
        ax2 = ax.twinx()
        line = ax2.plot(x, lr, color="#7f7f7f", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        handles += line
        labels += ["learning rate"]
    ax.set_xlim(x.min(), x.max() + 1)  # the global norm's step axis
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
              fontsize=8, frameon=False)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=0.16, top=0.86)
    return _png(fig)


MAX_RATIO_LINES = 8  # layers drawn one by one; the rest as the median and the range


def plot_update_ratio(run: RunData) -> str | None:
    """Each layer's update-to-weight ratio over the steps it was measured at (once per
    logging interval), log scale, with the 1e-3 rule of thumb. With many layers the
    ``MAX_RATIO_LINES`` farthest from 1e-3 are drawn one by one, the others as their
    median and range.

    Returns:
        A PNG ``data:`` URI, or ``None`` when no ratio was measured.
    """
    from matplotlib.figure import Figure

    lay = run.layers
    if lay.empty or "update_ratio" not in lay:
        return None
    lay = lay[np.isfinite(lay["update_ratio"].to_numpy(dtype=float))
              & (lay["update_ratio"].to_numpy(dtype=float) > 0)]
    if lay.empty:
        return None
    table = lay.pivot_table(index="step", columns="layer", values="update_ratio",
                            aggfunc="first", observed=True)
    far = (np.log10(table).median() + 3).abs().sort_values(ascending=False)
    shown = list(far.index[:MAX_RATIO_LINES])
    rest = [c for c in table.columns if c not in shown]
    fig = Figure(figsize=(12, 3.2))
    ax = fig.add_subplot()
    x = table.index.to_numpy(dtype=float)
    if rest:
        others = table[rest].to_numpy(dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step no other layer has
            ax.fill_between(x, np.nanmin(others, axis=1), np.nanmax(others, axis=1),
                            color="#c7c7c7", alpha=0.5, lw=0,
                            label=f"{len(rest)} other layers (range)")
            ax.plot(x, np.nanmedian(others, axis=1), color="#7f7f7f", lw=1,
                    label="their median")
    for name in shown:
        ax.plot(x, table[name].to_numpy(dtype=float), marker=".", ms=3, lw=0.8,
                label=_middle_ellipsis(_printable(str(name)), MAX_LABEL_CHARS))
    ax.axhline(1e-3, color="#111111", ls=":", lw=1.2, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    steps = run.steps["step"].to_numpy(dtype=float) if not run.steps.empty else x
    ax.set_xlim(steps.min(), steps.max() + 1)  # the global norm's step axis
    ax.set_xlabel("step")
    ax.set_ylabel("||dw|| / ||w||")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=0.16, top=0.95)
    return _png(fig)


def _layer_matrix(
    run: RunData, layers: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log10 gradient norms, ``layers`` x steps (NaN where absent or non-finite), a mask
    of the non-finite cells, and the steps of the columns."""
    # Absent cells are NaN in the grid; a recorded NaN or Inf norm is stored as inf,
    # so the two stay apart in one grid.
    lay = run.layers
    recorded = lay["grad_norm"].to_numpy(dtype=float)
    norms, all_steps = layer_grid(
        lay.assign(grad_norm=np.where(np.isfinite(recorded), recorded, np.inf)),
        layers, "grad_norm")
    norms = norms.T
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(np.isfinite(norms) & (norms > 0), np.log10(norms), np.nan)
    bad = np.isinf(norms)
    return values, bad, all_steps


def plot_heatmap(run: RunData, shown: list[str], relative: bool = False) -> str | None:
    """Layers x steps of log10 norm, steps binned by max down to ``MAX_HEATMAP_COLUMNS``.

    Args:
        run: the recorded run.
        shown: the layers to draw, top to bottom.
        relative: subtract each layer's median log10 norm, so a layer's anomalies show
            whatever its scale.

    Returns:
        A PNG ``data:`` URI, or ``None`` when there is no layer record or no layer.
    """
    fig = heatmap_figure(run, shown, relative)
    return None if fig is None else _png(fig)


def heatmap_figure(run: RunData, shown: list[str], relative: bool = False) -> Figure | None:
    """The figure of :func:`plot_heatmap` (same arguments), or ``None`` without one.

    Each layer's name labels its row, cut in the middle to fit left of the axes.
    """
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
    _set_layer_ticks(fig, ax, shown, fontsize=7 if len(shown) > 30 else 8)
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
    return fig


def plot_actions(run: RunData) -> str | None:
    """The action taken at each step, one row per action (bins of steps on long runs).

    Returns:
        A PNG ``data:`` URI, or ``None`` when no step was recorded.
    """
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


def plot_distributions(run: RunData, layers: list[str]) -> str | None:
    """Violin and box plots of the log10 gradient norm of ``layers``, one row each.

    Returns:
        A PNG ``data:`` URI, or ``None`` when none of them has a finite positive norm.
    """
    from matplotlib.figure import Figure

    if run.layers.empty or not layers:
        return None
    lay = run.layers
    position = layer_positions(lay, layers)
    norm = lay["grad_norm"].to_numpy(dtype=float)
    data, names = [], []
    for i, name in enumerate(layers):
        v = norm[position == i]
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
    _set_layer_ticks(fig, ax, names, fontsize=8)
    ax.set_ylim(len(names) + 0.6, 0.4)
    ax.set_xlabel("log10 gradient norm")
    ax.grid(True, axis="x", alpha=0.3)
    fig.subplots_adjust(left=_LEFT, right=_RIGHT, bottom=max(0.55 / fig.get_figheight(), 0.08),
                        top=1 - 0.2 / fig.get_figheight())
    return _png(fig)
