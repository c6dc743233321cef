"""Skipping an optimizer step decided on the device.

A fused optimizer (``Adam``/``AdamW``/``SGD`` with ``fused=True``, CPU included) reads
a ``found_inf`` tensor attribute inside ``step()`` and, when it is 1, leaves the
parameters and its state untouched. That is how ``GradScaler`` skips them without a
host synchronisation, and how :class:`OptimizerGate` skips them too.

Any other optimizer cannot be told "skip" by a tensor, so the gate reads the flag on
the host inside ``optimizer.step()``: one scalar synchronisation per optimizer step,
exactly what ``GradScaler.step`` pays for such optimizers. ``nonfinite="zero"`` avoids
it by zeroing the gradients instead (see :func:`gradwatch.functional.zero_where_`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a device-side ``found_inf`` attribute."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class OptimizerGate:
    """Wraps ``optimizer.step`` so that a step flagged by the monitor does not happen.

    Args:
        optimizer: the optimizer to gate. Its ``step`` is replaced by an instance
            attribute until :meth:`remove` is called; wrappers installed earlier (an LR
            scheduler's step counter) stay inside.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fused = supports_found_inf(optimizer)
        self._flag: Tensor | None = None
        self._had_instance_step = "step" in optimizer.__dict__
        self._previous = optimizer.step
        original = optimizer.step

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            flag, self._flag = self._flag, None
            if flag is None:
                return original(*args, **kwargs)
            if self.fused:
                return self._fused_step(original, flag, *args, **kwargs)
            # Host sync: one scalar per optimizer step, as GradScaler does for
            # optimizers without found_inf support. Use nonfinite="zero" to avoid it.
            if bool(flag):
                return None
            return original(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]

    def arm(self, flag: Tensor) -> None:
        """Skip the next ``optimizer.step()`` if the 0-dim bool ``flag`` is true."""
        self._flag = flag

    def _fused_step(self, original: Any, flag: Tensor, *args: Any, **kwargs: Any) -> Any:
        opt = self.optimizer
        # GradScaler may have set its own found_inf just before calling step(): merge
        # ours with a maximum, since fused kernels expect exactly 0 or 1.
        previous = getattr(opt, "found_inf", None)
        mine = flag.to(torch.float32)
        if previous is not None:
            mine = torch.maximum(previous, mine.to(previous.device))
        opt.found_inf = mine  # type: ignore[attr-defined]
        try:
            return original(*args, **kwargs)
        finally:
            if previous is None:
                del opt.found_inf  # type: ignore[attr-defined]
            else:
                opt.found_inf = previous  # type: ignore[attr-defined]

    def remove(self) -> None:
        """Restore the optimizer's own ``step``."""
        if self._had_instance_step:
            self.optimizer.step = self._previous  # type: ignore[method-assign]
        else:
            self.optimizer.__dict__.pop("step", None)
