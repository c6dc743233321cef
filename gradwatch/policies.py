"""Clipping policies: one small object per ``clip`` mode, all with the same interface.

A policy :meth:`~ClipPolicy.decide`\\ s from the step's
:class:`~gradwatch.measure.Measurement` and the detector's
:class:`~gradwatch.detector.Detection`: a :class:`Decision` of per-layer value
thresholds (``inf`` for none), a norm coefficient (at most 1) and the threshold to
record. It then :meth:`~ClipPolicy.apply_`\\ s the decision to the gradients in place
through a :class:`GradEditor`, which finds the cheapest route: no host read on an
accelerator, a fused optimizer's ``grad_scale`` for the coefficient where it can.

Which modes clip by norm (and so may hand their coefficient to a fused optimizer)
is declared once, as :data:`gradwatch.config.NORM_MODES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import functional as F
from .config import NORM_MODES, MonitorConfig
from .detector import Detection
from .gate import OptimizerGate
from .measure import GradReader, Measurement


@dataclass
class Decision:
    """A policy's decision for one step, as device tensors.

    Attributes:
        value_threshold: per-layer element thresholds (``inf``: not clipped by value).
        value_clipped: whether any layer is clipped by value (0-dim bool).
        coef: the norm-clipping coefficient (0-dim, at most 1).
        threshold: the threshold recorded for the step (NaN or ``inf``: none).
        norm_clipped: whether the step counts as clipped by norm; ``None`` until
            applied (then ``coef < 1`` unless the policy says otherwise).
        layer_norm: per-layer norms after clipping (set by ``apply_``).
    """

    value_threshold: Tensor
    value_clipped: Tensor
    coef: Tensor
    threshold: Tensor
    norm_clipped: Tensor | None = None
    layer_norm: Tensor | None = None


class GradEditor:
    """Applies decisions to the gradients in place, by the cheapest route.

    On the CPU there is no device to wait for: reading a decision flag costs nothing,
    while a pass that would change nothing (a clamp at ``inf``, a multiply by 1) still
    reads and writes every gradient, so such passes are skipped, as ZClip skips its
    scale on steps it does not clip. On accelerators (``host_branches=False``) every
    pass is launched unconditionally and nothing is read.

    Args:
        reader: measures the gradients again after a clamp.
        gate: the optimizer gate, if any; a fused optimizer takes the norm-clipping
            coefficient through it.
        monitored: ids of the monitored parameters (the coefficient may ride in
            ``grad_scale`` only if the optimizer steps no other).
        host_branches: whether decision flags may be read on the host.
    """

    def __init__(self, reader: GradReader, gate: OptimizerGate | None, monitored: set[int],
                 host_branches: bool) -> None:
        self.reader = reader
        self.gate = gate
        self.monitored = monitored
        self.host_branches = host_branches

    @property
    def host_branches(self) -> bool:
        return self._host_branches

    @host_branches.setter
    def host_branches(self, value: bool) -> None:
        # The reader's float64 fallback for overflowed norms reads a flag on the host:
        # on the CPU path only.
        self._host_branches = value
        self.reader.refine_overflow = value

    def _needed(self, flag: Tensor) -> bool:
        return not self.host_branches or bool(flag)  # host read on the CPU only

    def clamp_(self, m: Measurement, value_threshold: Tensor, any_clipped: Tensor) -> Tensor | None:
        """Clamp every gradient to its layer's value threshold; return the per-layer
        norms after, or ``None`` when nothing was clamped (``any_clipped`` read on the
        CPU only). A non-finite step is clamped too: its finite parts still count."""
        if not self._needed(any_clipped | m.nonfinite):
            return None
        F.clamp_(m.grads, m.plan.groups, value_threshold.index_select(0, m.plan.layer_index))
        return self.reader.layer_norms(m)

    def zero_where_(self, m: Measurement, flag: Tensor) -> None:
        """Zero every gradient if the 0-dim bool ``flag`` is true (NaN-safe)."""
        if self._needed(flag):
            F.zero_where_(m.grads, flag)

    def scale_(self, m: Measurement, coef: Tensor) -> None:
        """Multiply every gradient by the 0-dim ``coef`` (at most 1)."""
        if self.gate is not None and self.gate.can_scale(self.monitored):
            # The fused optimizer multiplies by coef as it reads each gradient for its
            # update (grad_scale): no pass of our own.
            self.gate.scale(coef)
        elif self._needed(coef < 1.0):
            F.scale_(m.grads, m.plan.groups, coef)


class ClipPolicy:
    """The interface of a clipping mode; the base clips nothing (``clip="none"``).

    Attributes:
        mode: the ``clip`` mode it implements.
        scales_by_norm: the mode scales all gradients by one coefficient, which a
            fused optimizer can apply through ``grad_scale`` (see ``NORM_MODES``).
    """

    mode: ClassVar[str] = "none"

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.scales_by_norm = self.mode in NORM_MODES

    def decide(self, m: Measurement, d: Detection) -> Decision:
        """What to do at this step; reads nothing on the host."""
        n, dev = m.num_layers, m.layer_norm.device
        return Decision(
            value_threshold=torch.full((n,), math.inf, device=dev),
            value_clipped=torch.zeros((), dtype=torch.bool, device=dev),
            coef=torch.ones((), device=dev),
            threshold=d.norm_threshold[0],
        )

    def apply_(self, m: Measurement, d: Detection, decision: Decision,
               editor: GradEditor) -> Decision:
        """Clip the gradients in place as decided; fill in the norms after."""
        decision.layer_norm = m.layer_norm
        return self._finish(m, decision, editor)

    def _ceiling(self, threshold: Tensor) -> Tensor:
        max_norm = self.config.max_norm
        return threshold if max_norm is None else threshold.clamp(max=max_norm)

    def _finish(self, m: Measurement, decision: Decision, editor: GradEditor) -> Decision:
        if self.scales_by_norm:
            # Never make a non-finite step worse: NaN * coef is still NaN, but a NaN
            # coefficient would spread it to every finite gradient.
            coef = torch.where(torch.isfinite(decision.coef), decision.coef, 1.0)
            decision.coef = coef
            editor.scale_(m, coef)
            decision.layer_norm = decision.layer_norm * coef
        if decision.norm_clipped is None:
            decision.norm_clipped = decision.coef < 1.0
        return decision


class NormPolicy(ClipPolicy):
    """``clip="norm"``: the coefficient of ``torch.nn.utils.clip_grad_norm_``."""

    mode = "norm"

    def decide(self, m: Measurement, d: Detection) -> Decision:
        decision = super().decide(m, d)
        max_norm = self.config.max_norm
        decision.threshold = torch.full((), max_norm, device=m.layer_norm.device)
        decision.coef = (max_norm / (m.global_norm + 1e-6)).clamp(max=1.0)
        return decision


class ValuePolicy(ClipPolicy):
    """``clip="value"``: every element clamped to ``[-clip_value, clip_value]``."""

    mode = "value"

    def decide(self, m: Measurement, d: Detection) -> Decision:
        decision = super().decide(m, d)
        dev, value = m.layer_norm.device, self.config.clip_value
        decision.threshold = torch.full((), value, device=dev)
        decision.value_threshold = torch.full((m.num_layers,), value, device=dev)
        decision.value_clipped = (m.layer_max > value).any()
        return decision

    def apply_(self, m: Measurement, d: Detection, decision: Decision,
               editor: GradEditor) -> Decision:
        after = editor.clamp_(m, decision.value_threshold, decision.value_clipped)
        decision.layer_norm = m.layer_norm if after is None else after
        return self._finish(m, decision, editor)


class AgcPolicy(ClipPolicy):
    """``clip="agc"``: unit-wise adaptive clipping against the weights' norms."""

    mode = "agc"

    def decide(self, m: Measurement, d: Detection) -> Decision:
        decision = super().decide(m, d)
        decision.threshold = torch.full((), math.nan, device=m.layer_norm.device)
        return decision

    def apply_(self, m: Measurement, d: Detection, decision: Decision,
               editor: GradEditor) -> Decision:
        cfg, plan = self.config, m.plan
        post, decision.norm_clipped = F.agc_(editor.reader.params(plan), m.grads,
                                             cfg.clip_factor, cfg.agc_eps, m.layer_norm.device)
        decision.layer_norm = F.layer_sum_of_squares(post, plan.layer_index,
                                                     m.num_layers).sqrt()
        return self._finish(m, decision, editor)


