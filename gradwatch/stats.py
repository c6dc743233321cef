"""Running statistics kept on the device: bias-corrected EMAs, a window of recent
values, a running quantile and a one-sided CUSUM.

Each object holds one vector of "channels" (the model's log norm, every layer's log
norm, log max |g| and log concentration, or a subset) and is updated with a mask, so a
channel whose value is missing or non-finite at a step keeps its previous state
exactly. Nothing here reads a value on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class EmaStats:
    """Exponential moving mean and variance per channel, with Adam-style bias correction.

    With decay ``b`` and ``n`` updates, the raw averages are divided by ``1 - b**n`` so
    early estimates are not pulled towards the zero they started from. Each channel
    counts its own updates, since a layer can be absent at some steps.

    The mean (the typical level) and the variance (the spread) may decay at different
    rates: a level that follows the run within a few dozen steps, and a spread
    estimated over more of them. The mean's decay may also change from step to step
    (see :meth:`update`); its bias correction is then the total weight its updates
    received, ``1 - prod(decays)``, which is ``1 - b**n`` for a constant one.

    Args:
        size: number of channels.
        decay: EMA decay of the variance in (0, 1).
        device: where the state lives (the gradients' device).
        mean_decay: EMA decay of the mean; ``decay`` when not given.
    """

    def __init__(self, size: int, decay: float, device: torch.device,
                 mean_decay: float | None = None) -> None:
        self.decay = decay
        self.mean_decay = decay if mean_decay is None else mean_decay
        self.mean = torch.zeros(size, dtype=torch.float32, device=device)
        self.var = torch.zeros(size, dtype=torch.float32, device=device)
        self.count = torch.zeros(size, dtype=torch.int64, device=device)
        self.mean_weight = torch.zeros(size, dtype=torch.float32, device=device)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected ``(mean, variance)``; NaN for channels never updated (their
        sums and weights are all zero: 0 / 0)."""
        var_corr = 1.0 - torch.pow(self.decay, self.count.to(torch.float32))
        return self.mean / self.mean_weight, self.var / var_corr

    def update(self, x: Tensor, mask: Tensor, spread: Tensor | None = None,
               mean_decay: Tensor | None = None, mean_prev: Tensor | None = None) -> None:
        """Fold ``x`` into the channels where ``mask`` is true; leave the rest untouched.

        The variance tracks the squared deviation from the previous corrected mean (of
        ``spread`` where given, else of ``x``), so a first update yields variance 0 and
        no spurious spread. ``mean_decay``: this step's decay of the mean, per channel
        (the configured one when not given). ``mean_prev``: the corrected mean as
        :meth:`moments` gives it now, where the caller has it already.
        """
        if mean_prev is None:
            mean_prev, _ = self.moments()
        s = x if spread is None else spread
        dev = torch.where(self.count > 0, s - mean_prev, 0.0)
        b = self.decay
        a = self.mean_decay if mean_decay is None else mean_decay
        # Masked-out channels may hold NaN/Inf in x: torch.where keeps them out of the state.
        self.mean.copy_(torch.where(mask, a * self.mean + (1 - a) * x, self.mean))
        self.mean_weight.copy_(
            torch.where(mask, a * self.mean_weight + (1 - a), self.mean_weight))
        self.var.copy_(torch.where(mask, b * self.var + (1 - b) * dev.square(), self.var))
        self.count.add_(mask.to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone(),
                "mean_weight": self.mean_weight.clone()}

    def check_state(self, state: Any) -> dict[str, Tensor]:
        """The tensors :meth:`load_state_dict` would assign, checked against this
        object's and converted to its device and dtypes; nothing is changed.

        Raises:
            ValueError: a key is missing, or a value is not a tensor of the right shape.
        """
        if isinstance(state, Mapping) and "mean_weight" not in state and "count" in state:
            # Saved before the weight was kept: a constant decay.
            count = check_tensor(state["count"], self.count, "statistics 'count'")
            state = {**state, "mean_weight": 1.0 - torch.pow(self.mean_decay, count.float())}
        return checked_tensors(self, state, ("mean", "var", "count", "mean_weight"),
                               "statistics")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _assign(self, self.check_state(state))


class RecentWindow:
    """A ring buffer of the last ``length`` steps' values per channel, for quantiles.

    Steps where a channel had no valid value hold NaN and are ignored by
    :meth:`quantile`.
    """

    def __init__(self, size: int, length: int, device: torch.device) -> None:
        self.length = length
        self.values = torch.full((size, length), float("nan"), dtype=torch.float32, device=device)

    def push(self, x: Tensor, mask: Tensor, position: int) -> None:
        """Write step ``position``'s values (a host-side counter: no sync)."""
        col = position % self.length
        self.values[:, col] = torch.where(mask, x, float("nan"))

    def quantile(self, q: float, rows: slice | None = None) -> Tensor:
        """Per-channel ``q``-quantile (0-1) of the finite recent values; NaN if none."""
        values = self.values if rows is None else self.values[rows]
        return torch.nanquantile(values, q, dim=1)

    def filled(self, rows: slice | None = None) -> Tensor:
        """How many valid values each channel holds."""
        values = self.values if rows is None else self.values[rows]
        return (~values.isnan()).sum(dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values.clone()}

    def check_state(self, state: Any) -> dict[str, Tensor]:
        """The window :meth:`load_state_dict` would assign, checked; nothing is changed.

        Raises:
            ValueError: no values, or values of another shape (another model, or
                another window size).
        """
        if isinstance(state, Mapping) and "values" in state:
            values = check_tensor(state["values"], None, "window 'values'")
            if (values.dim() == 2 and values.shape[0] == self.values.shape[0]
                    and values.shape[1] != self.length):
                raise ValueError(
                    f"the state's window holds {values.shape[1]} steps, this monitor's "
                    f"{self.length} (MonitorConfig.window): load it into a monitor made "
                    f"with window={values.shape[1]}"
                )
        return checked_tensors(self, state, ("values",), "window",
                               hint="a different model or window size")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _assign(self, self.check_state(state))


class RunningQuantile:
    """Running estimates of a few quantiles per channel (stochastic approximation).

    Each update moves the estimate of quantile ``q`` up by ``rate * q`` where the value
    lies above it and down by ``rate * (1 - q)`` where it lies below, so it settles
    where a share ``1 - q`` of values lies above. The rate is ``1 / n`` for a channel's
    first updates (a plain running quantile) and ``min_rate`` from then on (it keeps
    following the run). All quantiles are updated together, in one pass.

    Args:
        size: number of channels.
        qs: the quantiles (0-1); ``value[k]`` estimates ``qs[k]``.
        starts: their initial estimates (where the values are expected).
        min_rate: the step size once ``1 / n`` has fallen below it.
        device: where the state lives.
    """

    def __init__(self, size: int, qs: tuple[float, ...], starts: tuple[float, ...],
                 min_rate: float, device: torch.device) -> None:
        self.min_rate = min_rate
        self._below = torch.tensor([[1.0 - q] for q in qs], device=device)
        self.value = torch.tensor([[float(v)] * size for v in starts], dtype=torch.float32,
                                  device=device)
        self.count = torch.zeros(size, dtype=torch.int64, device=device)

    def update(self, x: Tensor, mask: Tensor) -> None:
        """Fold ``x`` into the channels where ``mask`` is true."""
        count = self.count + mask.to(torch.int64)
        rate = torch.clamp(1.0 / count.clamp_min(1).to(torch.float32), min=self.min_rate)
        moved = self.value + rate * ((x > self.value).to(torch.float32) - self._below)
        self.value.copy_(torch.where(mask, moved, self.value))
        self.count.copy_(count)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone(), "count": self.count.clone()}

    def check_state(self, state: Any) -> dict[str, Tensor]:
        """The tensors :meth:`load_state_dict` would assign, checked; nothing is changed."""
        return checked_tensors(self, state, ("value", "count"), "running quantile")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _assign(self, self.check_state(state))


