"""The in-memory history of a monitor: the step rows that reached the host, as NumPy
chunks, the events among them, and the pandas tables built from both.

pandas is imported only when a table is asked for.
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from typing import Any

import numpy as np

from .events import EVENT_COLUMNS, EventDecoder
from .rows import ACTIONS, RowLayout


class StepHistory:
    """Rows as NumPy chunks, and events.

    Args:
        layout: row layout.
        layer_names: names of the layers, aligned with the per-layer blocks.
        decoder: reads the events out of new rows.
        limit: keep at most this many steps (oldest dropped); ``None`` for all.
    """

    def __init__(
        self,
        layout: RowLayout,
        layer_names: Sequence[str],
        decoder: EventDecoder,
        limit: int | None,
    ) -> None:
        self.layout = layout
        self.layer_names = list(layer_names)
        self.decoder = decoder
        self.limit = limit
        self.steps: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.events: list[dict[str, Any]] = []
        self._events_dropped = False

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
        new = [ev for step, row in zip(steps, rows)
               for ev in self.decoder.events_of(int(step), row)]
        self.events.extend(new)
        if self.limit is not None:
            self._bound_events()
        return new

    def _bound_events(self) -> None:
        """Events of the steps kept only, and at most ``limit`` of them: a run that
        raises an event every step does not grow without end either."""
        oldest = int(self.steps[0][0]) if self.steps and len(self.steps[0]) else None
        keep = [ev for ev in self.events if oldest is None or ev["step"] >= oldest]
        keep = keep[-self.limit:]
        if len(keep) < len(self.events) and not self._events_dropped:
            self._events_dropped = True
            warnings.warn(
                f"gradwatch: history_limit={self.limit} also bounds the events kept in "
                "memory: those of older steps are dropped from monitor.events() (the run "
                "record on disk and the reporters got them all)",
                stacklevel=5,
            )
        self.events = keep

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


_BOOL_STEP_FIELDS = ("explosion", "nonfinite", "amp", "skip_z", "drift", "bounding")


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
