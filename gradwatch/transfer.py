"""The rows of the steps since the last transfer, waiting on the device, and what the
reporters' device probes computed at those steps: moved to the host together, in one
copy, every ``log_every`` steps (the monitor's only host synchronisation)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .reporters import ProbeInput


class HostTransfer:
    """A device buffer of ``capacity`` rows of ``width`` fp32 values, and the probes.

    Args:
        width: values per row (the row layout's width).
        capacity: rows held before they must go to the host (``log_every``).
        device: where the rows wait.
    """

    def __init__(self, width: int, capacity: int, device: torch.device) -> None:
        self.rows = torch.empty((capacity, width), dtype=torch.float32, device=device)
        self.pending = 0
        self.probes: list[tuple[Any, int]] = []
        self._extras: dict[int, dict[str, Tensor]] = {}

    @property
    def full(self) -> bool:
        return self.pending == self.rows.shape[0]

    def push(self, row: Tensor) -> None:
        """Queue one step's row (a device copy, no sync)."""
        self.rows[self.pending].copy_(row)
        self.pending += 1

    def add_probe(self, reporter: Any, every: int) -> None:
        """Call ``reporter.probe`` at every step that is a multiple of ``every``."""
        self.probes.append((reporter, every))

    def run_probes(self, step: int, inputs: Callable[[], ProbeInput]) -> None:
        """The values the probes due at ``step`` compute on the device, held for the
        next transfer. A probe that raises is switched off, with a warning."""
        for reporter, every in list(self.probes):
            if step % every:
                continue
            try:
                out = reporter.probe(inputs())
            except Exception as err:  # noqa: BLE001 - reporting must never stop training
                self.probes.remove((reporter, every))
                warnings.warn(
                    f"gradwatch: {type(reporter).__name__}'s device probe failed "
                    f"({type(err).__name__}: {err}); it is switched off and training "
                    "continues",
                    stacklevel=3,  # run_probes <- step <- the training loop
                )
                continue
            self._extras.setdefault(step, {}).update(out)

    def take(self) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
        """The pending rows and the probes' values on the host, in one transfer (the
        one host sync); the buffer is empty after."""
        rows = self.rows[: self.pending]
        self.pending = 0
        extras, self._extras = self._extras, {}
        if not extras:
            return rows.cpu().numpy().copy(), {}  # the one host sync
        flat = [t.reshape(-1).to(torch.float32) for d in extras.values() for t in d.values()]
        host = torch.cat([rows.reshape(-1), *flat]).cpu().numpy()  # the one host sync
        rows_np = host[: rows.numel()].reshape(rows.shape).copy()
        offset = rows.numel()
        host_extras: dict[int, dict[str, np.ndarray]] = {}
        for step, values in extras.items():
            for name, t in values.items():
                host_extras.setdefault(step, {})[name] = (
                    host[offset : offset + t.numel()].reshape(t.shape).copy()
                )
                offset += t.numel()
        return rows_np, host_extras
