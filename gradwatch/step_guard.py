"""Misuse of :meth:`gradwatch.GradMonitor.step`: a step that measures nothing new.

Told from the gradients' objects and version counters on the host, never from their
values: no device read.
"""

from __future__ import annotations

import warnings
import weakref

from .measure import Measurement


class StepGuard:
    """Warns, once each, where a monitor step finds no gradient (before ``backward()``)
    or the last step's gradients again (twice per optimizer step, or once per
    micro-batch). Remembers the last step's gradients as weak references (freed
    gradients are not kept alive) with their version counters."""

    def __init__(self) -> None:
        self._seen: tuple[tuple[int, ...], list[tuple[weakref.ref, int]]] | None = None
        self._warned_repeat = False
        self._warned_no_grads = False

    def remember(self, m: Measurement) -> None:
        """The gradients of the step just taken, after its own edits (clipping bumps
        their versions)."""
        self._seen = (m.plan.positions, [(weakref.ref(g), g._version) for g in m.grads])

    def forget(self) -> None:
        """Nothing to compare with (a restore is not a repeated step)."""
        self._seen = None

    def check(self, m: Measurement, unstepped: bool) -> None:
        """Warn (once) where this step measures no new gradients: no gradient at all
        (before ``backward()``), or the last step's gradients again. Host-side only:
        gradient objects and version counters, no device read."""
        if not m.grads:
            if not self._warned_no_grads:
                self._warned_no_grads = True
                warnings.warn(
                    "gradwatch: monitor.step() found no gradients (every p.grad is None): "
                    "it ran before loss.backward(), or after optimizer.zero_grad(), so "
                    "nothing was measured or clipped. Call monitor.step() after backward() "
                    "and before optimizer.step().",
                    stacklevel=3,
                )
            return
        if self._warned_repeat or self._seen is None or self._seen[0] != m.plan.positions:
            return
        seen = self._seen[1]
        # A backward replaces a gradient (set_to_none) or writes into it in place (which
        # bumps its version: accumulation, or after zero_grad(set_to_none=False)).
        same = all(ref() is g for (ref, _), g in zip(seen, m.grads))
        if same and all(v == g._version for (_, v), g in zip(seen, m.grads)):
            how = ("twice on the same gradients (no backward() ran since the last "
                   "monitor.step())")
        elif same and unstepped:
            how = ("twice without optimizer.step() in between, on gradients accumulated "
                   "since (once per micro-batch?)")
        else:
            return
        self._warned_repeat = True
        warnings.warn(
            f"gradwatch: monitor.step() ran {how}: the step count and the statistics "
            "advance more than once per optimizer step. Call monitor.step() once per "
            "optimizer step: after the backward() of the last micro-batch (and "
            "scaler.unscale_), before optimizer.step().",
            stacklevel=3,
        )
