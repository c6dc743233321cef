"""One step's record as a row of fp32 values, and the one decoder of such a row.

Each :meth:`GradMonitor.step` writes one row: a few step-level values, then a block
of values per layer. The monitor keeps rows in a device buffer and moves them to the
host every ``log_every`` steps in one transfer; everything downstream (the in-memory
history, the run record, W&B and the Lightning loggers) reads them through
:class:`RowLayout`, and metrics for trackers through :func:`row_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a row is built, so reading rows needs none
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
    "z_limit",  # the model's event threshold (z_threshold calibrated to its tail)
    "drift",  # 1.0 if the drift test raised its alarm at this step
    "drift_steps",  # how many steps ago the rise began (at a drift alarm)
    "drift_growth",  # the model norm's estimated growth per step since then
    "bounding",  # 1.0 if the step is bounded (SGD-type optimizer, run unstable)
    # The training context, last so that older records hold a prefix of these columns:
    "loss",  # the loss passed to step(loss=...); NaN if none
    "lr",  # the learning rate of the optimizer's first parameter group; NaN if none
)
# Step fields added after the first run records were written: a record without them
# loads with NaN there (see gradwatch.run_record).
LATER_STEP_FIELDS = ("loss", "lr")
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
    "z_limit",
    "flagged",
    "present",
    # Added later (see LATER_LAYER_FIELDS):
    "update_ratio",  # ||dw|| / ||w|| of the optimizer step after this one; NaN if not measured
)
# Layer fields added after the first run records were written (NaN when loading those).
LATER_LAYER_FIELDS = ("update_ratio",)
# Step-level values that trackers receive as they are (the rest are flags or codes).
METRIC_FIELDS = ("global_norm", "clipped_norm", "threshold", "z", "typical_norm", "coef")
# The training context: sent only where recorded (NaN means "not given").
CONTEXT_FIELDS = ("loss", "lr")


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
        """Concatenate the named 0-dim and per-layer tensors into one fp32 row: two
        dispatched ops (a stack and a cat, which promote bool and integer fields to
        fp32 as they copy), not a reshape and a cast per field."""
        import torch

        steps = torch.stack([step_values[n] for n in STEP_FIELDS]).to(torch.float32)
        return torch.cat([steps, *(layer_values[n] for n in LAYER_FIELDS)]).to(torch.float32)

    def step_values(self, row: np.ndarray) -> dict[str, float]:
        """The step-level values of a host row, by name."""
        return {name: float(row[i]) for name, i in self.step.items()}

    def layer_values(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The per-layer blocks of a host row, by name."""
        return {name: row[sl] for name, sl in self.layer.items()}


def row_metrics(layout: RowLayout, layer_names: Sequence[str], row: np.ndarray,
                *, layer_norms: bool = True) -> dict[str, Any]:
    """A host row as the ``{key: value}`` metrics every tracker logs.

    Keys: ``global_norm``, ``clipped_norm``, ``threshold``, ``z``, ``typical_norm``,
    ``coef`` (floats); ``loss`` and ``lr`` (floats, only where recorded: a NaN there
    means none was given, and is left out); ``action`` (one of :data:`ACTIONS`);
    ``clipped``, ``skipped``, ``explosion``, ``nonfinite``, ``drift``, ``bounding`` (0 or
    1); ``grad_norm/<layer>`` for every layer with a gradient (unless ``layer_norms`` is
    false), ``update_ratio/<layer>`` where the update ratio was measured (one step in
    every ``log_every``) and ``flagged_z/<layer>`` for every layer beyond its event
    threshold.
    """
    s = layout.step_values(row)
    action = ACTIONS[int(s["action"])]
    out: dict[str, Any] = {name: s[name] for name in METRIC_FIELDS}
    out.update((name, s[name]) for name in CONTEXT_FIELDS if not math.isnan(s[name]))
    out["action"] = action
    out["clipped"] = int(action in ("clip_norm", "clip_value"))
    out["skipped"] = int(action == "skip")
    out["explosion"] = int(s["explosion"] > 0)
    out["nonfinite"] = int(s["nonfinite"] > 0)
    out["drift"] = int(s["drift"] > 0)
    out["bounding"] = int(s["bounding"] > 0)
    if layer_norms:
        norms = row[layout.layer["grad_norm"]]
        for j in np.flatnonzero(row[layout.layer["present"]] > 0):
            out[f"grad_norm/{layer_names[j]}"] = float(norms[j])
    ratio = row[layout.layer["update_ratio"]]
    for j in np.flatnonzero(np.isfinite(ratio)):
        out[f"update_ratio/{layer_names[j]}"] = float(ratio[j])
    z = row[layout.layer["z"]]
    for j in np.flatnonzero(row[layout.layer["flagged"]] > 0):
        out[f"flagged_z/{layer_names[j]}"] = float(z[j])
    return out


def nan_if_inf(t: Tensor) -> Tensor:
    """Replace +-inf by NaN (undefined thresholds are stored as NaN)."""
    import torch

    return torch.where(torch.isinf(t), math.nan, t)
