"""A recorded run in numbers: per-layer statistics, run totals and the terminal table.

:func:`layer_summary` ranks the layers, :func:`run_summary` gives the run at a glance
and :func:`summary_text` is what ``gradwatch summary`` prints. pandas is imported
inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..advice._common import layer_positions
from ..totals import EVENT_KINDS, RunTotals

if TYPE_CHECKING:
    import pandas as pd

    from ..run_record import RunData
def layer_summary(run: RunData) -> pd.DataFrame:
    """One row per layer, most anomalous first.

    Columns: ``layer``, ``max_z`` and ``max_z_step``, ``flagged`` (steps beyond the
    event threshold), ``norm_clips`` (norm-clipped steps where this layer was beyond
    its clipping boundary), ``value_clips``, ``typical_norm`` (median),
    ``max_norm`` and ``max_norm_step``, ``nonfinite`` (steps with a NaN/Inf norm),
    ``steps`` (steps with a gradient). Sorted by ``max_z``, then ``flagged``.
    """
    import pandas as pd

    from ..advice import layer_names, value_clipped

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
        "layer": pd.Categorical.from_codes(layer_positions(lay, names), categories=names),
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
    """The run at a glance: status, steps, actions, clip rate, events by kind.

    The counts come from :class:`~gradwatch.totals.RunTotals`, the one place run
    totals are computed, so they match the W&B summary of the same steps.

    Returns:
        ``status``, ``error``, ``created``, ``gradwatch_version``, ``sessions`` and
        ``layers`` (counts), ``clip`` (the mode) from the metadata; ``steps``,
        ``first_step`` and ``last_step`` (``None`` without steps), ``actions`` (steps
        per action), ``clip_rate`` and ``skip_rate`` (fractions of the steps) and
        ``events`` (count per kind) from the tables.
    """
    meta, steps = run.meta, run.steps
    totals = RunTotals.from_tables(steps, run.layers, run.events)
    n = totals.steps
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
        "actions": dict(totals.actions),
        "clip_rate": totals.clip_rate,
        "skip_rate": totals.skip_rate,
        "events": {k: totals.events.get(k, 0) for k in EVENT_KINDS},
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
    """``text`` cut at the end to at most ``width`` characters (the last one "…")."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut in the middle to at most ``width`` characters, its start and end kept.

    A layer name tells layers apart at both ends (``encoder.layers.11`` ...
    ``attn.out_proj``), so the cut goes in the middle, at dots where that keeps nearly
    as much (whole module names read better than halves of them), and each end keeps
    at least a quarter of the room: ``encoder.layers.11…attn.out_proj``.
    """
    if len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    room = width - 1  # one character for the ellipsis
    least = room // 4
    # A cut inside a module name costs this many characters of the score.
    penalty = 6
    # The lengths of the tails that start right after a dot.
    dots = [len(text) - i - 1 for i, c in enumerate(text) if c == "."]
    best: tuple[int, int, int, int] | None = None
    for h in range(least, room - least + 1):
        budget = room - h
        whole = max((t for t in dots if least <= t <= budget), default=None)
        for t, cost in ((budget, penalty), (whole, 0)):
            if t is None:
                continue
            cost += 0 if text[h] == "." else penalty
            score = (h + t - cost, -abs(h - t), h, t)
            if best is None or score > best:
                best = score
    _, _, h, t = best  # type: ignore[misc]
    return text[:h] + "\u2026" + text[len(text) - t:]
