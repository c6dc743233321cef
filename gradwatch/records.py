"""Per-step records: buffered on the device, moved to the host in one transfer.

Each :meth:`GradMonitor.step` produces one fp32 row (a few step-level values, then a
block of values per layer). Rows are written into a device buffer; every
``log_every`` steps the filled part of the buffer crosses to the host in a single
copy, where it is kept as NumPy chunks and turned into events. pandas is imported
only when a table is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

ACTIONS = ("none", "clip_norm", "clip_value", "skip")
NONE, CLIP_NORM, CLIP_VALUE, SKIP = range(4)

STEP_FIELDS = (
    "global_norm",  # pre-clip L2 norm of all gradients
    "clipped_norm",  # after clipping
    "threshold",  # norm threshold in effect (value threshold in clip="value"); NaN if none
    "action",  # index into ACTIONS
    "explosion",  # 1.0 if any z-score exceeded z_threshold
    "nonfinite",  # 1.0 if any gradient held NaN/Inf
    "amp",  # 1.0 if a GradScaler is attached (non-finite steps are AMP overflows)
    "z",  # z-score of the model's log norm (0 during warm-up)
    "typical_norm",  # exp of the running mean of the model's log norm
    "coef",  # norm-clipping coefficient applied (1.0 = untouched)
    "skip_z",  # 1.0 if skipped because a z-score reached skip_threshold
)
LAYER_FIELDS = (
    "grad_norm",
    "clipped_norm",
    "z",
    "typical_norm",
    "norm_threshold",
    "max_abs",
    "concentration",
    "concentration_z",
    "value_threshold",
    "flagged",
    "present",
)


class RowLayout:
    """Column positions of one step's row for a model of ``num_layers`` layers."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.step = {name: i for i, name in enumerate(STEP_FIELDS)}
        base = len(STEP_FIELDS)
        self.layer = {
            name: slice(base + k * num_layers, base + (k + 1) * num_layers)
            for k, name in enumerate(LAYER_FIELDS)
        }
        self.width = base + len(LAYER_FIELDS) * num_layers

    def build(self, step_values: dict[str, Tensor], layer_values: dict[str, Tensor]) -> Tensor:
        """Concatenate the named 0-dim and per-layer tensors into one fp32 row."""
        parts = [step_values[n].reshape(1).to(torch.float32) for n in STEP_FIELDS]
        parts += [layer_values[n].to(torch.float32) for n in LAYER_FIELDS]
        return torch.cat(parts)


