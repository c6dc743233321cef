"""Run totals: how many steps, what was done, what was seen, and the worst of it.

The one place these are computed. :class:`RunTotals` is filled either as the run goes,
chunk by chunk (the W&B summary), or at once from a recorded run's tables (the report
and ``gradwatch summary``); both give the same numbers for the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rows import ACTIONS, RowLayout

EVENT_KINDS = ("explosion", "drift", "nonfinite", "amp_overflow")


@dataclass
class RunTotals:
    """Totals over the steps seen so far.

    Attributes:
        steps: steps counted.
        actions: steps per action (``none``, ``clip_norm``, ``clip_value``, ``skip``).
        events: events per kind.
        max_global_norm: the largest finite global norm (0 if none).
        worst_z: the largest per-layer z-score of the log norm (``-inf`` if none).
        worst_layer: the layer it belongs to.
    """

    steps: int = 0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_KINDS, 0))
    max_global_norm: float = 0.0
    worst_z: float = -math.inf
    worst_layer: str = ""

    # ------------------------------------------------------------------ filling
    def add_steps(self, global_norm: np.ndarray, action: Iterable[str]) -> None:
        """Count steps: their pre-clip global norms and the actions taken."""
        global_norm = np.asarray(global_norm, dtype=float)
        self.steps += len(global_norm)
        for a in action:
            self.actions[str(a)] += 1
        finite = global_norm[np.isfinite(global_norm)]
        if len(finite):
            self.max_global_norm = max(self.max_global_norm, float(finite.max()))

    def add_layer_z(self, z: np.ndarray, layer: Sequence[str]) -> None:
        """Consider per-layer z-scores (``z[i]`` belongs to ``layer[i]``)."""
        z = np.asarray(z, dtype=float)
        ok = np.isfinite(z)
        if not ok.any():
            return
        i = int(np.argmax(np.where(ok, z, -np.inf)))
        if z[i] > self.worst_z:
            self.worst_z, self.worst_layer = float(z[i]), str(layer[i])

    def add_events(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            self.events[str(kind)] = self.events.get(str(kind), 0) + 1

    def add_rows(self, layout: RowLayout, layer_names: Sequence[str], rows: np.ndarray,
                 events: Iterable[dict[str, Any]]) -> None:
        """Count host rows (a :class:`~gradwatch.reporters.Chunk`'s) and their events."""
        rows = np.asarray(rows)
        if len(rows):
            codes = rows[:, layout.step["action"]].astype(np.int64)
            self.add_steps(rows[:, layout.step["global_norm"]], (ACTIONS[c] for c in codes))
            present = rows[:, layout.layer["present"]] > 0
            z = np.where(present, rows[:, layout.layer["z"]], np.nan)
            step_i, layer_i = np.nonzero(np.isfinite(z))
            self.add_layer_z(z[step_i, layer_i], [layer_names[j] for j in layer_i])
        self.add_events(e["kind"] for e in events)

    @classmethod
    def from_tables(cls, steps: Any, layers: Any, events: Any) -> RunTotals:
        """Totals of a recorded run's tables (see :func:`gradwatch.run_record.load_run`)."""
        totals = cls()
        if len(steps):
            totals.add_steps(steps["global_norm"].to_numpy(dtype=float),
                             steps["action"].astype(str))
        if len(layers):
            totals.add_layer_z(layers["z"].to_numpy(dtype=float),
                               layers["layer"].array)
        if len(events):
            totals.add_events(events["kind"].astype(str))
        return totals

    # ------------------------------------------------------------------ reading
    @property
    def clipped(self) -> int:
        """Steps clipped by norm or by value."""
        return self.actions["clip_norm"] + self.actions["clip_value"]

    @property
    def clip_rate(self) -> float:
        return self.clipped / self.steps if self.steps else 0.0

    @property
    def skip_rate(self) -> float:
        return self.actions["skip"] / self.steps if self.steps else 0.0