class ZScorePolicy(ClipPolicy):
    """``clip="zscore"``: the global norm scaled back to the model's boundary."""

    mode = "zscore"

    def _threshold(self, m: Measurement, d: Detection) -> Tensor:
        return d.norm_threshold[0]

    def decide(self, m: Measurement, d: Detection) -> Decision:
        decision = super().decide(m, d)
        threshold = self._ceiling(self._threshold(m, d))
        decision.threshold = threshold
        decision.coef = torch.where(m.global_norm > threshold, threshold / m.global_norm, 1.0)
        return decision


class PercentilePolicy(ZScorePolicy):
    """``clip="percentile"``: the global norm scaled back to a percentile of the recent
    global norms (none until ``warmup_steps`` of them are known)."""

    mode = "percentile"

    def _threshold(self, m: Measurement, d: Detection) -> Tensor:
        cfg = self.config
        log_q = d.window.quantile(cfg.percentile / 100.0, rows=slice(0, 1))[0]
        filled = d.window.filled(rows=slice(0, 1))[0]
        return torch.where(filled >= cfg.warmup_steps, log_q.exp(), math.inf)


class AutoPolicy(ClipPolicy):
    """``clip="auto"``: outliers in a few components are clipped by value, in the layers
    where they are, at the layer's typical max |g| plus ``clip_z`` deviations; what
    still exceeds its threshold after that (diffuse growth) is scaled down by one
    coefficient for the whole model, its direction kept."""

    mode = "auto"

    def decide(self, m: Measurement, d: Detection) -> Decision:
        decision = super().decide(m, d)
        n = m.num_layers
        lm = slice(n + 1, 2 * n + 1)  # the layers' log max |g| channels
        decision.value_threshold = torch.where(
            d.concentrated, (d.mean[lm] + d.clip_z[lm] * d.std[lm]).exp(), math.inf
        )
        decision.value_clipped = d.concentrated.any()
        decision.threshold = self._ceiling(decision.threshold)
        return decision

    def apply_(self, m: Measurement, d: Detection, decision: Decision,
               editor: GradEditor) -> Decision:
        after = editor.clamp_(m, decision.value_threshold, decision.value_clipped)
        post_layer = m.layer_norm if after is None else after
        post_global = F.global_norm_of(post_layer)
        post = torch.cat([post_global.reshape(1), post_layer])
        # The model's threshold may sit below its boundary (tightened): any model norm
        # above it is scaled; layers only when anomalous.
        over = torch.cat([d.armed[:1] & m.valid[:1], d.anomalous[1:]]) & (
            post > d.norm_threshold
        )
        coef = torch.where(over, d.norm_threshold / post, 1.0).min().clamp(max=1.0)
        max_norm = self.config.max_norm
        if max_norm is not None:
            coef = torch.minimum(
                coef, torch.where(post_global > max_norm, max_norm / post_global, 1.0)
            )
        decision.coef = coef
        decision.layer_norm = post_layer
        return self._finish(m, decision, editor)


POLICIES: dict[str, type[ClipPolicy]] = {
    cls.mode: cls
    for cls in (AutoPolicy, NormPolicy, ValuePolicy, AgcPolicy, ZScorePolicy,
                PercentilePolicy, ClipPolicy)
}


def make_policy(config: MonitorConfig) -> ClipPolicy:
    """The policy of ``config.clip``."""
    return POLICIES[config.clip](config)