class HostRecord:
    """The host-side history of a monitor: rows as NumPy chunks, and events.

    Args:
        layout: row layout.
        layer_names: names of the layers, aligned with the per-layer blocks.
        config: the monitor config, for the thresholds quoted in event reasons.
        limit: keep at most this many steps (oldest dropped); ``None`` for all.
    """

    def __init__(
        self,
        layout: RowLayout,
        layer_names: Sequence[str],
        config: Any,
        limit: int | None,
    ) -> None:
        self.layout = layout
        self.layer_names = list(layer_names)
        self.config = config
        self.limit = limit
        self.steps: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.events: list[dict[str, Any]] = []
        self.skip_how = "optimizer step skipped"
        self.layer_z_threshold = float(config.z_threshold)

    def add(self, steps: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        """Store a chunk of rows; return the events it contains (also kept)."""
        self.steps.append(steps)
        self.rows.append(rows)
        if self.limit is not None:
            total = sum(len(s) for s in self.steps)
            while total - len(self.steps[0]) >= self.limit:
                total -= len(self.steps.pop(0))
                self.rows.pop(0)
            extra = total - self.limit
            if extra > 0:  # cut the oldest chunk so exactly `limit` steps remain
                self.steps[0] = self.steps[0][extra:]
                self.rows[0] = self.rows[0][extra:]
        new = [ev for step, row in zip(steps, rows) for ev in self._events_of(int(step), row)]
        self.events.extend(new)
        return new

    # ----------------------------------------------------------------- events
    def _events_of(self, step: int, row: np.ndarray) -> list[dict[str, Any]]:
        lay, cfg = self.layout, self.config
        s = {name: float(row[i]) for name, i in lay.step.items()}
        per = {name: row[sl] for name, sl in lay.layer.items()}
        action = ACTIONS[int(s["action"])]
        events = []
        if s["nonfinite"]:
            bad = np.flatnonzero((per["present"] > 0) & ~np.isfinite(per["grad_norm"]))
            names = [self.layer_names[i] for i in bad]
            where = _join(names) or "(model)"
            if s["amp"]:
                events.append(
                    self._event(
                        step, "amp_overflow", names, action,
                        f"NaN/Inf gradients under GradScaler in {where}: loss-scale overflow, "
                        "left for the scaler to skip and back off; statistics not updated",
                        s,
                    )
                )
            else:
                events.append(
                    self._event(
                        step, "nonfinite", names, action,
                        f"NaN/Inf gradients in {where}: {self.skip_how}; statistics not updated",
                        s,
                    )
                )
            return events
        if not s["explosion"]:
            return events
        z = per["z"]
        flagged = np.flatnonzero(per["flagged"] > 0)
        flagged = flagged[np.argsort(-z[flagged], kind="stable")]
        names = [self.layer_names[i] for i in flagged]
        parts = []
        if s["z"] > cfg.z_threshold:
            parts.append(
                f"model norm {s['global_norm']:.3g} vs typical {s['typical_norm']:.3g} "
                f"(log-norm z={s['z']:+.1f} > {cfg.z_threshold:g})"
            )
        for i in flagged[:3]:
            parts.append(
                f"layer {self.layer_names[i]!r} norm {per['grad_norm'][i]:.3g} vs typical "
                f"{per['typical_norm'][i]:.3g} (z={z[i]:+.1f} > {self.layer_z_threshold:.3g}, "
                f"concentration z={per['concentration_z'][i]:+.1f})"
            )
        if len(flagged) > 3:
            parts.append(f"and {len(flagged) - 3} more layer(s)")
        reason = "; ".join(parts) + ": " + self._what_was_done(action, s, per, flagged)
        if not names:  # only the model-level norm crossed: name the largest layer z
            order = np.argsort(-np.where(per["present"] > 0, z, -np.inf), kind="stable")
            names = [self.layer_names[order[0]]] if len(order) else []
        events.append(self._event(step, "explosion", names, action, reason, s))
        return events

    def _what_was_done(
        self, action: str, s: dict[str, float], per: dict[str, np.ndarray], flagged: np.ndarray
    ) -> str:
        cfg = self.config
        if action == "skip":
            how = self.skip_how
            if s["skip_z"]:
                return f"z reached skip_threshold={cfg.skip_threshold:g}, {how}"
            return how
        if action == "none":
            return f"clip={cfg.clip!r}, gradients left as they are"
        if action == "clip_value":
            valued = np.flatnonzero(np.isfinite(per["value_threshold"]))
            if cfg.clip == "auto":
                done = "outlier components (concentration far above normal) in " + ", ".join(
                    f"{self.layer_names[i]!r} clipped by value at "
                    f"{per['value_threshold'][i]:.3g}"
                    for i in valued[:3]
                )
            else:
                done = f"clipped by value at {cfg.clip_value:g}"
            if s["coef"] < 1.0:
                done += f", then the remaining growth clipped by norm (x{s['coef']:.3g})"
            return done
        if cfg.clip == "auto":
            return (
                f"diffuse growth (concentration normal): clipped by norm to "
                f"{s['clipped_norm']:.3g} (x{s['coef']:.3g}), direction preserved"
            )
        return f"clipped by norm to {s['clipped_norm']:.3g} (clip={cfg.clip!r})"

    def _event(
        self,
        step: int,
        kind: str,
        layers: list[str],
        action: str,
        reason: str,
        s: dict[str, float],
    ) -> dict[str, Any]:
        return {
            "step": step,
            "kind": kind,
            "layer": layers[0] if layers else "",
            "layers": ",".join(layers),
            "action": action,
            "reason": reason,
            "z": s["z"],
            "global_norm": s["global_norm"],
            "threshold": s["threshold"],
        }

    # ----------------------------------------------------------------- tables
    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.steps:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.layout.width), np.float32)
        return np.concatenate(self.steps), np.concatenate(self.rows)

    def step_table(self):
        return step_frame(self.layout, *self.stacked())

    def layer_table(self):
        return layer_frame(self.layout, self.layer_names, *self.stacked())

    def event_table(self):
        return event_frame(self.events)


EVENT_COLUMNS = ("step", "kind", "layer", "layers", "action", "reason", "z", "global_norm",
                 "threshold")
_BOOL_STEP_FIELDS = ("explosion", "nonfinite", "amp", "skip_z")


def step_frame(layout: RowLayout, steps: np.ndarray, rows: np.ndarray):
    """One row per step (pandas), from host rows."""
    import pandas as pd

    data: dict[str, Any] = {"step": steps}
    for name, i in layout.step.items():
        col = rows[:, i]
        if name == "action":
            data[name] = pd.Categorical.from_codes(col.astype(np.int64), categories=ACTIONS)
        elif name in _BOOL_STEP_FIELDS:
            data[name] = col > 0
        else:
            data[name] = col
    return pd.DataFrame(data)


def layer_frame(layout: RowLayout, layer_names: Sequence[str], steps: np.ndarray,
                rows: np.ndarray):
    """Long format, one row per (step, layer) where the layer had a gradient."""
    import pandas as pd

    present = rows[:, layout.layer["present"]] > 0  # (n, L)
    step_idx, layer_idx = np.nonzero(present)
    data: dict[str, Any] = {
        "step": steps[step_idx],
        "layer": pd.Categorical.from_codes(layer_idx, categories=list(layer_names)),
    }
    for name, sl in layout.layer.items():
        if name == "present":
            continue
        block = rows[:, sl][step_idx, layer_idx]
        data[name] = block > 0 if name == "flagged" else block
    return pd.DataFrame(data)


def event_frame(events: Sequence[dict[str, Any]]):
    """Events as a pandas DataFrame with a fixed set of columns."""
    import pandas as pd

    return pd.DataFrame(list(events), columns=list(EVENT_COLUMNS))


def _join(names: list[str], limit: int = 5) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


def nan_if_inf(t: Tensor) -> Tensor:
    """Replace +-inf by NaN (undefined thresholds are stored as NaN)."""
    return torch.where(torch.isinf(t), math.nan, t)
