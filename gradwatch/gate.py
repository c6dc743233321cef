"""The optimizer gate: it skips a step decided on the device, and carries the
norm-clipping coefficient into a fused optimizer.

A fused optimizer (``Adam``/``AdamW``/``SGD`` with ``fused=True``, CPU included) reads
a ``found_inf`` tensor attribute inside ``step()`` and, when it is 1, leaves the
parameters and its state untouched. That is how ``GradScaler`` skips them without a
host synchronisation, and how :class:`OptimizerGate` skips them too.

Two cases fall back to reading the flag on the host inside ``optimizer.step()`` (one
scalar synchronisation per optimizer step, exactly what ``GradScaler.step`` pays for
such optimizers):

* any optimizer without ``found_inf`` support;
* a fused optimizer while some of its parameters have no state yet (its first steps):
  fused kernels create their state even on a skipped step, and fused SGD fills its
  momentum buffers with uninitialised memory there, which would corrupt the next
  step.

``nonfinite="zero"`` avoids all of this by zeroing the gradients instead.

The same attributes carry norm clipping into a fused optimizer: its kernel divides
every gradient by ``grad_scale`` (in place) as it reads it for the update, so the
monitor sets ``grad_scale = 1 / coefficient`` instead of multiplying the gradients in
a pass of its own. One read-modify-write of all gradients is saved on every step.

A step given a closure (Lightning passes one that runs backward and the monitor) has
the closure evaluated first, so the flag exists before the optimizer changes anything.
Optimizers that move the parameters and then evaluate the closure again (LBFGS,
SAM-style) cannot be gated this way: the known ones are refused at attach, any other
at its first step (see :func:`~gradwatch.optimizers.refuse_repeated_closure`).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from .config import NORM_MODES, MonitorConfig
from .optimizers import refuse_repeated_closure


_MISSING = object()


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a device-side ``found_inf`` attribute."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def make_gate(optimizer: torch.optim.Optimizer | None, scaler: Any,
              config: MonitorConfig) -> OptimizerGate | None:
    """The gate a monitor needs on ``optimizer``, if any: to skip non-finite steps
    (``nonfinite="skip"`` without a GradScaler, which skips them itself) or steps
    beyond ``skip_threshold``, to hand a fused optimizer the norm-clipping
    coefficient, or to measure the update ratio around a step.

    Raises:
        ValueError: ``skip_threshold`` without an optimizer to skip, or an optimizer
            that evaluates its closure again after moving the parameters (LBFGS,
            SAM-style; see :func:`~gradwatch.optimizers.refuse_repeated_closure`).
    """
    if optimizer is None:
        if config.skip_threshold is not None:
            raise ValueError(
                f"skip_threshold={config.skip_threshold!r} needs the optimizer to skip its "
                "step: pass it, gradwatch.attach(model, optimizer, ...), or leave "
                "skip_threshold=None"
            )
        return None
    refuse_repeated_closure(optimizer)
    own_nonfinite = config.nonfinite == "skip" and scaler is None
    if own_nonfinite or config.skip_threshold is not None or config.update_ratio or (
        config.clip in NORM_MODES and supports_found_inf(optimizer)
    ):
        return OptimizerGate(optimizer)
    return None


def skip_description(optimizer: torch.optim.Optimizer | None, config: MonitorConfig) -> str:
    """How a non-finite step is kept from the parameters, as event reasons quote it."""
    if config.nonfinite == "zero":
        return "gradients zeroed"
    if optimizer is None:
        return (
            "gradients left as they are: no optimizer was given to skip; pass it to "
            "gradwatch.attach or use nonfinite='zero'"
        )
    if supports_found_inf(optimizer):
        return "optimizer step skipped (fused found_inf)"
    return "optimizer step skipped"


def _param_key(p: Tensor) -> tuple[int, int]:
    """What changes when a parameter is changed: its version counter (in-place
    updates) and its storage (``p.data = ...``). Host-side, no device sync."""
    try:
        return p._version, p.data_ptr()
    except RuntimeError:  # a tensor subclass without storage (DTensor): version only
        return p._version, 0


def _replay(optimizer: torch.optim.Optimizer, loss: Any) -> Any:
    """The closure handed to ``optimizer.step`` once the gate has evaluated the real
    one: it returns that evaluation's loss, while the parameters are those it was
    computed at.

    An optimizer that moves the parameters and then evaluates the closure again (SAM
    and its variants, LBFGS; the known ones are refused at attach by
    :func:`~gradwatch.optimizers.refuse_repeated_closure`) would get a loss and
    gradients computed elsewhere, and the monitor could not skip its step: it is
    refused here, at its first step, with the fix. Costs one host-side read per
    parameter on steps that pass a closure.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = [_param_key(p) for p in params]

    def closure() -> Any:
        if any(_param_key(p) != key for p, key in zip(params, keys)):
            raise RuntimeError(
                f"{type(optimizer).__name__}.step moved the parameters and then evaluated "
                "its closure again (as SAM-style optimizers and LBFGS do): gradwatch "
                "evaluates the closure before the step to decide whether to skip it, and "
                "cannot skip a step that computes its gradients after changing the "
                "parameters; this step may already have changed them. Attach with "
                "optimizer=None and call monitor.step() yourself inside the closure after "
                "backward, or, for a SAM-style optimizer, attach to its base optimizer "
                "and call monitor.step() after the backward at the perturbed parameters"
            )
        return loss

    return closure


