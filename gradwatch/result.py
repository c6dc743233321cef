"""What one ``GradMonitor.step()`` measured and did, read from the device on request."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .rows import ACTIONS, RowLayout


class StepResult:
    """What :meth:`gradwatch.GradMonitor.step` measured and did at one step.

    The values live on the device. Reading any property copies this step's row to
    the host once (a device synchronisation on an accelerator); later reads reuse
    that copy. Leave the result unread in the training loop to stay sync-free.
    """

    def __init__(self, step: int, row: Tensor, layout: RowLayout, layer_names: tuple[str, ...]):
        self.step = step
        self._row = row
        self._layout = layout
        self._layer_names = layer_names
        self._host: np.ndarray | None = None

    def _values(self) -> np.ndarray:
        if self._host is None:
            self._host = self._row.cpu().numpy()  # host sync, on request only
        return self._host

    def _get(self, name: str) -> float:
        return float(self._values()[self._layout.step[name]])

    @property
    def global_norm(self) -> float:
        """L2 norm of all gradients before clipping (synchronises)."""
        return self._get("global_norm")

    @property
    def clipped_norm(self) -> float:
        """L2 norm of all gradients after clipping (synchronises)."""
        return self._get("clipped_norm")

    @property
    def threshold(self) -> float:
        """Norm threshold in effect (the value threshold in ``clip="value"``); NaN when
        there is none yet (warm-up) or the mode has no single one (``agc``)."""
        return self._get("threshold")

    @property
    def action(self) -> str:
        """``"none"``, ``"clip_norm"``, ``"clip_value"`` or ``"skip"`` (synchronises)."""
        return ACTIONS[int(self._get("action"))]

    @property
    def explosion(self) -> bool:
        """Whether a z-score exceeded its event threshold (``z_threshold``, calibrated
        to the run's tail) at this step (synchronises)."""
        return bool(self._get("explosion"))

    @property
    def drift(self) -> bool:
        """Whether the drift test flagged a sustained rise of the model norm at this
        step (synchronises)."""
        return bool(self._get("drift"))

    @property
    def nonfinite(self) -> bool:
        """Whether any gradient held NaN or Inf (synchronises)."""
        return bool(self._get("nonfinite"))

    @property
    def flagged_layers(self) -> list[str]:
        """Layers whose z-score exceeded ``z_threshold``, most anomalous first."""
        v = self._values()
        lay = self._layout.layer
        flagged = np.flatnonzero(v[lay["flagged"]] > 0)
        z = v[lay["z"]]
        return [self._layer_names[i] for i in flagged[np.argsort(-z[flagged], kind="stable")]]

    def to_dict(self) -> dict[str, Any]:
        """All step-level values as plain Python (synchronises)."""
        return {
            "step": self.step,
            "global_norm": self.global_norm,
            "clipped_norm": self.clipped_norm,
            "threshold": self.threshold,
            "action": self.action,
            "explosion": self.explosion,
            "drift": self.drift,
            "nonfinite": self.nonfinite,
            "flagged_layers": self.flagged_layers,
        }

    def __repr__(self) -> str:
        return f"StepResult(step={self.step}, <on device; read a property to see values>)"
