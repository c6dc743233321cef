"""Hugging Face Trainer: ``GradWatchTrainerCallback``.

The Trainer clips (``max_grad_norm``) before it calls ``on_pre_optimizer_step``, so the
callback requires ``max_grad_norm=0`` and does the clipping itself in that hook; the
gradients are final there (accumulated, and unscaled by the Trainer's own norm read).
It never unscales or clips through the accelerator a second time. With
``report_to="wandb"`` it logs into the Trainer's W&B run; only the main process
reports. The monitor's state is written into every Trainer checkpoint
(``gradwatch_state.pt``) and read back on ``resume_from_checkpoint`` from
``output_dir/checkpoint-<step>``; a checkpoint elsewhere is named with ``resume_from=``
(the Trainer does not tell callbacks where it resumed from).

Each ``train()`` ends the monitor's session at ``on_train_end`` (the run record is
written and marked finished). The same callback in a later ``train()`` continues the
same run: a monitor restored from the last one's state records into the same run
directory, its steps numbered on (a checkpoint resumed from is restored instead).
``callback.monitor`` is the current ``train()``'s monitor; its in-memory tables start
there, the run record holds them all. The Trainer has no exception hook for callbacks:
a ``train()`` that raises and is caught leaves the record ``running`` until the next
``train()`` with this callback continues it, or the interpreter exits.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch

import gradwatch
from gradwatch.config import resolve_config

INSTALL = 'pip install "gradwatch[huggingface]"'
STATE_FILE = "gradwatch_state.pt"

if importlib.util.find_spec("transformers") is None:  # pragma: no cover
    raise ImportError(f"gradwatch.integrations.huggingface needs transformers: {INSTALL}")

from transformers import TrainerCallback  # noqa: E402


class GradWatchTrainerCallback(TrainerCallback):
    """Attach a :class:`gradwatch.GradMonitor` to the model a ``Trainer`` trains.

    Args:
        config: a :class:`gradwatch.MonitorConfig`.
        run_dir: as in :func:`gradwatch.attach` (main process only).
        wandb: ``"auto"`` (default): the Trainer's W&B run when ``report_to`` includes
            ``"wandb"``; ``True``/dict/reporter as in :func:`gradwatch.attach`; ``False``.
        tensorboard: ``"auto"`` (default): when ``report_to`` includes
            ``"tensorboard"`` and tensorboard is installed, a
            :class:`~gradwatch.tensorboard_reporter.TensorBoardReporter` writing beside
            the Trainer's own scalars (into ``TENSORBOARD_LOGGING_DIR`` when it is set,
            else ``<output_dir>/runs/gradwatch``); ``True`` for one whatever
            ``report_to`` says; ``False``.
        mlflow: ``"auto"`` (default): when ``report_to`` includes ``"mlflow"`` and
            mlflow is installed, a :class:`~gradwatch.mlflow_reporter.MlflowReporter`
            logging into the run the Trainer's MLflow callback started; ``True`` or
            ``False`` to choose.
        resume_from: the checkpoint directory that ``trainer.train(resume_from_checkpoint=)``
            resumes from, when it is not under ``output_dir``; by default the state is
            read from ``output_dir/checkpoint-<global step>``.
        **overrides: :class:`gradwatch.MonitorConfig` fields.
    """

    def __init__(self, *, config: gradwatch.MonitorConfig | None = None, run_dir: Any = True,
                 wandb: Any = "auto", tensorboard: Any = "auto", mlflow: Any = "auto",
                 resume_from: str | os.PathLike[str] | None = None,
                 **overrides: Any) -> None:
        self.config = resolve_config(config, overrides)
        for name, value in (("tensorboard", tensorboard), ("mlflow", mlflow)):
            if value not in ("auto", True, False):
                raise ValueError(f"{name}={value!r} must be 'auto', True or False")
        self.run_dir = run_dir
        self.wandb = wandb
        self.tensorboard = tensorboard
        self.mlflow = mlflow
        self.resume_from = resume_from
        self.monitor: gradwatch.GradMonitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm!r}): the Trainer clips "
                "before GradWatchTrainerCallback sees the gradients; pass max_grad_norm=0 and "
                "let gradwatch clip (for a fixed norm: GradWatchTrainerCallback(clip='norm', "
                f"max_norm={args.max_grad_norm!r}))"
            )
        inner = getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer wraps it
        scaler = getattr(optimizer, "scaler", None)
        main = state.is_world_process_zero
        wandb: Any = False
        reporters = []
        if main:
            wandb = self.wandb
            if wandb == "auto":
                wandb = self._trainer_wandb(args)
            if self._wanted(args, "tensorboard", self.tensorboard):
                from gradwatch.tensorboard_reporter import TensorBoardReporter

                reporters.append(TensorBoardReporter(self._tensorboard_dir(args)))
            if self._wanted(args, "mlflow", self.mlflow):
                from gradwatch.mlflow_reporter import MlflowReporter

                reporters.append(MlflowReporter())
        # A later train() continues the last one's run: its state and its run directory.
        carried, run_dir = None, self.run_dir if main else False
        previous = self.monitor
        if previous is not None:
            previous.detach()  # already, unless its train() raised
            carried = previous.state_dict()
            run_dir = previous.run_dir if previous.run_dir is not None else False
        self.monitor = gradwatch.attach(
            model, inner,
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            config=self.config, run_dir=run_dir, wandb=wandb, reporters=reporters,
        )
        if carried is not None and state.global_step == 0:
            self.monitor.load_state_dict(carried)
        if state.global_step > 0:  # resumed: the checkpoint it resumed from holds our state
            folder = self.resume_from or os.path.join(
                args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                self.monitor.load_state_dict(torch.load(path, weights_only=True))
            else:
                warnings.warn(
                    f"gradwatch: the Trainer resumed at step {state.global_step} but there is "
                    f"no {STATE_FILE} in {folder}, so the gradient statistics start afresh. "
                    "If the checkpoint is elsewhere, pass "
                    "GradWatchTrainerCallback(resume_from=<that checkpoint directory>)",
                    stacklevel=2,
                )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step()

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.detach()

    @staticmethod
    def _tensorboard_dir(args) -> str:
        """The Trainer's TensorBoard directory where it is known before its callback
        makes it (``TENSORBOARD_LOGGING_DIR``; ``logging_dir`` before transformers 5),
        else ``<output_dir>/runs/gradwatch``: beside the Trainer's
        ``<output_dir>/runs/<date>_<host>``, so ``--logdir <output_dir>/runs`` shows both."""
        folder = os.getenv("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
        if folder:
            return os.path.expanduser(folder)
        return os.path.join(args.output_dir, "runs", "gradwatch")

    @staticmethod
    def _wanted(args, tracker: str, choice: Any) -> bool:
        """Whether to report to ``tracker``: ``choice`` if given, else whether the
        Trainer reports to it (``report_to``) and it is installed."""
        if choice != "auto":
            return bool(choice)
        report_to = args.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        wanted = tracker in report_to or "all" in report_to
        return wanted and importlib.util.find_spec(tracker) is not None

    @staticmethod
    def _trainer_wandb(args) -> Any:
        report_to = args.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        if "wandb" not in report_to and "all" not in report_to:
            return False
        import wandb as wandb_module

        from gradwatch.wandb_reporter import WandbReporter

        return WandbReporter(run=wandb_module.run) if wandb_module.run is not None else True
