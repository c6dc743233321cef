"""The gradient monitor: measure every layer, learn its normal, detect, clip.

Call :meth:`GradMonitor.step` once per optimizer step, after the gradients are final
(after accumulation and ``GradScaler.unscale_``) and before ``optimizer.step()``.

What one step does, all on the device and without reading any value on the host:

1. one fused pass for the L2 norm and one for the max |g| of every gradient (fp32
   accumulation), reduced to per-layer norms, max |g| and concentration
   (max |g| / RMS of g);
2. z-scores of their logs against bias-corrected running means and deviations;
3. a decision (clip by norm or value, skip, or nothing) expressed as tensors: a norm
   coefficient clamped to at most 1, per-layer value thresholds (``inf`` for none),
   a skip flag; applied unconditionally, like ``torch.nn.utils.clip_grad_norm_``;
4. a robust update of the statistics (values beyond the threshold are fed back
   clipped, non-finite values never enter) and, in ``auto``, of how far the model's
   threshold is tightened by frequent crossings;
5. one row written into a device buffer. Every ``log_every`` steps the buffer goes to
   the host in one transfer; that is the only host synchronisation.

When the gradients live on the CPU there is no device to wait for: reading a flag
costs nothing, while a pass that would change nothing (a clamp at ``inf``, a multiply
by 1) still reads and writes every gradient. There the monitor reads its decision
flags and skips such passes, the way ZClip skips its scale on steps it does not clip.
On accelerators every pass is launched unconditionally and nothing is read.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from . import functional as F
from .config import MonitorConfig, resolve_config
from .layers import GradPlan, LayerTable
from .records import (
    ACTIONS,
    CLIP_NORM,
    CLIP_VALUE,
    NONE,
    SKIP,
    HostRecord,
    RowLayout,
    nan_if_inf,
)
from .reporting import Chunk, Reporter, ReporterSet
from .skip import OptimizerGate, supports_found_inf
from .stats import EmaStats, RecentWindow

STATE_VERSION = 1

# Monitors with reporters are held until detach() and flushed at interpreter exit, so
# the run record holds every step even when the monitor itself went out of scope (a
# training function that returned, a notebook cell run again).
_live_monitors: set[GradMonitor] = set()
# The type of the uncaught exception that is ending the program, if one is (recorded
# by the excepthook below, which runs before the exit hooks).
_uncaught: str | None = None
_excepthook_installed = False


def _close_live_monitors() -> None:
    for monitor in list(_live_monitors):
        monitor._exit_error = _uncaught
        try:
            monitor.detach()
        except Exception:  # noqa: BLE001 - exiting: never raise from atexit
            pass


def _install_excepthook() -> None:
    """Note the type of an uncaught exception, then hand it to the previous hook, so a
    run record closed at exit says the program crashed instead of finished."""
    global _excepthook_installed
    if _excepthook_installed:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):  # noqa: ANN001 - sys.excepthook's signature
        global _uncaught
        _uncaught = getattr(kind, "__name__", str(kind))
        previous(kind, value, tb)

    sys.excepthook = hook
    _excepthook_installed = True


def family_z(z: float, num_tests: int) -> float:
    """The z threshold that keeps ``num_tests`` one-sided Gaussian tests at the
    false-alarm rate of a single test at ``z`` (Bonferroni).

    With 100 layers a per-layer z of 4.0 becomes 4.98 and 2.5 becomes 3.84, so a deep
    model is not flagged more often than a shallow one.
    """
    if num_tests <= 1:
        return z
    nd = NormalDist()
    tail = (1.0 - nd.cdf(z)) / num_tests
    if tail <= 0.0:  # z beyond double precision's tail: already as strict as it gets
        return z
    return max(z, nd.inv_cdf(1.0 - tail))

# Below this many updates a channel is fed raw values; from then on values are
# winsorised at the detection threshold, so one early spike cannot inflate the
# variance for hundreds of steps.
_ROBUST_AFTER = 5
# How far one crossing of the model's boundary tightens its clipping threshold towards
# the typical norm (a share of the way; see MonitorConfig.crossing_rate).
_TIGHTEN_STEP = 0.15
_MAX_PLANS = 64


@dataclasses.dataclass(frozen=True)
class Probe:
    """A device computation a reporter asked for every ``every`` steps."""

    fn: Any
    every: int


class StepResult:
    """What :meth:`GradMonitor.step` measured and did at one step.

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
        """Whether a z-score exceeded ``z_threshold`` at this step (synchronises)."""
        return bool(self._get("explosion"))

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
            "nonfinite": self.nonfinite,
            "flagged_layers": self.flagged_layers,
        }

    def __repr__(self) -> str:
        return f"StepResult(step={self.step}, <on device; read a property to see values>)"


