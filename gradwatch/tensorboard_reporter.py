"""TensorBoard reporting through ``torch.utils.tensorboard.SummaryWriter``.

The same keys as every tracker (:func:`gradwatch.rows.row_metrics`, under
``gradwatch/``), each step at its own monitor step: the global and clipped norms, the
threshold, z, the typical norm, the coefficient, the loss and learning rate where
recorded, the flags, ``grad_norm/<layer>``, ``flagged_z/<layer>``,
``update_ratio/<layer>`` where measured, and the cumulative ``actions/<action>``
counts. Every event is written as text at its step (``gradwatch/events``), and each
chunk's last step adds a histogram of the layers' log10 gradient norms
(``gradwatch/layer_log10_grad_norm``).

Everything it writes reached the host in the monitor's one transfer every
``log_every`` steps; the writer's own thread puts it on disk. A missing ``tensorboard``
package is a configuration error at construction; a failure while writing warns once
and training goes on (see :class:`~gradwatch.reporters.ReporterSet`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import numpy as np

from .reporters import ActionCounts, Chunk, Reporter, RunInfo

INSTALL = 'pip install "gradwatch[tensorboard]"'


def require_installed() -> None:
    """Raise ImportError with the install command if tensorboard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(f"the TensorBoard reporter needs tensorboard: {INSTALL}")


class TensorBoardReporter(Reporter):
    """Writes the monitor's records as TensorBoard scalars, text and histograms.

    Args:
        log_dir: the event files' directory (``SummaryWriter(log_dir)``); ``None``:
            TensorBoard's default, ``runs/<date>_<host>``.
        prefix: the key prefix (``gradwatch``).
        layer_norms: also write ``grad_norm/<layer>`` for every layer (one scalar per
            layer per step).
        histograms: write the layers' log10 norm histogram once per ``log_every``.

    Raises:
        ImportError: ``tensorboard`` is not installed (the message has the command).
        ValueError: ``prefix`` is empty.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *,
                 prefix: str = "gradwatch", layer_norms: bool = True,
                 histograms: bool = True) -> None:
        require_installed()
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix={prefix!r} must be a non-empty string, e.g. 'gradwatch'")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.prefix = prefix.strip("/")
        self.layer_norms = layer_norms
        self.histograms = histograms
        self.writer: Any = None
        self._actions = ActionCounts()

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's steps replace what a crashed run wrote after them.
        self.writer = SummaryWriter(self.log_dir, purge_step=run.first_step or None)
        self.log_dir = self.writer.log_dir
        self.writer.add_text(f"{self.prefix}/config", _markdown_table(run.config.to_dict()),
                             run.first_step)

    def report(self, chunk: Chunk) -> None:
        if self.writer is None or not len(chunk.steps):
            return
        p, writer = self.prefix, self.writer
        for step, metrics in zip(chunk.steps, chunk.metrics(layer_norms=self.layer_norms)):
            step = int(step)
            for key, value in {**metrics, **self._actions.add(metrics["action"])}.items():
                if key != "action" and not (isinstance(value, float) and math.isnan(value)):
                    writer.add_scalar(f"{p}/{key}", value, step)
        for event in chunk.events:
            layer = f" in {event['layer']}" if event.get("layer") else ""
            writer.add_text(f"{p}/events", f"**{event['kind']}**{layer}, action "
                            f"{event['action']}: {event['reason']}", int(event["step"]))
        if self.histograms:
            last = chunk.rows[-1]
            norms = last[chunk.layout.layer["grad_norm"]]
            norms = norms[np.isfinite(norms) & (norms > 0)]
            if norms.size:
                writer.add_histogram(f"{p}/layer_log10_grad_norm", np.log10(norms),
                                     int(chunk.steps[-1]))
        writer.flush()

    def close(self, error: str | None) -> None:
        if self.writer is None:
            return
        if error is not None:
            self.writer.add_text(f"{self.prefix}/status", f"crashed: {error}")
        self.writer.close()
        self.writer = None


def _markdown_table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v!r} |" for k, v in values.items())
    return f"| option | value |\n|---|---|\n{rows}"
