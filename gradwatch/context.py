"""The training context recorded beside the gradients at every step: the loss and the
learning rate, as 0-dim fp32 tensors on the monitor's device, never read on the host."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor


class TrainingContext:
    """Turns what :meth:`gradwatch.GradMonitor.step` is given (a loss) and what it can
    see (the optimizer's learning rate) into step fields, without a host sync.

    Args:
        device: where the step's row lives.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._nan = torch.full((), math.nan, device=device)  # a field not given

    def values(self, loss: Tensor | float | None,
               optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        """The step fields ``loss`` and ``lr``."""
        return {"loss": self.loss(loss), "lr": self.lr(optimizer)}

    def loss(self, loss: Tensor | float | None) -> Tensor:
        """``loss`` as a 0-dim fp32 tensor on the monitor's device, without reading it
        on the host (NaN for ``None``)."""
        if loss is None:
            return self._nan
        if isinstance(loss, Tensor):
            if loss.numel() != 1:  # metadata only: no device read
                raise ValueError(
                    f"monitor.step(loss=...) got a tensor of shape {tuple(loss.shape)}; "
                    "pass the scalar loss (reduce it first, e.g. loss.mean())"
                )
            # Same device: a queued copy. A loss on the CPU beside an accelerator model
            # is copied without waiting (non_blocking: the value is staged at once).
            return loss.detach().reshape(()).to(self.device, torch.float32,
                                                non_blocking=loss.device.type == "cpu")
        if isinstance(loss, Real) and not isinstance(loss, bool):
            return self._scalar(float(loss))
        raise TypeError(
            f"monitor.step(loss={type(loss).__name__}): expected the loss as a tensor or "
            "a number, or None"
        )

    def lr(self, optimizer: torch.optim.Optimizer | None) -> Tensor:
        """The learning rate of the optimizer's first parameter group as a 0-dim fp32
        device tensor (NaN without one). Usually a Python float, filled into a tensor
        by a kernel argument (no copy); a tensor learning rate is taken as it is."""
        groups = optimizer.param_groups if optimizer is not None else ()
        lr = groups[0].get("lr") if groups else None
        if isinstance(lr, Tensor) and lr.numel() == 1:
            return lr.detach().reshape(()).to(self.device, torch.float32,
                                              non_blocking=lr.device.type == "cpu")
        if isinstance(lr, Real) and not isinstance(lr, bool):
            return self._scalar(float(lr))
        return self._nan

    def _scalar(self, value: float) -> Tensor:
        # torch.full passes the value as a kernel argument: no host-to-device copy,
        # which for pageable memory would wait for the device.
        return torch.full((), value, dtype=torch.float32, device=self.device)