class GradMonitor:
    """Watches a model's gradients, learns their normal range, detects and clips.

    Prefer :func:`gradwatch.attach`. Args as there.

    Args:
        model: the module being trained.
        optimizer: its optimizer. With it, a step with non-finite gradients (or one
            beyond ``skip_threshold``) is skipped so parameters and optimizer state
            stay unchanged; without it, such gradients are zeroed instead.
        scaler: the ``torch.amp.GradScaler`` in use, if any. Non-finite steps are then
            recorded as ``amp_overflow`` and left for the scaler to skip.
        config: a :class:`MonitorConfig`.
        reporters: objects following :class:`gradwatch.reporting.Reporter` (the run
            record, W&B) that receive the records every ``log_every`` steps.
        process_group: under ``torch.distributed``, the group across which gradients
            are sharded. ``"auto"`` (default) finds it: FSDP2 ``DTensor`` gradients
            and FSDP1 (``use_orig_params=True``) are reduced across their group; DDP
            and a single process need no communication. ``None`` never communicates.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        config: MonitorConfig | None = None,
        reporters: Sequence[Reporter] = (),
        process_group: Any = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model={type(model).__name__} is not a torch.nn.Module; pass the module "
                "being trained"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer; pass "
                "the optimizer you call step() on, or None"
            )
        self.config = config if config is not None else MonitorConfig()
        self._ddp = model if dist_utils.is_ddp(model) else None
        model = dist_utils.unwrap(model)  # DDP: the same gradients, the model's own names
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.layers = LayerTable.from_model(model, self.config)
        complex_params = [n for n, p in zip(self.layers.param_names, self.layers.params)
                          if p.is_complex()]
        if complex_params:
            raise ValueError(
                f"model has complex parameters ({', '.join(complex_params[:3])}): gradwatch "
                "monitors real-valued gradients; view them as real pairs "
                "(torch.view_as_real) or attach to a submodule without them"
            )
        # Statistics live on the accelerator if the model has one, so gathering
        # per-tensor results never copies from a device to the host.
        devices = [p.device for p in self.layers.params]
        self.device = next((d for d in devices if d.type != "cpu"), devices[0])
        self._reducer = self._make_reducer(process_group)
        self._dtensors = any(hasattr(p, "_local_tensor") for p in self.layers.params)
        # CPU: branch on decision flags to skip passes that would change nothing
        # (a host read there is free); accelerators never read on the step.
        self._host_branches = self.device.type == "cpu"
        if optimizer is not None:
            self._warn_params_outside(optimizer)
        n = self.layers.num_layers
        self._layout = RowLayout(n)
        # Channels: [model log-norm, layer log-norms (L), layer log max|g| (L),
        # layer log concentration (L)].
        self._stats = EmaStats(1 + 3 * n, self.config.ema_decay, self.device)
        self._window = RecentWindow(1 + n, self.config.window, self.device)
        # auto: where the model's clipping threshold sits between its boundary (0) and
        # the typical norm (1), driven by how often norms cross the boundary.
        self._tightness = torch.zeros((), dtype=torch.float32, device=self.device)
        self._tightens = (self.config.clip == "auto" and self.config.max_ratio is not None
                          and self.config.crossing_rate is not None)
        self._record = HostRecord(self._layout, self.layers.names, self.config,
                                  self.config.history_limit)
        self._buffer = torch.empty(
            (self.config.log_every, self._layout.width), dtype=torch.float32, device=self.device
        )
        self._pending = 0
        self._step = 0
        self._exit_error: str | None = None
        self._plans: dict[tuple[int, ...], GradPlan] = {}
        self._warned_scaled = False
        self._warned_unhandled = False
        self._amp_flag = torch.full((), float(self.scaler is not None), device=self.device)
        # Per-channel z thresholds: the model's channel uses the configured values, the
        # 3 * n layer channels the family-corrected ones.
        cfg = self.config
        self.layer_z_threshold = family_z(cfg.z_threshold, n)
        self.layer_clip_z = family_z(cfg.clip_z, n)
        self._z_event = torch.tensor(
            [cfg.z_threshold] + [self.layer_z_threshold] * n, device=self.device
        )
        self._z_clip = torch.tensor(
            [cfg.clip_z] + [self.layer_clip_z] * (3 * n), device=self.device
        )
        self._record.layer_z_threshold = self.layer_z_threshold
        self._probes: list[Probe] = []
        self._extras: dict[int, dict[str, Tensor]] = {}
        self._reporters = ReporterSet()
        try:
            for reporter in reporters:
                self.add_reporter(reporter)
        except BaseException:
            # A reporter that cannot start is a configuration error: undo the others
            # (no half-made run left behind) and the optimizer wrapper, then raise.
            self._reporters.call("close", self)
            _live_monitors.discard(self)
            if getattr(self, "_gate", None) is not None:
                self._gate.remove()
            raise

        self._monitored = {id(p) for p in self.layers.params}
        self._gate = self._make_gate()
        self._record.skip_how = self._skip_description()
        self._attached = True

    # ------------------------------------------------------------------ setup
    def _make_reducer(self, process_group: Any) -> dist_utils.ShardReducer | None:
        params = self.layers.params
        self._sum_weight: tuple[float, ...] | None = None
        if process_group == "auto":
            group, sharded = dist_utils.shard_layout(self.model, params)
        else:  # the caller's contract: every gradient element lives on one rank of it
            group, sharded = process_group, (True,) * len(params)
        if group is None or torch.distributed.get_world_size(group) == 1:
            return None
        if self.config.clip == "agc":
            raise ValueError(
                "clip='agc' is not supported with sharded gradients (FSDP): its unit-wise "
                "norms need whole parameters; use clip='auto', 'norm' or 'value'"
            )
        reducer = dist_utils.ShardReducer(group)
        if not all(sharded):
            # A whole (replicated) gradient is on every rank of the group: its sums
            # count once, from the group's rank 0.
            lead = torch.distributed.get_rank(group) == 0
            self._sum_weight = tuple(1.0 if s or lead else 0.0 for s in sharded)
        # FSDP1 exposes each parameter as this rank's flat slice: the whole parameter's
        # size is the sum over the group (DTensors report their global size). Which
        # parameters these are is the same on every rank, so all take part or none.
        from torch.distributed.tensor import DTensor

        flat = [s and not isinstance(p, DTensor) for p, s in zip(params, sharded)]
        if any(flat):
            total = reducer.total([p.numel() if f else 0 for p, f in zip(params, flat)],
                                  self.device)
            numel = tuple(t if f else p.numel() for p, f, t in zip(params, flat, total))
            self.layers = dataclasses.replace(self.layers, param_numel=numel)
        return reducer

    def _warn_params_outside(self, optimizer: torch.optim.Optimizer) -> None:
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        outside = [
            n
            for n, p in zip(self.layers.param_names, self.layers.params)
            if p.requires_grad and id(p) not in in_optimizer
        ]
        if outside:
            warnings.warn(
                f"gradwatch: {len(outside)} trainable parameter(s) of the model are not in "
                f"the optimizer given to attach ({', '.join(outside[:3])}"
                f"{', ...' if len(outside) > 3 else ''}): a step gradwatch skips is skipped "
                "for this optimizer only. Attach one monitor per optimizer's submodule, or "
                "use nonfinite='zero'.",
                stacklevel=3,
            )

    def _make_gate(self) -> OptimizerGate | None:
        cfg = self.config
        if self.optimizer is None:
            if cfg.skip_threshold is not None:
                raise ValueError(
                    f"skip_threshold={cfg.skip_threshold!r} needs the optimizer to skip its "
                    "step: pass it, gradwatch.attach(model, optimizer, ...), or leave "
                    "skip_threshold=None"
                )
            return None
        own_nonfinite = cfg.nonfinite == "skip" and self.scaler is None
        # A fused optimizer also takes the norm-clipping coefficient (grad_scale).
        scales = cfg.clip in ("norm", "zscore", "percentile", "auto")
        if own_nonfinite or cfg.skip_threshold is not None or (
            scales and supports_found_inf(self.optimizer)
        ):
            return OptimizerGate(self.optimizer)
        return None

    @property
    def _handles_nonfinite(self) -> bool:
        """Whether a non-finite step is kept from reaching the parameters."""
        return (
            self.scaler is not None
            or self.config.nonfinite == "zero"
            or self.optimizer is not None
        )

    def _skip_description(self) -> str:
        if self.config.nonfinite == "zero":
            return "gradients zeroed"
        if self.optimizer is None:
            return (
                "gradients left as they are: no optimizer was given to skip; pass it to "
                "gradwatch.attach or use nonfinite='zero'"
            )
        if supports_found_inf(self.optimizer):
            return "optimizer step skipped (fused found_inf)"
        return "optimizer step skipped"

    def _plan(self) -> tuple[GradPlan, list[Tensor]]:
        # Sharded (FSDP) gradients are read through their local shards. Empty gradients
        # (and empty shards) carry no information, and some reductions reject them.
        params = self.layers.params
        if self._dtensors:
            local = [None if p.grad is None else dist_utils.local(p.grad) for p in params]
        else:
            local = [p.grad for p in params]
        positions = tuple(i for i, g in enumerate(local) if g is not None and g.numel() > 0)
        grads = [local[i] for i in positions]
        plan = self._plans.pop(positions, None)
        if plan is None or not plan.matches(grads):
            plan = GradPlan.build(self.layers, positions, grads, self.device,
                                  self._sum_weight)
        # Most recently used last; a model whose set of gradients changes every step
        # (routing, dropped layers) keeps a bounded number of plans.
        self._plans[positions] = plan
        if len(self._plans) > _MAX_PLANS:
            del self._plans[next(iter(self._plans))]
        return plan, grads

    # ------------------------------------------------------------------ the step
    def step(self) -> StepResult:
        """Measure, update statistics, detect and clip the current gradients in place.

        Call once per optimizer step, after gradients are final (after gradient
        accumulation and ``scaler.unscale_(optimizer)``), before ``optimizer.step()``.
        With a fused optimizer (``fused=True``) the norm-clipping coefficient is applied
        by that ``optimizer.step()`` (its ``grad_scale``) rather than by a pass of its
        own, so ``p.grad`` holds the clipped values once the optimizer has stepped.
        No host synchronisation happens except on every ``log_every``-th step, where
        the buffered records are copied to the host in one transfer.

        Returns:
            A :class:`StepResult` (its values stay on the device until read).
        """
        if not self._attached:
            raise RuntimeError("this monitor was detached; attach a new one with gradwatch.attach")
        with torch.no_grad():
            return self._step_impl()

    def _step_impl(self) -> StepResult:
        cfg = self.config
        self._check_scaler_stage()
        if self._ddp is not None and not self._ddp.require_backward_grad_sync:
            raise RuntimeError(
                "monitor.step() ran inside DistributedDataParallel.no_sync(): these "
                "gradients are this rank's own, not yet averaged, so ranks would measure "
                "and decide differently. Call monitor.step() once per optimizer step, after "
                "the backward of the micro-batch that synchronises (outside no_sync())"
            )
        plan, grads = self._plan()
        n = self.layers.num_layers
        dev = self.device

        # 1. Measure. Per-tensor norms and max|g| in fp32, then per-layer reductions.
        norms, max_abs = F.tensor_norms(grads, plan.groups, dev)
        if not grads:
            norms = max_abs = torch.zeros(0, dtype=torch.float32, device=dev)
        layer_max = F.layer_max(max_abs, plan.layer_index, n)
        if plan.sum_weight is not None:  # replicated tensors count on one rank only
            norms = norms * plan.sum_weight
        layer_sumsq = F.layer_sum_of_squares(norms, plan.layer_index, n)
        present = plan.layer_present
        layer_numel = plan.layer_numel
        if self._reducer is not None:
            # Shards: whole-layer values from one SUM and one MAX all-reduce of 2L
            # values each. A NaN on any rank makes the sum NaN on every rank.
            sums, maxes = self._reducer.sum_and_max(
                torch.cat([layer_sumsq, layer_numel]), torch.cat([layer_max, present.float()])
            )
            layer_sumsq, layer_numel = sums[:n], sums[n:]
            present = maxes[n:] > 0
            # MAX may drop a NaN (comparisons with NaN are false); the sum keeps it.
            layer_max = torch.where(layer_sumsq.isnan(), math.nan, maxes[:n])
        layer_norm = layer_sumsq.sqrt()
        global_norm = layer_sumsq.sum().sqrt()
        # NaN/Inf anywhere makes its tensor's norm, hence the sum, non-finite.
        nonfinite = ~torch.isfinite(global_norm)
        # NaN (so log is NaN and the channel is not updated) where a layer has no
        # gradient or an all-zero one: there is no concentration to speak of.
        concentration = torch.where(
            layer_norm > 0, layer_max * layer_numel.sqrt() / layer_norm, math.nan
        )
        x = torch.cat([global_norm.reshape(1), layer_norm, layer_max, concentration]).log()
        valid = torch.isfinite(x)  # absent layers have norm 0, so log is -inf: invalid

        # 2. Score against the running statistics (state before this step).
        mean, var = self._stats.moments()
        std = var.sqrt().clamp_min(cfg.min_std)
        count = self._stats.count
        warm = count >= cfg.warmup_steps
        scored = valid & warm & ~nonfinite
        z = torch.where(scored, (x - mean) / std, 0.0)
        norm_z = z[: n + 1]  # model, then layers
        # Two levels: beyond z_threshold a step is an explosion (an event); beyond
        # clip_z (usually lower) the adaptive modes clip it back to that boundary.
        # Layer thresholds are raised for the number of layers (see family_z), so the
        # chance that a normal step is flagged does not grow with depth.
        flagged = norm_z > self._z_event
        explosion = flagged.any()
        # How far above its typical (log) value a norm may go before it is clipped, and
        # how far a value fed to the statistics may be from it: clip_z deviations, but
        # at most max_ratio times the typical norm, so a heavy-tailed or steadily rising
        # norm cannot drag its own threshold up.
        bound = self._z_clip * std
        # Channels whose boundary applies: warmed up; with max_ratio, the model's from
        # its second step on. Until its deviation is known, the model's boundary is
        # max_ratio times its running typical norm: a run that blows up in its first
        # steps (a learning rate far too high) is held to the scale of those steps
        # instead of going unclipped until the statistics are warm.
        armed = warm
        if cfg.max_ratio is not None:
            log_r = math.log(cfg.max_ratio)
            model_bound = torch.where(warm[:1], bound[:1].clamp(max=log_r), log_r)
            bound = torch.cat([model_bound, bound[1:]])
            armed = torch.cat([count[:1] > 0, warm[1:]])
        # Beyond that boundary a norm is anomalous (and clipped back to it).
        anomalous = (
            (armed & valid & ~nonfinite)[: n + 1] & (x[: n + 1] > mean[: n + 1] + bound[: n + 1])
        )
        clip_bound = bound
        if self._tightens:
            # Frequent crossings: the model's threshold comes down towards the typical
            # norm (never below), bounding each step at a typical one.
            clip_bound = torch.cat([bound[:1] * (1 - self._tightness), bound[1 : n + 1]])
        norm_thr = torch.where(
            armed[: n + 1], (mean[: n + 1] + clip_bound[: n + 1]).exp(), math.inf
        )
        conc_z = z[2 * n + 1 :]
        concentrated = anomalous[1:] & (conc_z > cfg.concentration_z)

        # Values a reporter asked for at this step (e.g. gradient value histograms),
        # computed on the device from the pre-clip gradients and held until the flush.
        for probe in list(self._probes):
            if self._step % probe.every == 0:
                try:
                    out = probe.fn(self, plan, grads, layer_max)
                except Exception as err:  # noqa: BLE001 - reporting must never stop training
                    self._probes.remove(probe)
                    warnings.warn(
                        f"gradwatch: a reporter's device probe failed ({type(err).__name__}: "
                        f"{err}); it is switched off and training continues",
                        stacklevel=3,
                    )
                    continue
                self._extras.setdefault(self._step, {}).update(out)

        # 3. Decide and clip. Decisions are tensors, applied unconditionally.
        tau = torch.full((n,), math.inf, device=dev)  # per-layer value thresholds
        threshold = norm_thr[0]
        post_layer_norm = layer_norm
        coef = torch.ones((), device=dev)
        value_clipped = torch.zeros((), dtype=torch.bool, device=dev)
        norm_clipped = None  # default: coef < 1
        mode = cfg.clip
        if mode == "norm":
            threshold = torch.full((), cfg.max_norm, device=dev)
            # The same coefficient as torch.nn.utils.clip_grad_norm_.
            coef = (cfg.max_norm / (global_norm + 1e-6)).clamp(max=1.0)
        elif mode == "value":
            threshold = torch.full((), cfg.clip_value, device=dev)
            tau = torch.full((n,), cfg.clip_value, device=dev)
            value_clipped = (layer_max > cfg.clip_value).any()
        elif mode == "agc":
            threshold = torch.full((), math.nan, device=dev)
            params = [self.layers.params[i] for i in plan.positions]
            post, norm_clipped = F.agc_(params, grads, cfg.clip_factor, cfg.agc_eps, dev)
            post_layer_norm = F.layer_sum_of_squares(post, plan.layer_index, n).sqrt()
        elif mode in ("zscore", "percentile"):
            if mode == "percentile":
                log_q = self._window.quantile(cfg.percentile / 100.0, rows=slice(0, 1))[0]
                filled = self._window.filled(rows=slice(0, 1))[0]
                threshold = torch.where(filled >= cfg.warmup_steps, log_q.exp(), math.inf)
            threshold = self._ceiling(threshold)
            coef = torch.where(global_norm > threshold, threshold / global_norm, 1.0)
        elif mode == "auto":
            # Outliers in a few components: value-clip those layers at their own
            # typical max|g| plus clip_z deviations, sparing the other components.
            lm = slice(n + 1, 2 * n + 1)
            tau = torch.where(
                concentrated, (mean[lm] + self._z_clip[lm] * std[lm]).exp(), math.inf
            )
            value_clipped = concentrated.any()
            threshold = self._ceiling(threshold)

        host = self._host_branches
        if mode in ("value", "auto") and (not host or bool(value_clipped | nonfinite)):
            F.clamp_(grads, plan.groups, tau.index_select(0, plan.layer_index))
            post_norms, _ = F.tensor_norms(grads, plan.groups, dev, with_max_abs=False)
            if not grads:
                post_norms = torch.zeros(0, dtype=torch.float32, device=dev)
            if plan.sum_weight is not None:
                post_norms = post_norms * plan.sum_weight
            post_sumsq = F.layer_sum_of_squares(post_norms, plan.layer_index, n)
            if self._reducer is not None:
                post_sumsq = self._reducer.sum(post_sumsq)
            post_layer_norm = post_sumsq.sqrt()
        if mode == "auto":
            # Diffuse growth: whatever still exceeds its threshold after value clipping
            # is scaled down by one coefficient for the whole model (direction kept).
            post_global = post_layer_norm.square().sum().sqrt()
            post = torch.cat([post_global.reshape(1), post_layer_norm])
            # The model's threshold may sit below its boundary (tightened): any model
            # norm above it is scaled; layers only when anomalous.
            over = torch.cat([armed[:1] & valid[:1], anomalous[1:]]) & (post > norm_thr)
            ratios = torch.where(over, norm_thr / post, 1.0)
            coef = ratios.min().clamp(max=1.0)
            if cfg.max_norm is not None:
                coef = torch.minimum(
                    coef,
                    torch.where(post_global > cfg.max_norm, cfg.max_norm / post_global, 1.0),
                )
        if mode in ("norm", "zscore", "percentile", "auto"):
            # Never make a non-finite step worse: NaN * coef is still NaN, but a NaN
            # coefficient would spread it to every finite gradient.
            coef = torch.where(torch.isfinite(coef), coef, 1.0)
            if self._gate is not None and self._gate.can_scale(self._monitored):
                # The fused optimizer multiplies by coef as it reads each gradient for
                # its update (grad_scale): no pass of our own.
                self._gate.scale(coef)
            elif not host or bool(coef < 1.0):
                F.scale_(grads, plan.groups, coef)
            post_layer_norm = post_layer_norm * coef
        if norm_clipped is None:
            norm_clipped = coef < 1.0

        # Skip: a z-score beyond skip_threshold, or non-finite gradients (unless a
        # GradScaler is attached: it skips overflow steps itself).
        skip_z = torch.zeros((), dtype=torch.bool, device=dev)
        if cfg.skip_threshold is not None:
            skip_z = (norm_z >= cfg.skip_threshold).any() & ~nonfinite
        self._skip_(grads, skip_z, nonfinite)
        skipped = skip_z | nonfinite if self._handles_nonfinite else skip_z
        action = torch.where(
            skipped,
            SKIP,
            torch.where(value_clipped, CLIP_VALUE, torch.where(norm_clipped, CLIP_NORM, NONE)),
        )

        # 4. Robust statistics update: winsorise at the clipping boundary, so a spike
        # is fed back as the clipped value and cannot drag the statistics along.
        robust = count >= min(_ROBUST_AFTER, cfg.warmup_steps)
        fed = torch.where(robust, torch.clamp(x, mean - bound, mean + bound), x)
        # Armed during warm-up: only the upper side, so the typical norm still follows
        # the fast fall of the first steps' norms.
        fed = torch.where(armed & ~robust, torch.minimum(fed, mean + bound), fed)
        level = fed
        if cfg.max_ratio is not None:
            # A model norm beyond its boundary is not evidence of where its typical
            # level is (it still widens the spread): the level learns from the steps
            # within the boundary only. So when most steps are beyond it (a learning
            # rate too high for the run), the boundary holds at the scale of the normal
            # steps instead of being walked up by the clipped ones.
            level = torch.cat([torch.where(anomalous[:1], mean[:1], fed[:1]), fed[1:]])
        update = valid & ~nonfinite
        self._stats.update(level, update, spread=fed)
        if self._tightens:
            # A crossing tightens, a step within the boundary relaxes: at equilibrium
            # norms cross it at crossing_rate, or the threshold rests at either end.
            crossed = anomalous[0].float()
            tightened = self._tightness + _TIGHTEN_STEP * (crossed - cfg.crossing_rate)
            self._tightness.copy_(
                torch.where(armed[0] & update[0], tightened.clamp(0.0, 1.0), self._tightness)
            )
        # The window keeps the raw log norms: quantiles are robust to a few spikes.
        self._window.push(x[: n + 1], update[: n + 1], self._step)

        # 5. Record.
        clipped_norm = post_layer_norm.square().sum().sqrt()
        row = self._layout.build(
            {
                "global_norm": global_norm,
                "clipped_norm": clipped_norm,
                "threshold": nan_if_inf(threshold),
                "action": action,
                "explosion": explosion & ~nonfinite,
                "nonfinite": nonfinite,
                "amp": self._amp_flag,
                "z": norm_z[0],
                "typical_norm": mean[0].exp(),
                "coef": coef,
                "skip_z": skip_z,
            },
            {
                "grad_norm": torch.where(present, layer_norm, math.nan),
                "clipped_norm": torch.where(present, post_layer_norm, math.nan),
                "z": norm_z[1:],
                "typical_norm": mean[1 : n + 1].exp(),
                "norm_threshold": nan_if_inf(norm_thr[1:]),
                "max_abs": torch.where(present, layer_max, math.nan),
                "concentration": torch.where(present, concentration, math.nan),
                "concentration_z": conc_z,
                "value_threshold": tau,
                "flagged": flagged[1:] & ~nonfinite,
                "present": present,
            },
        )
        self._buffer[self._pending].copy_(row)
        self._pending += 1
        result = StepResult(self._step, row, self._layout, self.layers.names)
        self._step += 1
        if self._pending == cfg.log_every:
            self.flush()
        return result

    def _ceiling(self, threshold: Tensor) -> Tensor:
        if self.config.max_norm is None:
            return threshold
        return threshold.clamp(max=self.config.max_norm)

    def _skip_(self, grads: list[Tensor], skip_z: Tensor, nonfinite: Tensor) -> None:
        """Make sure a skipped step changes nothing, by the cheapest route available."""
        own_nonfinite = self.scaler is None  # with a scaler, overflow is the scaler's job
        if own_nonfinite and self.config.nonfinite == "zero":
            if not self._host_branches or bool(nonfinite):
                F.zero_where_(grads, nonfinite)  # one extra pass, but no sync for any optimizer
        own_skip = own_nonfinite and self.config.nonfinite == "skip"
        if self._gate is not None and (own_skip or self.config.skip_threshold is not None):
            # (A gate made only to carry the clipping coefficient arms no flag, so a
            # fused optimizer's first step does not read one on the host.)
            self._gate.arm(skip_z | nonfinite if own_skip else skip_z)

    def _check_scaler_stage(self) -> None:
        if self.scaler is None or self.optimizer is None or self._warned_scaled:
            return
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states.get(id(self.optimizer))
        if state is None or state.get("stage") is not OptState.UNSCALED:
            self._warned_scaled = True
            warnings.warn(
                "gradwatch: monitor.step() ran before scaler.unscale_(optimizer); gradients "
                "are still multiplied by the loss scale, so norms and thresholds are off by "
                "that factor. Call scaler.unscale_(optimizer) before monitor.step().",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ host side
    def flush(self) -> None:
        """Copy the buffered rows to the host (one transfer; synchronises)."""
        if self._pending == 0:
            return
        rows = self._buffer[: self._pending]
        extras, self._extras = self._extras, {}
        if extras:  # ride along in the same transfer
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
        else:
            rows_np = rows.cpu().numpy().copy()  # the one host sync
            host_extras = {}
        first = self._step - self._pending
        steps = np.arange(first, self._step, dtype=np.int64)
        self._pending = 0
        new = self._record.add(steps, rows_np)
        if len(self._reporters):
            self._reporters.call("report", self, Chunk(steps, rows_np, new, host_extras))
        if not self._handles_nonfinite and not self._warned_unhandled:
            bad = [e["step"] for e in new if e["kind"] == "nonfinite"]
            if bad:
                self._warned_unhandled = True
                warnings.warn(
                    f"gradwatch: NaN/Inf gradients at step {bad[0]} were left as they are "
                    "because no optimizer was given to skip the step; pass it, "
                    "gradwatch.attach(model, optimizer), or use nonfinite='zero'",
                    stacklevel=3,
                )

    def history(self):
        """Per-layer, per-step records as a long pandas DataFrame.

        Columns: ``step``, ``layer``, ``grad_norm`` (pre-clip), ``clipped_norm``,
        ``z`` (z-score of the log norm; 0 during warm-up), ``typical_norm``,
        ``norm_threshold``, ``max_abs``, ``concentration`` (max |g| / RMS of g),
        ``concentration_z``, ``value_threshold`` (``inf`` when not value-clipped),
        ``flagged``. A layer without gradients at a step has no row for it.
        """
        self.flush()
        return self._record.layer_table()

    def steps(self):
        """Per-step model-level records as a pandas DataFrame (one row per step)."""
        self.flush()
        return self._record.step_table()

    def events(self):
        """Detected events as a pandas DataFrame.

        Columns: ``step``, ``kind`` (``explosion``, ``nonfinite``, ``amp_overflow``),
        ``layer`` (the most anomalous layer), ``layers`` (all of them, comma-joined),
        ``action``, ``reason`` (what was seen and done, with the numbers), ``z``,
        ``global_norm``, ``threshold``.
        """
        self.flush()
        return self._record.event_table()

    def recent_quantiles(self, q: float) -> dict[str, float]:
        """The ``q``-quantile (0-1) of each layer's recent gradient norms (synchronises)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q!r} must be in [0, 1]")
        values = self._window.quantile(q).exp().cpu().tolist()
        return dict(zip(("(model)",) + self.layers.names, values))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to make the same decisions (versioned)."""
        self.flush()
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "layers": list(self.layers.names),
            "layer_numel": [rec["numel"] for rec in self.layers.describe()],
            "config": self.config.to_dict(),
            "stats": self._stats.state_dict(),
            "window": self._window.state_dict(),
            "tightness": self._tightness.clone(),
            "events": [dict(e) for e in self._record.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the model must have the same layers."""
        self.flush()  # rows already measured belong to the steps before the restore
        if not isinstance(state, dict) or "version" not in state:
            raise ValueError(
                "not a gradwatch monitor state: expected the dict returned by "
                "GradMonitor.state_dict()"
            )
        version = state["version"]
        if not isinstance(version, int) or version > STATE_VERSION or version < 1:
            raise ValueError(
                f"monitor state version {version!r} is not supported by this gradwatch "
                f"(which reads versions 1..{STATE_VERSION}); upgrade gradwatch to load it"
            )
        saved = list(state["layers"])
        mine = list(self.layers.names)
        if saved != mine:
            missing = [n for n in mine if n not in saved]
            extra = [n for n in saved if n not in mine]
            raise ValueError(
                "monitor state is from an incompatible model: layers differ "
                f"(saved {len(saved)}, this model {len(mine)}; not in the state: "
                f"{missing[:5]}; not in this model: {extra[:5]}). Load it into a monitor "
                "attached to the same architecture with the same grouping options."
            )
        numel = [rec["numel"] for rec in self.layers.describe()]
        saved_numel = list(state.get("layer_numel", numel))
        if saved_numel != numel:
            i = next(i for i, (a, b) in enumerate(zip(saved_numel, numel)) if a != b)
            raise ValueError(
                f"monitor state is from an incompatible model: layer {mine[i]!r} has "
                f"{numel[i]} parameters here but {saved_numel[i]} in the saved state. Load it "
                "into a monitor attached to the same architecture."
            )
        differing = sorted(
            k for k, v in state.get("config", {}).items() if self.config.to_dict().get(k) != v
        )
        if differing:
            warnings.warn(
                f"gradwatch: resuming with a different config ({', '.join(differing)}); "
                "decisions after resume may differ from the original run",
                stacklevel=2,
            )
        self._stats.load_state_dict({k: v.to(self.device) for k, v in state["stats"].items()})
        self._window.load_state_dict({k: v.to(self.device) for k, v in state["window"].items()})
        self._tightness.copy_(torch.as_tensor(state.get("tightness", 0.0)).to(self.device))
        self._pending = 0
        self._step = int(state["step"])
        self._record.events = [dict(e) for e in state.get("events", [])]
        for reporter in self._reporters.reporters:
            resumed = getattr(reporter, "resumed", None)
            if resumed is not None:
                resumed(self)

    def detach(self) -> None:
        """Flush records, close the reporters and release the optimizer and the model.

        ``step()`` may not be called after. A monitor with reporters (the run record,
        W&B) is otherwise kept alive until interpreter exit, where it is flushed.
        """
        if not self._attached:
            return
        self.flush()
        self._reporters.call("close", self)
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        self._attached = False
        _live_monitors.discard(self)

    def add_probe(self, fn: Any, every: int) -> None:
        """Compute extra device values every ``every`` steps for the reporters.

        ``fn(monitor, plan, grads, layer_max) -> dict[str, Tensor]`` runs inside
        ``step()`` on the pre-clip gradients and must not synchronise; its tensors reach
        the reporters' :class:`~gradwatch.reporting.Chunk` ``extras[step]`` with the
        next flush, in the same single transfer.
        """
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1")
        self._probes.append(Probe(fn, every))

    def add_reporter(self, reporter: Reporter) -> None:
        """Report this monitor's records to ``reporter`` from now on.

        Its ``start`` runs now (an exception there propagates: a reporter that cannot
        start is a configuration error); later failures only warn.
        """
        reporter.start(self)
        self._reporters.reporters.append(reporter)
        _live_monitors.add(self)
        _install_excepthook()
        # atexit runs the last-registered hook first: re-registering after every start
        # puts our flush before the exit hooks of what the reporters started (W&B's).
        atexit.unregister(_close_live_monitors)
        atexit.register(_close_live_monitors)

    @property
    def exit_error(self) -> str | None:
        """At interpreter exit after an uncaught exception: its type's name (the
        reporters closing then record a crash); otherwise ``None``."""
        return self._exit_error

    @property
    def run_dir(self) -> str | None:
        """The directory of this monitor's run record, if it keeps one."""
        for reporter in self._reporters.reporters:
            path = getattr(reporter, "run_dir", None)
            if path is not None:
                return str(path)
        return None

    @property
    def num_steps(self) -> int:
        """How many times :meth:`step` has run (including before a resume)."""
        return self._step

    def __repr__(self) -> str:
        return (
            f"GradMonitor(layers={self.layers.num_layers}, clip={self.config.clip!r}, "
            f"step={self._step})"
        )


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    config: MonitorConfig | None = None,
    run_dir: str | os.PathLike[str] | bool | None = True,
    wandb: bool | dict[str, Any] | Reporter = False,
    reporters: Sequence[Reporter] = (),
    process_group: Any = "auto",
    **overrides: Any,
) -> GradMonitor:
    """Attach a :class:`GradMonitor` to ``model``.

    Args:
        model: the module being trained.
        optimizer: its optimizer, so non-finite (or catastrophic) steps can be skipped.
        scaler: the ``torch.amp.GradScaler`` in use, if any.
        config: a :class:`MonitorConfig`; defaults to ``MonitorConfig()``.
        run_dir: where to record the run (Parquet parts, see
            :mod:`gradwatch.run_record`). ``True`` (default): a new directory under
            ``./gradwatch_runs/``; a path: that directory; ``False``/``None``: no
            record. Under ``torch.distributed``, on rank 0 only.
        wandb: report to Weights & Biases: ``True`` for a
            :class:`~gradwatch.wandb_reporter.WandbReporter` with defaults (it reuses
            ``wandb.run`` if one is active), a dict of its arguments, or a reporter.
            Under ``torch.distributed``, on rank 0 only.
        reporters: more reporters (see :mod:`gradwatch.reporting`).
        process_group: under ``torch.distributed``, the group across which gradients
            are sharded; ``"auto"`` (default) finds FSDP's (see :class:`GradMonitor`).
        **overrides: fields of :class:`MonitorConfig` to set (on top of ``config``).

    Returns:
        The monitor. Call its :meth:`~GradMonitor.step` once per optimizer step.

    Raises:
        ValueError: an option is unknown or invalid (the message names it and the fix).
    """
    config = resolve_config(config, overrides)
    all_reporters = list(reporters)
    if dist_utils.rank() != 0:
        # Under torch.distributed every rank measures and decides alike; only global
        # rank 0 keeps the run record and reports to W&B.
        run_dir = wandb = False
    if run_dir:
        from .run_record import RunRecorder, default_run_dir

        path = default_run_dir() if run_dir is True else run_dir
        flush_every = (config or MonitorConfig()).flush_every
        all_reporters.insert(0, RunRecorder(path, flush_every=flush_every))
    if wandb is not False and wandb is not None:
        from .wandb_reporter import WandbReporter

        if wandb is True:
            wandb = WandbReporter()
        elif isinstance(wandb, dict):
            wandb = WandbReporter(**wandb)
        all_reporters.append(wandb)
    return GradMonitor(model, optimizer, scaler=scaler, config=config, reporters=all_reporters,
                       process_group=process_group)
