"""Measuring one step: which gradients are present, and their per-layer norms.

:class:`GradReader` finds the gradients of the monitored parameters (the local shards
under FSDP), keeps a :class:`~gradwatch.layers.GradPlan` per presence pattern, and
reduces them to a :class:`Measurement`: per-layer L2 norms, max |g| and
concentration (max |g| / RMS of g), the global norm, and the log values the
statistics work on. Sharded layers are made whole by the reader's
:class:`~gradwatch.distributed.ShardSetup`. Nothing here reads a value on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed as dist_utils
from . import functional as F
from .layers import GradPlan, LayerTable

# Plans kept at once: a model whose set of gradients changes every step (routing,
# dropped layers) keeps a bounded number of them.
MAX_PLANS = 64


@dataclass
class Measurement:
    """One step's gradients and what was measured of them, all on the device.

    ``nonfinite``: the global norm is NaN or ``inf``; ``overflow`` (a part of it): it
    is ``inf`` although every element is finite (a norm beyond fp32's range), not
    NaN/Inf gradients.

    ``x`` and ``valid`` are the statistics' channels: the model's log norm, then every
    layer's log norm, log max |g| and log concentration (``1 + 3L`` values). A channel
    is invalid where its log is not finite (an absent or all-zero layer).
    """

    plan: GradPlan
    grads: list[Tensor]
    layer_norm: Tensor
    layer_max: Tensor
    layer_numel: Tensor
    present: Tensor
    global_norm: Tensor
    nonfinite: Tensor
    overflow: Tensor
    concentration: Tensor
    x: Tensor
    valid: Tensor

    @property
    def num_layers(self) -> int:
        return self.layer_norm.shape[0]


class GradReader:
    """Reads the monitored parameters' gradients and measures them.

    Args:
        layers: the layer table.
        device: where per-layer values and statistics live.
        shards: how sharded gradients are combined across ranks (``None``: whole
            gradients, no communication).
    """

    def __init__(self, layers: LayerTable, device: torch.device,
                 shards: dist_utils.ShardSetup | None) -> None:
        self.layers = layers
        self.device = device
        self.shards = shards
        # Whether a tensor norm that overflowed fp32 is computed again in float64: the
        # CPU path only (it reads a flag on the host); set through the GradEditor.
        self.refine_overflow = False
        self._dtensors = any(hasattr(p, "_local_tensor") for p in layers.params)
        self._plans: dict[tuple[int, ...], GradPlan] = {}
        # Per sparse gradient of the current step (parameter position -> the rows its
        # values hold), for policies that need the matching weights (AGC).
        self._rows: dict[int, Tensor] = {}

    @property
    def num_plans(self) -> int:
        return len(self._plans)

    def params(self, plan: GradPlan) -> list[Tensor]:
        """The parameters whose gradients ``plan`` reads, aligned with those gradients:
        for a sparse gradient, the rows its values belong to."""
        params = [self.layers.params[i] for i in plan.positions]
        if self._rows:
            params = [
                p if i not in self._rows else p.detach().index_select(0, self._rows[i])
                for i, p in zip(plan.positions, params)
            ]
        return params

    def _sparse_values(self, i: int) -> Tensor:
        """The values of parameter ``i``'s sparse gradient, coalesced, so they are its
        elements (duplicate indices summed) and every edit in place (clamp, scale, zero)
        edits the gradient itself. The coalesced gradient replaces ``p.grad``: sparse
        optimizers (SparseAdam) coalesce it anyway, and then find it done.
        (Coalescing sizes its output by the data: on an accelerator it waits for the
        device, as the optimizer's own coalesce would.)"""
        p = self.layers.params[i]
        grad = p.grad
        if grad.layout != torch.sparse_coo:
            raise TypeError(
                f"{self.layers.param_names[i]}.grad has layout {grad.layout}; gradwatch "
                "reads dense and sparse COO gradients only"
            )
        if not grad.is_coalesced():
            grad = grad.coalesce()
            p.grad = grad
        if grad.sparse_dim() == 1:  # rows of the parameter, as nn.Embedding's
            self._rows[i] = grad._indices()[0]
        return grad._values()

    def _plan(self) -> tuple[GradPlan, list[Tensor]]:
        # Sharded (FSDP) gradients are read through their local shards. Empty gradients
        # (and empty shards) carry no information, and some reductions reject them.
        params = self.layers.params
        if self._dtensors:
            local = [None if p.grad is None else dist_utils.local(p.grad) for p in params]
        else:
            local = [p.grad for p in params]
        # Sparse gradients (nn.Embedding(sparse=True)) are read through their values
        # (a layout check is metadata: no sync). Numels then come from the parameters.
        sparse = [i for i, g in enumerate(local) if g is not None and g.is_sparse]
        self._rows = {}
        if sparse:
            local = list(local)
            for i in sparse:
                local[i] = self._sparse_values(i)
        positions = tuple(i for i, g in enumerate(local) if g is not None and g.numel() > 0)
        grads = [local[i] for i in positions]
        plan = self._plans.pop(positions, None)
        if plan is None or not plan.matches(grads):
            weights = None if self.shards is None else self.shards.sum_weight
            numels = None if not sparse else [
                self.layers.param_numel[i] if i in self._rows else g.numel()
                for i, g in zip(positions, grads)
            ]
            plan = GradPlan.build(self.layers, positions, grads, self.device, weights, numels)
        self._plans[positions] = plan  # most recently used last
        if len(self._plans) > MAX_PLANS:
            del self._plans[next(iter(self._plans))]
        return plan, grads

    def measure(self) -> Measurement:
        """Per-tensor norms and max |g| in fp32, reduced to per-layer values."""
        plan, grads = self._plan()
        n = self.layers.num_layers
        norms, max_abs = self._tensor_norms(plan, grads, with_max_abs=True)
        layer_max = F.layer_max(max_abs, plan.layer_index, n)
        present = plan.layer_present
        layer_numel = plan.layer_numel
        if self.shards is None:
            layer_norm, global_norm = F.layer_and_global_norms(norms, plan.layer_index, n)
        else:
            layer_sumsq = self._layer_sumsq(plan, norms)
            # Shards: whole-layer values from one SUM and one MAX all-reduce of 2L
            # values each. A NaN on any rank makes the sum NaN on every rank.
            sums, maxes = self.shards.reducer.sum_and_max(
                torch.cat([layer_sumsq, layer_numel]), torch.cat([layer_max, present.float()])
            )
            layer_sumsq, layer_numel = sums[:n], sums[n:]
            present = maxes[n:] > 0
            # MAX may drop a NaN (comparisons with NaN are false); the sum keeps it.
            layer_max = torch.where(layer_sumsq.isnan(), math.nan, maxes[:n])
            # (Sums of squares across ranks are fp32: a layer norm above about 1.8e19
            # reads as inf there, an overflow.)
            layer_norm = layer_sumsq.sqrt()
            global_norm = layer_sumsq.sum().sqrt()
        # NaN/Inf anywhere makes its tensor's norm, hence the sum, non-finite; so does
        # a norm beyond fp32's range (an overflow: every element finite).
        nonfinite = ~torch.isfinite(global_norm)
        overflow = F.overflowed(global_norm, layer_max)
        # NaN (so log is NaN and the channel is not updated) where a layer has no
        # gradient or an all-zero one: there is no concentration to speak of.
        concentration = torch.where(
            layer_norm > 0, layer_max * layer_numel.sqrt() / layer_norm, math.nan
        )
        x = torch.cat([global_norm.reshape(1), layer_norm, layer_max, concentration]).log()
        return Measurement(
            plan=plan, grads=grads, layer_norm=layer_norm, layer_max=layer_max,
            layer_numel=layer_numel, present=present, global_norm=global_norm,
            nonfinite=nonfinite, overflow=overflow, concentration=concentration, x=x,
            valid=torch.isfinite(x),  # absent layers have norm 0, so log is -inf: invalid
        )

    def layer_norms(self, m: Measurement) -> Tensor:
        """The per-layer L2 norms of ``m``'s gradients as they are now (after an edit
        in place, such as clipping by value)."""
        norms, _ = self._tensor_norms(m.plan, m.grads, with_max_abs=False)
        if self.shards is None:
            return F.layer_and_global_norms(norms, m.plan.layer_index, self.layers.num_layers)[0]
        sumsq = self.shards.reducer.sum(self._layer_sumsq(m.plan, norms))
        return sumsq.sqrt()

    def _tensor_norms(self, plan: GradPlan, grads: list[Tensor], *,
                      with_max_abs: bool) -> tuple[Tensor, Tensor | None]:
        """Per-tensor L2 norms (and max |g|), empty vectors when no gradient is present."""
        if not grads:
            empty = torch.zeros(0, dtype=torch.float32, device=self.device)
            return empty, empty if with_max_abs else None
        return F.tensor_norms(grads, plan.groups, self.device, with_max_abs=with_max_abs,
                              refine_overflow=self.refine_overflow)

    def _layer_sumsq(self, plan: GradPlan, norms: Tensor) -> Tensor:
        """This rank's per-layer sums of squares (a replicated tensor of a sharded model
        counts on one rank only)."""
        if plan.sum_weight is not None:
            norms = norms * plan.sum_weight
        return F.layer_sum_of_squares(norms, plan.layer_index, self.layers.num_layers)
