"""``gradwatch.attach``: a monitor and its reporters, built from the user's options.

The reporters are imported here, where they are chosen, so ``import gradwatch`` stays
light and the monitor knows them only through :mod:`gradwatch.reporters`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .config import MonitorConfig, resolve_config
from .monitor import GradMonitor
from .optimizers import refuse_repeated_closure
from .reporters import Reporter


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    config: MonitorConfig | None = None,
    run_dir: str | os.PathLike[str] | bool | None = True,
    wandb: bool | dict[str, Any] | Reporter = False,
    report_to: str | Sequence[str] = (),
    tensorboard_dir: str | os.PathLike[str] | None = None,
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
        report_to: trackers to report to by name: ``"wandb"`` (the same as
            ``wandb=True``), ``"tensorboard"`` (a
            :class:`~gradwatch.tensorboard_reporter.TensorBoardReporter`) and
            ``"mlflow"`` (a :class:`~gradwatch.mlflow_reporter.MlflowReporter` in the
            active MLflow run, or a new one at ``MLFLOW_TRACKING_URI``; pass one in
            ``reporters`` for other options). Under ``torch.distributed``, on rank 0
            only.
        tensorboard_dir: where the TensorBoard event files go; by default
            ``<run_dir>/tensorboard`` when the run is recorded, else TensorBoard's
            ``runs/<date>_<host>``.
        reporters: more reporters (see :mod:`gradwatch.reporters`).
        process_group: under ``torch.distributed``, the group across which gradients
            are sharded; ``"auto"`` (default) finds FSDP's (see :class:`GradMonitor`).
        **overrides: fields of :class:`MonitorConfig` to set (on top of ``config``).

    Returns:
        The monitor. Call its :meth:`~GradMonitor.step` once per optimizer step.

    Raises:
        ValueError: an option is unknown or invalid, or ``optimizer`` evaluates its
            closure again after moving the parameters (LBFGS, SAM-style), so its steps
            cannot be skipped (the message names it and the fix).
    """
    config = resolve_config(config, overrides)
    trackers = _trackers(report_to)
    refuse_repeated_closure(optimizer)  # before a run directory or reporter is made
    all_reporters = list(reporters)
    if dist_utils.rank() != 0:
        # Under torch.distributed every rank measures and decides alike; only global
        # rank 0 keeps the run record and reports to trackers.
        run_dir = wandb = False
        trackers = set()
    if "wandb" in trackers and (wandb is False or wandb is None):
        wandb = True
    if "tensorboard" in trackers:  # before a run directory is made
        from .tensorboard_reporter import require_installed

        require_installed()
    if "mlflow" in trackers:
        from .mlflow_reporter import MlflowReporter

        all_reporters.append(MlflowReporter())
    if wandb is not False and wandb is not None:
        from .wandb_reporter import WandbReporter

        if wandb is True:
            wandb = WandbReporter()
        elif isinstance(wandb, dict):
            wandb = WandbReporter(**wandb)
        all_reporters.append(wandb)
    created = None
    if run_dir:
        from .run_record import RunRecorder, default_run_dir

        # A default directory is created here, atomically, so that processes started
        # in the same second each get their own.
        if run_dir is True:
            path = created = default_run_dir()
        else:
            path = run_dir
        all_reporters.insert(0, RunRecorder(path, flush_every=config.flush_every))
    if "tensorboard" in trackers:
        from .tensorboard_reporter import TensorBoardReporter

        if tensorboard_dir is None and run_dir:
            tensorboard_dir = os.path.join(os.fspath(path), "tensorboard")
        all_reporters.append(TensorBoardReporter(tensorboard_dir))
    try:
        return GradMonitor(model, optimizer, scaler=scaler, config=config,
                           reporters=all_reporters, process_group=process_group)
    except BaseException:
        if created is not None:  # leave no empty directory behind (rmdir keeps a full one)
            with contextlib.suppress(OSError):
                created.rmdir()
        raise


TRACKERS = ("wandb", "tensorboard", "mlflow")


def _trackers(report_to: str | Sequence[str]) -> set[str]:
    """The tracker names of ``report_to``, checked."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"report_to={name!r} is not a tracker gradwatch reports to: use "
                f"{', '.join(map(repr, TRACKERS))}, or pass your own reporter in "
                "reporters=[...]"
            )
    return set(names)
