"""The interface between a monitor and whatever reports its records.

A reporter sees the monitor's data only on the host, after the monitor's one transfer
every ``log_every`` steps, so reporting adds no device synchronisation. Reporters hold
no statistics of their own: everything they report was computed by the monitor.

A reporter that raises is isolated by :class:`ReporterSet`: the first failure of each
reporter is turned into a warning, training continues, and the other reporters (the
on-disk run record in particular) are unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .monitor import GradMonitor


@dataclass(frozen=True)
class Chunk:
    """Records of consecutive steps, just copied to the host.

    Attributes:
        steps: step numbers, shape ``(n,)``.
        rows: per-step rows, shape ``(n, width)``; see :class:`gradwatch.records.RowLayout`.
        events: the events among those steps (dicts with the ``events()`` columns).
        extras: values a reporter asked the monitor to compute on the device at some
            steps (for example gradient value histograms), keyed by name.
    """

    steps: np.ndarray
    rows: np.ndarray
    events: Sequence[dict[str, Any]]
    extras: dict[str, Any]


class Reporter(Protocol):
    """What a monitor calls; every method runs on the host."""

    def start(self, monitor: GradMonitor) -> None:
        """Called once, when the reporter is attached."""

    def report(self, monitor: GradMonitor, chunk: Chunk) -> None:
        """Called every ``log_every`` steps (and on flush) with the new records."""

    def close(self, monitor: GradMonitor) -> None:
        """Called once, on ``detach()`` or at interpreter exit."""


class ReporterSet:
    """Calls several reporters; a failing one warns once and never stops training."""

    def __init__(self, reporters: Sequence[Reporter] = ()) -> None:
        self.reporters: list[Reporter] = list(reporters)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.reporters)

    def call(self, method: str, monitor: GradMonitor, *args: Any) -> None:
        for reporter in self.reporters:
            try:
                getattr(reporter, method)(monitor, *args)
            except Exception as err:  # noqa: BLE001 - a reporter must never kill the run
                if id(reporter) not in self._warned:
                    self._warned.add(id(reporter))
                    warnings.warn(
                        f"gradwatch: {type(reporter).__name__}.{method} failed "
                        f"({type(err).__name__}: {err}); training continues and the other "
                        "reporters are unaffected. Further failures of this reporter are "
                        "not repeated.",
                        stacklevel=4,
                    )
