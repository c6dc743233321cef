"""Accelerate: ``GradWatchAccelerate``, for a hand-written loop.

Use it where gradients are final, inside ``if accelerator.sync_gradients:``::

    gw = GradWatchAccelerate(accelerator, model, optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                gw.step()            # unscales once, measures, detects, clips
            optimizer.step()
            optimizer.zero_grad()

It unscales an fp16 ``GradScaler`` exactly once per optimizer step (as
``accelerator.clip_grad_norm_`` would), so do not clip with the accelerator too. Only
the main process reports.
"""

from __future__ import annotations

from typing import Any

import torch

import gradwatch
from gradwatch.config import resolve_config


class GradWatchAccelerate:
    """A :class:`gradwatch.GradMonitor` wired to an ``accelerate.Accelerator``.

    Args:
        accelerator: the Accelerator.
        model: the prepared model.
        optimizer: the prepared optimizer (an ``AcceleratedOptimizer``).
        config, run_dir, wandb, **overrides: as in :func:`gradwatch.attach`
            (reporting on the main process only).
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, *,
                 config: gradwatch.MonitorConfig | None = None, run_dir: Any = True,
                 wandb: Any = False, **overrides: Any) -> None:
        self.accelerator = accelerator
        self.optimizer = optimizer
        main = accelerator.is_main_process
        scaler = getattr(accelerator, "scaler", None)
        self.monitor = gradwatch.attach(
            accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer),
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            config=resolve_config(config, overrides),
            run_dir=run_dir if main else False, wandb=wandb if main else False,
        )

    def step(self, loss: torch.Tensor | float | None = None) -> gradwatch.StepResult:
        """Unscale once (under fp16), then :meth:`gradwatch.GradMonitor.step` (``loss``
        recorded as there)."""
        if not self.accelerator.sync_gradients:
            raise RuntimeError(
                "GradWatchAccelerate.step() ran on a micro-batch that does not sync "
                "gradients: call it inside `if accelerator.sync_gradients:`"
            )
        if getattr(self.accelerator, "scaler", None) is not None:
            self.accelerator.unscale_gradients(self.optimizer)
        return self.monitor.step(loss=loss)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)

    def detach(self, error: str | None = None) -> None:
        """As :meth:`gradwatch.GradMonitor.detach`: ``error`` (an exception's type, say)
        closes the run record as crashed."""
        self.monitor.detach(error)