class Cusum:
    """A one-sided CUSUM (Page's test) for a sustained rise of a standardised series.

    ``S = max(0, S + min(z, cap) - slack)``: steps above ``slack`` deviations add up,
    steps below drain it; ``cap`` keeps a single spike from crossing ``threshold`` on
    its own. An alarm is raised once per episode, when ``S`` first exceeds
    ``threshold``; the episode ends (and the test re-arms) when ``S`` is back at 0.
    The episode's first step and the level at it are kept, to estimate where the rise
    began and how fast it grows.

    Args:
        slack, cap, threshold: in deviations.
        device: where the state lives.
    """

    def __init__(self, slack: float, cap: float, threshold: float, device: torch.device) -> None:
        self.slack, self.cap, self.threshold = slack, cap, threshold
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.sum = zero.clone()
        self.alarmed = torch.zeros((), dtype=torch.bool, device=device)
        self.length = zero.clone()  # steps since the episode began (0: no episode)
        self.base = zero.clone()  # the reference level when it began

    def peek(self, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum, alarm)`` after ``z``, without changing the state: the new sum, and
        whether it raises this episode's alarm (only where ``mask``)."""
        total = torch.where(mask, (self.sum + z.clamp(max=self.cap) - self.slack).clamp_min(0.0),
                            self.sum)
        return total, mask & (total > self.threshold) & ~self.alarmed

    def update(self, total: Tensor, alarm: Tensor, mask: Tensor, level: Tensor) -> None:
        """Commit the sum from :meth:`peek`; ``level``: the reference level now (kept
        as the episode's base where one begins)."""
        begins = mask & (self.sum <= 0) & (total > 0)
        self.base.copy_(torch.where(begins, level, self.base))
        self.length.copy_(torch.where(total > 0, torch.where(mask, self.length + 1, self.length),
                                      0.0))
        self.alarmed.copy_((self.alarmed | alarm) & (total > 0))
        self.sum.copy_(total)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).clone() for k in ("sum", "alarmed", "length", "base")}

    def check_state(self, state: Any) -> dict[str, Tensor]:
        """The tensors :meth:`load_state_dict` would assign, checked; nothing is changed."""
        return checked_tensors(self, state, ("sum", "alarmed", "length", "base"), "drift test")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _assign(self, self.check_state(state))


