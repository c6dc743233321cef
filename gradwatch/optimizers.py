"""What the monitor needs to know about an optimizer: whether a smaller gradient makes
a smaller step.

For SGD (with or without momentum) the step is the learning rate times the gradient,
so clipping the gradient's norm bounds the step. Adaptive optimizers (Adam, AdamW,
Adagrad, RMSprop, Adafactor, Lion and the like) divide by a running estimate of the
gradient's own scale, or keep only its sign: scaling every gradient of one step down
changes their step little, and holding many steps at a smaller scale only slows their
statistics. ``auto``'s step bounding (the threshold tightening of
``MonitorConfig.crossing_rate``) is therefore used with SGD-type optimizers only.
"""

from __future__ import annotations

import torch

# torch's own optimizers whose step is proportional to the gradient.
_PROPORTIONAL = (torch.optim.SGD, torch.optim.ASGD)
# Words in an optimizer's class name, or keys of its defaults, that mark it adaptive
# (for optimizers from other packages: bitsandbytes' Adam8bit, apex's FusedAdam, Lion).
_ADAPTIVE_NAMES = ("adam", "adafactor", "adagrad", "adadelta", "rmsprop", "lion", "sophia",
                   "rprop", "lamb", "lars", "shampoo", "muon")
_ADAPTIVE_KEYS = ("betas", "beta2", "alpha", "rho", "etas", "decay_rate")


def step_scales_with_gradient(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer``'s step is proportional to the gradient (SGD-type), so that
    bounding the gradient's norm bounds the step. ``False`` for adaptive optimizers,
    for an unknown one that looks adaptive, and when there is no optimizer."""
    if optimizer is None:
        return False
    if isinstance(optimizer, _PROPORTIONAL):
        return True
    name = type(optimizer).__name__.lower()
    if any(word in name for word in _ADAPTIVE_NAMES):
        return False
    defaults = getattr(optimizer, "defaults", {}) or {}
    return not any(key in defaults for key in _ADAPTIVE_KEYS) and "momentum" in defaults


def refuse_repeated_closure(optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse an optimizer whose ``step(closure)`` moves the parameters and then
    evaluates the closure again: ``torch.optim.LBFGS`` (its iterations and line search)
    and SAM-style optimizers (a ``base_optimizer``, or ``first_step``/``second_step``:
    gradients at ``w``, then at the perturbed ``w + e``).

    A monitor steps once per optimizer step, on the gradients that step uses, and skips
    a flagged step before it changes anything. Such an optimizer computes the gradients
    it uses in the middle of its own step, after it has moved the parameters, so there
    is no such moment: a non-finite gradient found there would already be on its way
    into the parameters, and the flag would skip the next, healthy step instead. Other
    optimizers that do this are refused when they first do it (see
    :class:`~gradwatch.gate.OptimizerGate`).

    Raises:
        ValueError: naming the optimizer, why, and what to do instead.
    """
    if optimizer is None:
        return
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"gradwatch cannot gate {name}: it evaluates its closure many times in one "
            "step (its iterations and line search) and moves the parameters between "
            "evaluations, so there is no single moment at which a step's gradients are "
            "final, and a non-finite gradient found in a later evaluation would already "
            "be moving the parameters. To watch its gradients, attach without it, "
            "gradwatch.attach(model, optimizer=None, ...), and call monitor.step() "
            "yourself inside the closure after backward: every evaluation is then "
            "measured (and clipped) as a step of its own, and nothing is skipped "
            "(gradwatch cannot keep a non-finite gradient out of an LBFGS step; with "
            "nonfinite='zero', LBFGS without a line search stops at one)"
        )
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer) or (
        callable(getattr(optimizer, "first_step", None))
        and callable(getattr(optimizer, "second_step", None))
    ):
        fix = (
            "attach to its base optimizer, gradwatch.attach(model, "
            "optimizer.base_optimizer, ...)"
            if isinstance(base, torch.optim.Optimizer)
            else "attach with optimizer=None"
        )
        raise ValueError(
            f"gradwatch cannot gate {name}, a SAM-style optimizer: its step computes the "
            "gradients it uses at perturbed parameters (w + e), after it has moved them, "
            "so a step cannot be skipped from outside it. Instead, "
            f"{fix} and call monitor.step() yourself after the backward at w + e, "
            "before the base optimizer steps (with first_step/second_step: "
            "first_step(), backward, monitor.step(), second_step())"
        )
