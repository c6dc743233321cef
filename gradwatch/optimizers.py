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
