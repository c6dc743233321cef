"""The gradient-clipping methods compared in the efficacy experiments, behind one
interface: ``hook = make(method, model, optimizer)``; call ``hook()`` between
``backward()`` and ``optimizer.step()``. Every hook records, per step, the global
gradient norm before and after it, so "clipped" and "flagged" mean the same thing
for every method:

* clipped: the hook made the gradient smaller (or skipped the step);
* flagged: the method itself called the step anomalous. For gradwatch, its events
  (explosion, nonfinite); for ZClip, its z-score rule firing after its warm-up (not
  a clip by its fixed ``max_grad_norm`` ceiling); for AutoClip, a norm above its
  running quantile; fixed clipping flags nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

METHODS = ("none", "value", "norm", "zclip", "autoclip", "gradwatch")


def load_digits(normalise: bool):
    """scikit-learn's bundled digits, split the same way as ``gradwatch demo``'s."""
    from gradwatch.demo import load_digits as load

    return load(normalise)


def setup(spec: tuple[str, dict], seed: int, width: int, lr: float):
    """A digits MLP (64-width-width-10), SGD with momentum 0.9, the method's hook and the
    batch generator, all seeded by ``seed``."""
    method, opts = spec
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return model, opt, make(method, model, opt, **opts), torch.Generator().manual_seed(seed)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(test loss, accuracy)."""
    with torch.no_grad():
        logits = model(x)
        return (float(nn.functional.cross_entropy(logits, y)),
                float((logits.argmax(1) == y).float().mean()))


def global_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@dataclass
class Hook:
    name: str
    fn: Any
    pre: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)
    flagged_steps: set[int] = field(default_factory=set)
    monitor: Any = None
    step: int = 0

    def __call__(self, model: nn.Module) -> None:
        before = global_norm(model)
        self.fn()
        after = global_norm(model)
        self.pre.append(before)
        self.post.append(after)
        self.step += 1

    def clipped(self) -> list[bool]:
        if self.monitor is not None:  # clipped or skipped, as the monitor recorded it
            return list(self.monitor.steps().action != "none")
        return [
            (math.isfinite(a) and math.isfinite(b) and b < a * (1 - 1e-6))
            or (not math.isfinite(a) and math.isfinite(b))
            for a, b in zip(self.pre, self.post)
        ]

    def flagged(self) -> set[int]:
        if self.monitor is not None:
            events = self.monitor.events()
            return set(int(s) for s in events.step)
        return set(self.flagged_steps)


def make(method: str, model: nn.Module, optimizer: torch.optim.Optimizer,
         threshold: float | None = None, **options: Any) -> Hook:
    """A hook for ``method`` (``threshold`` for "value" and "norm")."""
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "none":
        return Hook(method, lambda: None)
    if method == "value":
        return Hook(f"value({threshold:g})",
                    lambda: torch.nn.utils.clip_grad_value_(params, threshold))
    if method == "norm":
        return Hook(f"norm({threshold:g})",
                    lambda: torch.nn.utils.clip_grad_norm_(params, threshold))
    if method == "zclip":
        from zclip import ZClip

        zc = ZClip(**options)
        # ZClip's default max_grad_norm=1.0 is a fixed ceiling applied at every step
        # (min with its adaptive threshold), not only during its warm-up.
        name = "zclip" if zc.max_grad_norm == 1.0 else (
            "zclip(no ceiling)" if zc.max_grad_norm is None else f"zclip({zc.max_grad_norm:g})")
        hook = Hook(name, None)

        def run() -> None:
            # Flagged: ZClip's own anomaly rule (z above its threshold) fired, not a
            # clip by its fixed ceiling. Read before step(), which updates its EMA.
            if zc.initialized:
                n = global_norm(model)
                if math.isfinite(n) and zc._compute_clip_val(n) is not None:
                    hook.flagged_steps.add(hook.step)
            zc.step(model)

        hook.fn = run
        return hook
    if method == "autoclip":
        from autoclip.torch import QuantileClip

        qc = QuantileClip(model.parameters(), quantile=0.9, history_length=1000,
                          global_threshold=True)
        hook = Hook("autoclip", None)

        def run() -> None:
            n = global_norm(model)
            qc.step()
            if global_norm(model) < n * (1 - 1e-6):
                hook.flagged_steps.add(hook.step)

        hook.fn = run
        return hook
    if method == "gradwatch":
        import gradwatch

        name = "gradwatch" + "".join(
            f"({k}={v:g})" if isinstance(v, (int, float)) else f"({k}={v})"
            for k, v in options.items() if k != "run_dir")
        monitor = gradwatch.attach(model, optimizer, run_dir=options.pop("run_dir", False),
                                   **options)
        return Hook(name, monitor.step, monitor=monitor)
    raise ValueError(f"method={method!r}: one of {METHODS}")