def check_tensor(value: Any, target: Tensor | None, what: str,
                 hint: str = "a different model") -> Tensor:
    """``value`` as a tensor on ``target``'s device with its dtype and shape (as it is
    when ``target`` is ``None``), without touching ``target``.

    Raises:
        ValueError: ``value`` is not numeric, or its shape is not ``target``'s.
    """
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{what} is a {type(value).__name__}, not a tensor: the state was not written "
            "by gradwatch, or was damaged"
        ) from None
    if tensor.is_complex():
        raise ValueError(f"{what} has dtype {tensor.dtype}, expected real numbers")
    if target is None:
        return tensor
    if tensor.shape != target.shape:
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}: "
            f"the state comes from {hint}"
        )
    # A copy (never the caller's tensor): assigning it later cannot alias the state.
    return tensor.to(target.device, target.dtype, copy=True)


def checked_tensors(obj: Any, state: Any, names: tuple[str, ...], what: str,
                    hint: str = "a different model") -> dict[str, Tensor]:
    """``state[name]`` for each of ``names``, checked against ``obj``'s attribute of that
    name by :func:`check_tensor`. Nothing is assigned, so a state refused here leaves
    ``obj`` as it was.

    Raises:
        ValueError: ``state`` is not a dict, lacks a name, or holds a bad value.
    """
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{what} state is a {type(state).__name__}, expected a dict from state_dict()"
        )
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(
            f"{what} state lacks {', '.join(map(repr, missing))}: it was not written by "
            "gradwatch's state_dict(), or was damaged"
        )
    return {name: check_tensor(state[name], getattr(obj, name), f"{what} '{name}'", hint)
            for name in names}


def _assign(obj: Any, values: dict[str, Tensor]) -> None:
    """Copy checked values (see :func:`checked_tensors`) into ``obj``'s tensors."""
    for name, value in values.items():
        getattr(obj, name).copy_(value)
