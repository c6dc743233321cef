"""What every advice rule shares: the :class:`Advice` record, the significance level and
small helpers over a run record's tables."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# The significance level of the rules' tests (the recurrent rule's is looser).
ALPHA = 0.01

_RECURRENT_PARAM = re.compile(r"^(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?$")
# "lstm", "encoder_gru", "BiLSTM", "rnn0"; not a word that merely contains the letters.
_RECURRENT_NAME = re.compile(r"(?<![a-z])(bi)?(lstm|gru|rnn)", re.IGNORECASE)


@dataclass(frozen=True)
class Advice:
    """One piece of advice and the numbers behind it.

    Attributes:
        rule: which rule produced it (``first_layer``, ``value_clipping``, ``trend``,
            ``drift``, ``recurrent``, ``update_ratio_high``, ``update_ratio_dead``,
            ``nonfinite``, ``amp_overflow``).
        title: one line: what is wrong and what to do.
        detail: why, with the statistics quoted.
        evidence: the statistics, by name (plain Python numbers and strings).
    """

    rule: str
    title: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


def layer_names(meta: dict[str, Any]) -> list[str]:
    """Layer names in model order, from the layer table in ``meta``."""
    return [str(rec["layer"]) for rec in meta.get("layers", [])]


def layer_positions(layers: pd.DataFrame, names: list[str]) -> np.ndarray:
    """Each row's layer as its position in ``names`` (-1 where it is not there).

    A recorded layer column is categorical: its codes are mapped once per category,
    so a record of millions of rows makes no string per row."""
    import pandas as pd

    pos = {n: i for i, n in enumerate(names)}
    col = layers["layer"]
    if isinstance(col.dtype, pd.CategoricalDtype):
        table = np.array([pos.get(str(c), -1) for c in col.cat.categories] + [-1])
        return table[col.cat.codes.to_numpy()]  # code -1 (missing) -> the last, -1
    return np.array([pos.get(str(v), -1) for v in col], dtype=np.int64)


def layer_grid(layers: pd.DataFrame, names: list[str], column: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """``column`` as a steps x ``names`` grid (NaN where a layer has no row), and the
    steps of its rows, in order."""
    step = layers["step"].to_numpy()
    if len(step) and bool(np.all(step[1:] >= step[:-1])):  # as load_run returns it
        first = np.empty(len(step), dtype=bool)
        first[:1] = True
        first[1:] = step[1:] != step[:-1]
        steps, row = step[first], np.cumsum(first) - 1
    else:
        steps, row = np.unique(step, return_inverse=True)
    col = layer_positions(layers, names)
    grid = np.full((len(steps), len(names)), np.nan)
    keep = col >= 0
    grid[row[keep], col[keep]] = layers[column].to_numpy(dtype=float)[keep]
    return grid, steps


def value_clipped(layers: pd.DataFrame) -> np.ndarray:
    """Rows of the layer table where that layer was clipped by value at that step.

    A finite value threshold is the bound in force; it clipped if max |g| exceeded it.
    """
    thr = layers["value_threshold"].to_numpy(dtype=float)
    max_abs = layers["max_abs"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(thr) & (max_abs > thr)


def is_recurrent(rec: dict[str, Any]) -> bool:
    """Whether a layer (a record of ``meta['layers']``) is an RNN/LSTM/GRU layer."""
    params = [str(p).rpartition(".")[2] for p in rec.get("params", [])]
    if any(_RECURRENT_PARAM.match(p) for p in params):
        return True
    return any(_RECURRENT_NAME.search(part) for part in str(rec.get("layer", "")).split("."))


def _finite_positive(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & (values > 0)


def _g(x: float) -> float:
    """A float rounded to 4 significant digits, for evidence that reads well."""
    if not math.isfinite(x) or x == 0:
        return float(x)
    return float(f"{x:.4g}")


def _streaks(steps: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive step numbers, as (first, length)."""
    if len(steps) == 0:
        return []
    steps = np.unique(steps)
    breaks = np.flatnonzero(np.diff(steps) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(steps, breaks)]


def _names(values: list[str], limit: int = 3) -> str:
    quoted = [repr(v) for v in values[:limit]]
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(quoted) + more
