"""Running statistics kept on the device: bias-corrected EMAs and a window of recent values.

Both objects hold one vector of "channels" (the model's log norm, every layer's log
norm, log max |g| and log concentration) and are updated with a mask, so a channel
whose value is missing or non-finite at a step keeps its previous state exactly.
Nothing here reads a value on the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EmaStats:
    """Exponential moving mean and variance per channel, with Adam-style bias correction.

    With decay ``b`` and ``n`` updates, the raw averages are divided by ``1 - b**n`` so
    early estimates are not pulled towards the zero they started from. Each channel
    counts its own updates, since a layer can be absent at some steps.

    Args:
        size: number of channels.
        decay: EMA decay in (0, 1).
        device: where the state lives (the gradients' device).
    """

    def __init__(self, size: int, decay: float, device: torch.device) -> None:
        self.decay = decay
        self.mean = torch.zeros(size, dtype=torch.float32, device=device)
        self.var = torch.zeros(size, dtype=torch.float32, device=device)
        self.count = torch.zeros(size, dtype=torch.int64, device=device)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected ``(mean, variance)``; NaN for channels never updated."""
        correction = 1.0 - torch.pow(self.decay, self.count.to(torch.float32))
        seen = self.count > 0
        safe = torch.where(seen, correction, 1.0)
        nan = torch.full_like(self.mean, float("nan"))
        return (
            torch.where(seen, self.mean / safe, nan),
            torch.where(seen, self.var / safe, nan),
        )

    def update(self, x: Tensor, mask: Tensor, spread: Tensor | None = None) -> None:
        """Fold ``x`` into the channels where ``mask`` is true; leave the rest untouched.

        The variance tracks the squared deviation from the previous corrected mean (of
        ``spread`` where given, else of ``x``), so a first update yields variance 0 and
        no spurious spread.
        """
        mean_prev, _ = self.moments()
        s = x if spread is None else spread
        dev = torch.where(self.count > 0, s - mean_prev, 0.0)
        b = self.decay
        # Masked-out channels may hold NaN/Inf in x: torch.where keeps them out of the state.
        self.mean.copy_(torch.where(mask, b * self.mean + (1 - b) * x, self.mean))
        self.var.copy_(torch.where(mask, b * self.var + (1 - b) * dev.square(), self.var))
        self.count.add_(mask.to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("mean", "var", "count"):
            value = state[name]
            target = getattr(self, name)
            if value.shape != target.shape:
                raise ValueError(
                    f"statistics '{name}' has shape {tuple(value.shape)}, expected "
                    f"{tuple(target.shape)}: the state comes from a different model"
                )
            target.copy_(value)


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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = state["values"]
        if values.shape != self.values.shape:
            raise ValueError(
                f"window has shape {tuple(values.shape)}, expected {tuple(self.values.shape)}: "
                "the state comes from a different model or window size"
            )
        self.values.copy_(values)