class OptimizerGate:
    """Wraps ``optimizer.step`` so that a step flagged by the monitor does not happen.

    The wrapper is installed as a bound method, so wrappers added later (an LR
    scheduler's step counter, which re-binds ``optimizer.step.__func__``) keep
    calling through it.

    Args:
        optimizer: the optimizer to gate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fused = supports_found_inf(optimizer)
        self._num_params = sum(len(g["params"]) for g in optimizer.param_groups)
        self._flag: Tensor | None = None
        self._coef: Tensor | None = None
        self._probe: Any = None
        self._active = True
        self._all_state = False
        self._had_instance_step = "step" in optimizer.__dict__
        # Gates on one optimizer (one per monitor): grad_scale is optimizer-wide, so
        # only a sole gate may use it.
        optimizer.__dict__.setdefault("_gradwatch_gates", []).append(self)
        self._scale_checked: tuple[int, bool] | None = None
        self._previous = optimizer.step
        original = optimizer.step  # bound (or an earlier wrapper): called as it is
        gate = self

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            closure = kwargs.get("closure", args[0] if args else None)
            if closure is not None and gate._active:
                # Frameworks (Lightning) pass a closure that runs backward and the
                # monitor's step, so the skip flag exists only after it: evaluate it
                # first, as the optimizer would, and hand the optimizer its result.
                with torch.enable_grad():
                    loss = closure()
                args, kwargs = (), {**kwargs, "closure": _replay(opt, loss)}
            flag, gate._flag = gate._flag, None
            coef, gate._coef = gate._coef, None
            probe, gate._probe = gate._probe, None
            if not gate._active:
                return original(*args, **kwargs)
            if flag is not None and not (gate.fused and gate._state_ready(opt)):
                # Host sync: one scalar per optimizer step, as GradScaler does for
                # optimizers without found_inf support. nonfinite="zero" avoids it.
                if bool(flag):
                    return kwargs["closure"]() if "closure" in kwargs else None
                flag = None
            if probe is not None:
                probe.begin()
            if flag is None and coef is None:
                out = original(*args, **kwargs)
            else:
                out = gate._fused_step(original, flag, coef, *args, **kwargs)
            if probe is not None:
                probe.end()
            return out

        step.__name__ = "step"
        step.__doc__ = getattr(original, "__doc__", None)
        if getattr(original, "_wrapped_by_lr_sched", False):
            # An LR scheduler created before attach checks this marker to tell that
            # optimizer.step is still its own counting wrapper (it is: we call it).
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._wrapper = types.MethodType(step, optimizer)
        optimizer.step = self._wrapper  # type: ignore[method-assign]

    def arm(self, flag: Tensor) -> None:
        """Skip the next ``optimizer.step()`` if the 0-dim bool ``flag`` is true."""
        self._flag = flag

    def measure_next(self, probe: Any) -> None:
        """Call ``probe.begin()`` just before the next optimizer step that happens and
        ``probe.end()`` just after it (not around a step the gate skips on the host)."""
        self._probe = probe

    def still_armed_with(self, flag: Tensor) -> bool:
        """Whether ``flag`` is still waiting: no ``optimizer.step()`` consumed it."""
        return self._flag is flag

    def can_scale(self, monitored: set[int]) -> bool:
        """Whether the coefficient may ride in ``grad_scale``: a fused optimizer that
        steps only monitored parameters (``grad_scale`` applies to every parameter it
        steps) and no other monitor's gate on it. Re-checked when the optimizer's
        parameters change (``add_param_group``)."""
        if not self.fused:
            return False
        opt = self.optimizer
        count = sum(len(g["params"]) for g in opt.param_groups)
        if self._scale_checked is None or self._scale_checked[0] != count:
            ok = all(id(p) in monitored for g in opt.param_groups for p in g["params"])
            self._scale_checked = (count, ok)
        return self._scale_checked[1] and len(opt.__dict__.get("_gradwatch_gates", ())) == 1

    def scale(self, coef: Tensor) -> None:
        """Have the next (fused) ``optimizer.step()`` multiply the gradients by the
        0-dim ``coef``, through its ``grad_scale``. Only for ``fused`` gates."""
        self._coef = coef

    def _state_ready(self, opt: torch.optim.Optimizer) -> bool:
        """Whether every parameter about to be stepped already has optimizer state."""
        num_params = sum(len(g["params"]) for g in opt.param_groups)
        if num_params != self._num_params:  # add_param_group: new parameters, no state
            self._num_params, self._all_state = num_params, False
        if self._all_state:
            return True
        if len(opt.state) >= self._num_params:
            self._all_state = True
            return True
        state = opt.state
        return all(
            p in state for g in opt.param_groups for p in g["params"] if p.grad is not None
        )

    def _fused_step(self, original: Any, flag: Tensor | None, coef: Tensor | None,
                    *args: Any, **kwargs: Any) -> Any:
        opt = self.optimizer
        # What GradScaler.step set just before (grad_scale may be set to None), put back
        # exactly as it was afterwards: GradScaler deletes both attributes itself.
        saved = {name: opt.__dict__.get(name, _MISSING) for name in ("found_inf", "grad_scale")}
        if flag is not None:
            # GradScaler may have set its own found_inf just before calling step():
            # merge ours with a maximum, since fused kernels expect exactly 0 or 1.
            mine = flag.to(torch.float32)
            previous = saved["found_inf"]
            if isinstance(previous, Tensor):
                mine = torch.maximum(previous, mine.to(previous.device))
            opt.found_inf = mine  # type: ignore[attr-defined]
        if coef is not None:
            # The kernel divides by grad_scale: a still-scaled GradScaler's scale (None
            # once unscale_ ran) combines with the clipping coefficient.
            scale = 1.0 / coef.to(torch.float32)
            previous = saved["grad_scale"]
            if isinstance(previous, Tensor):
                scale = previous * scale.to(previous.device)
            opt.grad_scale = scale  # type: ignore[attr-defined]
        try:
            return original(*args, **kwargs)
        finally:
            for name, value in saved.items():
                if value is _MISSING:
                    opt.__dict__.pop(name, None)
                else:
                    setattr(opt, name, value)

    def remove(self) -> None:
        """Stop gating. The optimizer's own ``step`` comes back if nothing wrapped it
        since; otherwise the gate stays in the chain but passes every call through."""
        self._active = False
        self._flag = None
        self._coef = None
        self._probe = None
        gates = self.optimizer.__dict__.get("_gradwatch_gates", [])
        if self in gates:
            gates.remove(self)
        if self.optimizer.__dict__.get("step") is self._wrapper:
            if self._had_instance_step:
                self.optimizer.step = self._previous  # type: ignore[method-assign]
            else:
                del self.optimizer.__dict__["step"]
