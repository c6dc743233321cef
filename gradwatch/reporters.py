"""The contract between a monitor and whatever reports its records.

A reporter (the run record, W&B, a Lightning logger bridge, one of your own) never sees
the monitor. It receives public values only:

* :class:`RunInfo` once, at ``start``: the layers, the config and the step the
  monitor is at;
* a :class:`Chunk` every ``log_every`` steps, at ``report``: the rows that just
  reached the host, decoded into ``{key: value}`` metrics on request
  (:meth:`Chunk.metrics`), and the events among them;
* ``close(error)`` once, on ``detach()`` or at interpreter exit.

Optional hooks: ``resumed(step)`` when the monitor was restored from a checkpoint,
``run_dir`` (where the reporter keeps its files, if anywhere), and device probes: a
reporter with ``probe_every`` set has its ``probe`` called inside ``step()`` every
that many steps, on the device and without synchronising, and finds the tensors it
returned in the next chunk's ``extras``, moved to the host in the monitor's one
transfer.

Reporting adds no device synchronisation, and reporters hold no statistics: they
report what the monitor computed. A reporter that raises is isolated by
:class:`ReporterSet`: its first failure is turned into a warning, training continues,
and the other reporters (the on-disk run record in particular) are unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .config import MonitorConfig
from .rows import ACTIONS, RowLayout, row_metrics

if TYPE_CHECKING:
    from torch import Tensor



class ReporterRefusal(Exception):
    """A reporter refuses to record this run at all (another run's record is where it
    was told to write): a configuration error, raised to the caller of
    ``monitor.step()`` instead of being downgraded to a warning like a failure
    during the run."""

class ActionCounts:
    """How many steps took each action so far: the cumulative ``actions/<action>``
    metrics every tracker gets beside a step's own."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(ACTIONS, 0)

    def add(self, action: str) -> dict[str, int]:
        """Count one step's ``action``; the counts as ``{"actions/<action>": n}``."""
        self.counts[action] += 1
        return {f"actions/{a}": n for a, n in self.counts.items()}


@dataclass(frozen=True)
class RunInfo:
    """What a reporter knows about the run from its start.

    Attributes:
        layer_names: the monitored layers, in model order.
        layers: one record per layer (``layer``, ``index``, ``params``, ``numel``,
            ``shapes``), as the run record stores it.
        config: the monitor's configuration.
        layer_z_threshold: the per-layer event threshold (``z_threshold`` raised for
            the number of layers).
        layer_clip_z: the per-layer clipping boundary, likewise.
        first_step: the monitor's step count when the reporter started (non-zero
            after a resume).
    """

    layer_names: tuple[str, ...]
    layers: list[dict[str, Any]]
    config: MonitorConfig
    layer_z_threshold: float
    layer_clip_z: float
    first_step: int


@dataclass
class Chunk:
    """Records of consecutive steps, just copied to the host.

    Attributes:
        steps: step numbers, shape ``(n,)``.
        rows: per-step rows, shape ``(n, layout.width)``.
        events: the events among those steps (dicts with the ``events()`` columns).
        extras: per step, the host copies of what reporters' probes returned.
        layout: the row layout.
        layer_names: the layers of the per-layer blocks.
    """

    steps: np.ndarray
    rows: np.ndarray
    events: Sequence[dict[str, Any]]
    extras: dict[int, dict[str, np.ndarray]]
    layout: RowLayout
    layer_names: tuple[str, ...]

    @cached_property
    def _decoded(self) -> list[dict[str, Any]]:
        return [row_metrics(self.layout, self.layer_names, row) for row in self.rows]

    def metrics(self, *, layer_norms: bool = True) -> list[dict[str, Any]]:
        """Each step's row as ``{key: value}`` (see :func:`gradwatch.rows.row_metrics`),
        decoded once per chunk whoever asks."""
        if layer_norms:
            return self._decoded
        return [{k: v for k, v in m.items() if not k.startswith("grad_norm/")}
                for m in self._decoded]


@dataclass(frozen=True)
class ProbeInput:
    """What a reporter's device probe reads at a step, all on the device.

    Attributes:
        grads: the gradients present at the step, before clipping (local shards
            under FSDP). Read them; do not modify them.
        grad_layers: the layer index of each gradient.
        layer_max_abs: per-layer max |g|, shape ``(L,)``.
        recent_log_norms: the natural-log norm of each layer over the recent window,
            shape ``(L, window)``, NaN where a layer had none.
    """

    grads: Sequence[Tensor]
    grad_layers: tuple[int, ...]
    layer_max_abs: Tensor
    recent_log_norms: Tensor


class Reporter(Protocol):
    """What a monitor calls; every method runs on the host.

    ``start``, ``report`` and ``close`` are required. The rest are optional hooks: a
    reporter that subclasses ``Reporter`` inherits their defaults (do nothing), and a
    reporter that merely has the three required methods works the same, since the
    monitor calls an optional hook only where it exists.
    """

    #: Where the reporter keeps its files (the run record's directory), if anywhere;
    #: ``GradMonitor.run_dir`` reads it.
    run_dir: Any = None
    #: Call :meth:`probe` at every step that is a multiple of this; ``None``: never.
    probe_every: int | None = None

    def start(self, run: RunInfo) -> None:
        """Called once, when the reporter is added. Raising here is a configuration
        error: the monitor is not built. A failure that is no fault of the
        configuration (a service that cannot be reached, a login that expired) should
        warn and leave the reporter silent instead, as the W&B reporter does."""

    def report(self, chunk: Chunk) -> None:
        """Called every ``log_every`` steps (and on flush) with the new records."""

    def close(self, error: str | None) -> None:
        """Called once, on ``detach()`` or at interpreter exit. ``error`` is the type
        name of the uncaught exception ending the program, if one is."""

    def resumed(self, step: int) -> None:  # noqa: B027 - an optional hook
        """Optional: the monitor was restored from a checkpoint and continues at
        ``step``."""

    def probe(self, inputs: ProbeInput) -> dict[str, Tensor]:
        """Optional: device values for the next chunk's ``extras[step]``, computed
        inside ``step()`` every ``probe_every`` steps; must not synchronise."""
        return {}


@dataclass
class ReporterSet:
    """Calls several reporters; a failing one warns once and never stops training."""

    reporters: list[Any] = field(default_factory=list)
    _warned: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.reporters)

    def call(self, method: str, *args: Any) -> None:
        """Call ``method`` on every reporter that has it."""
        for reporter in self.reporters:
            hook: Callable[..., Any] | None = getattr(reporter, method, None)
            if hook is None:
                continue
            try:
                hook(*args)
            except ReporterRefusal:
                raise
            except Exception as err:  # noqa: BLE001 - a reporter must never kill the run
                self.warn(reporter, method, err)

    def warn(self, reporter: Any, method: str, err: Exception) -> None:
        if id(reporter) in self._warned:
            return
        self._warned.add(id(reporter))
        warnings.warn(
            f"gradwatch: {type(reporter).__name__}.{method} failed "
            f"({type(err).__name__}: {err}); training continues and the other "
            "reporters are unaffected. Further failures of this reporter are "
            "not repeated.",
            stacklevel=4,
        )

    def run_dir(self) -> str | None:
        for reporter in self.reporters:
            path = getattr(reporter, "run_dir", None)
            if path is not None:
                return str(path)
        return None
