"""PyTorch Lightning: ``GradWatchCallback``, one line to attach gradwatch to a Trainer.

The callback maps Lightning's "gradients are final" moment, ``on_before_optimizer_step``
(after accumulation and ``GradScaler.unscale_``, before Lightning's own clipping), onto
:meth:`gradwatch.GradMonitor.step`. All statistics live in the monitor. It takes over
clipping, so a Trainer that also clips (``gradient_clip_val``) is refused with the fix.
With a ``WandbLogger`` the monitor logs into that logger's run; only global rank 0
reports. The monitor's state travels in Trainer checkpoints through the callback's
``state_dict``, so ``Trainer.fit(ckpt_path=...)`` resumes with the same statistics.

Each ``fit`` ends the monitor's session: at ``on_train_end`` the run record is written
and marked finished; a ``fit`` that raises (``on_exception``) marks it crashed with the
exception's type, even when the caller catches it. The same callback in a later ``fit``
continues the same run: a monitor for that fit's optimizer, restored from the last
one's state, records into the same run directory, its steps numbered on (a checkpoint
given with ``ckpt_path`` is restored instead). ``callback.monitor`` is the current
fit's monitor; its in-memory tables start at that fit, the run record holds them all.

The loss of each optimizer step is taken from ``on_before_backward`` (on the device,
unscaled under AMP) and recorded as the monitor's ``loss``: with gradient accumulation,
the sum of the micro-batches' losses as Lightning backpropagates them (each divided by
``accumulate_grad_batches``), which is the mean of their ``training_step`` losses.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

import gradwatch
from gradwatch.config import resolve_config
from gradwatch.reporters import ActionCounts, Chunk, Reporter

INSTALL = 'pip install "gradwatch[lightning]"'

if importlib.util.find_spec("lightning") is None:  # pragma: no cover - exercised by hand
    raise ImportError(f"gradwatch.integrations.lightning needs Lightning: {INSTALL}")

import lightning.pytorch as pl  # noqa: E402


class GradWatchCallback(pl.Callback):
    """Attach a :class:`gradwatch.GradMonitor` to the module a Trainer fits.

    Args:
        config: a :class:`gradwatch.MonitorConfig`.
        run_dir: as in :func:`gradwatch.attach` (rank 0 only).
        wandb: ``"auto"`` (default): report to the run of the Trainer's ``WandbLogger``
            if it has one; ``True``/dict/reporter as in :func:`gradwatch.attach`;
            ``False``: no W&B.
        **overrides: :class:`gradwatch.MonitorConfig` fields.
    """

    def __init__(
        self,
        *,
        config: gradwatch.MonitorConfig | None = None,
        run_dir: Any = True,
        wandb: Any = "auto",
        **overrides: Any,
    ) -> None:
        # Validate now, not at fit time: a bad option fails where it was written.
        self.config = resolve_config(config, overrides)
        self.run_dir = run_dir
        self.wandb = wandb
        self.monitor: gradwatch.GradMonitor | None = None
        self._pending_state: dict[str, Any] | None = None
        # The monitor is stepping: made at on_train_start, ended with its fit.
        self._live = False
        # The loss backpropagated since the last optimizer step (a device tensor).
        self._loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            raise ValueError(
                f"Trainer(gradient_clip_val={clip!r}) clips after GradWatchCallback has "
                "already clipped, so every step would be clipped twice: pass "
                "gradient_clip_val=None and let gradwatch clip (for a fixed norm: "
                f"GradWatchCallback(clip='norm', max_norm={clip!r}))"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GradWatchCallback needs automatic optimization: with "
                "automatic_optimization=False, call monitor.step() yourself between "
                "manual_backward and optimizer.step()"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"GradWatchCallback supports one optimizer, the Trainer has {len(optimizers)}"
            )
        optimizer = optimizers[0]
        gated = optimizer
        if isinstance(optimizer, torch.optim.LBFGS):
            # LBFGS evaluates its closure several times a step, and Lightning calls
            # on_before_optimizer_step after every evaluation: each is measured and
            # clipped as a step of its own, with no optimizer to gate.
            warnings.warn(
                "GradWatchCallback: LBFGS evaluates its closure several times an "
                "optimizer step, and gradwatch measures and clips each evaluation as a "
                "step of its own, without gating the optimizer: a non-finite step "
                "cannot be skipped (pass nonfinite='zero' to zero its gradients)",
                stacklevel=2,
            )
            gated = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        rank_zero = trainer.is_global_zero
        wandb: Any = False
        if rank_zero:
            wandb = self.wandb
            if wandb == "auto":
                wandb = self._wandb_from_loggers(trainer)
        others = [lg for lg in trainer.loggers if type(lg).__name__ != "WandbLogger"]
        # A later fit continues the last one's run: its state and its run directory.
        state, run_dir = self._pending_state, self.run_dir if rank_zero else False
        previous = self.monitor
        if previous is not None:
            previous.detach()  # already, unless its fit ended without a hook
            if state is None:
                state = previous.state_dict()
            run_dir = previous.run_dir if previous.run_dir is not None else False
        self.monitor = gradwatch.attach(
            pl_module,
            gated,
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            config=self.config,
            run_dir=run_dir,
            wandb=wandb,
            reporters=[LoggerReporter(others)] if rank_zero and others else (),
        )
        self._live = True
        self._loss = None
        self._pending_state = None
        if state is not None:
            self.monitor.load_state_dict(state)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # The loss Lightning backpropagates is training_step's divided by
        # accumulate_grad_batches, so the sum over an optimizer step's micro-batches is
        # the mean of their training_step losses. All on the device: no host read.
        if not self._live:
            return
        value = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            # AMP hands this hook the scaled loss; the scale is read as the device
            # tensor it is (get_scale() would synchronise).
            scale = scaler._get_scale_async()  # set by the scale() just before this hook
            if scale is not None:
                value = value / scale
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._live and self.monitor is not None:
            loss, self._loss = self._loss, None
            self.monitor.step(loss=loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Also when the caller catches it (a notebook): the record holds every step
        # measured and says the fit crashed, and how.
        self._end(type(exception).__name__)

    def _end(self, error: str | None = None) -> None:
        if self.monitor is not None and self._live:
            self._live = False
            self.monitor.detach(error=error)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self._pending_state is not None:  # what the next fit starts from
            return dict(self._pending_state)
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._live and self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:  # restored before training starts: applied when the monitor is made
            self._pending_state = state_dict

    @staticmethod
    def _wandb_from_loggers(trainer: pl.Trainer) -> Any:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                from gradwatch.wandb_reporter import WandbReporter

                return WandbReporter(run=logger.experiment)
        return False


class LoggerReporter(Reporter):
    """Sends the monitor's per-step metrics to Lightning loggers (CSV, TensorBoard, ...)
    with ``log_metrics(metrics, step=<monitor step>)``, every ``log_every`` steps.

    W&B is reported by :class:`gradwatch.wandb_reporter.WandbReporter` instead, which
    adds histograms and alerts and keeps its own step metric.
    """

    def __init__(self, loggers: list[Any], prefix: str = "gradwatch") -> None:
        self.loggers = loggers
        self.prefix = prefix
        self._actions = ActionCounts()

    def report(self, chunk: Chunk) -> None:
        p = self.prefix
        for step, values in zip(chunk.steps, chunk.metrics()):
            values = {**values, **self._actions.add(values["action"])}
            metrics = {f"{p}/{k}": float(v) for k, v in values.items() if k != "action"}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=int(step))

    def close(self, error: str | None) -> None:
        for logger in self.loggers:
            logger.save()
