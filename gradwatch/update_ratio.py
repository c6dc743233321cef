"""How far an optimizer step moves each layer: the update-to-weight ratio.

``||w_after - w_before|| / ||w_before||`` per layer is the classic check of a learning
rate: about 1e-3 per step is the usual rule of thumb for healthy training; a layer far
above it moves too much for its learning rate, and a layer near zero does not learn.
Measuring it needs the weights as they were before the step, a copy of them, so the
monitor takes it on one step per logging interval only: a fused copy before
``optimizer.step()`` and fused norms after it, all on the device (see
:class:`~gradwatch.gate.OptimizerGate`, which calls :meth:`UpdateRatio.begin` and
:meth:`UpdateRatio.end` around the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import distributed as dist_utils
from . import functional as F
from .layers import LayerTable


class UpdateRatio:
    """Measures the per-layer update-to-weight ratio of one optimizer step.

    Args:
        layers: the layer table (its parameters are the weights measured).
        device: where the per-layer values live.
        shards: how sharded parameters are combined across ranks (``None``: whole
            parameters, no communication).
        on_ratio: receives the ``(L,)`` fp32 ratios of the step just measured (NaN where
            a layer's weights are all zero).
    """

    def __init__(self, layers: LayerTable, device: torch.device,
                 shards: dist_utils.ShardSetup | None,
                 on_ratio: Callable[[Tensor], None]) -> None:
        self.layers = layers
        self.device = device
        self.shards = shards
        self.on_ratio = on_ratio
        self._layer_index = torch.tensor(layers.param_layer, dtype=torch.long, device=device)
        self._weights = (None if shards is None or shards.sum_weight is None
                         else torch.tensor(shards.sum_weight, device=device))
        self._groups: list[F.TensorGroup] | None = None
        self._before: list[Tensor] | None = None

    def _current(self) -> list[Tensor]:
        return [dist_utils.local(p.detach()) for p in self.layers.params]

    def begin(self) -> None:
        """Copy the weights as they are before the step (one fused copy per dtype)."""
        weights = self._current()
        if self._groups is None:
            self._groups = F.group_by_device_and_dtype(weights, self.device)
        before: list[Tensor] = [torch.empty(0)] * len(weights)
        for g in self._groups:
            copies = torch._foreach_mul([weights[i] for i in g.indices], 1.0)
            for i, c in zip(g.indices, copies):
                before[i] = c
        self._before = before

    def end(self) -> None:
        """Measure the step just taken against the copy, hand the ratios to
        ``on_ratio`` and drop the copy. Does nothing without a :meth:`begin`."""
        before, self._before = self._before, None
        if before is None:
            return
        now = self._current()
        assert self._groups is not None
        deltas: list[Tensor] = [torch.empty(0)] * len(now)
        for g in self._groups:
            diff = torch._foreach_sub([now[i] for i in g.indices],
                                      [before[i] for i in g.indices])
            for i, d in zip(g.indices, diff):
                deltas[i] = d
        moved, _ = F.tensor_norms(deltas, self._groups, self.device, with_max_abs=False)
        size, _ = F.tensor_norms(before, self._groups, self.device, with_max_abs=False)
        n = self.layers.num_layers
        if self._weights is not None:  # a replicated tensor counts on one rank only
            moved, size = moved * self._weights, size * self._weights
        sums = torch.cat([F.layer_sum_of_squares(moved, self._layer_index, n),
                          F.layer_sum_of_squares(size, self._layer_index, n)])
        if self.shards is not None:
            sums = self.shards.reducer.sum(sums)
        moved_l, size_l = sums[:n].sqrt(), sums[n:].sqrt()
        self.on_ratio(torch.where(size_l > 0, moved_l / size_l, math.nan))
