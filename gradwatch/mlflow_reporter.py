"""MLflow reporting: the monitor's metrics in an MLflow run.

``MlflowReporter`` logs into the active run (``mlflow.active_run()``: one the training
script, the Hugging Face Trainer or Lightning's ``MLFlowLogger`` started) and starts one
only when there is none, at the tracking URI the environment sets
(``MLFLOW_TRACKING_URI``) or the one given. The keys are every tracker's
(:func:`gradwatch.rows.row_metrics` under ``gradwatch/``, with the cumulative
``actions/<action>`` counts), each at its monitor step, sent in batches with
``MlflowClient.log_batch``: one call per 1,000 values, every ``log_every`` steps. The
configuration goes in as parameters (``gradwatch.<field>``); the events, which MLflow
has no per-step text for, as the artifact ``gradwatch/events.json`` when the run closes.

Everything it sends reached the host in the monitor's one transfer. A missing ``mlflow``
package is a configuration error at construction; a failure of the tracking server
while training warns once and training goes on (see
:class:`~gradwatch.reporters.ReporterSet`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from typing import Any

from .reporters import ActionCounts, Chunk, Reporter, RunInfo

INSTALL = 'pip install "gradwatch[mlflow]"'
BATCH = 1000  # MLflow's limit of metrics per log_batch call
EVENTS_KEPT = 10_000  # the events artifact keeps the first this many


def require_installed() -> None:
    """Raise ImportError with the install command if mlflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise ImportError(f"the MLflow reporter needs mlflow: {INSTALL}")


class MlflowReporter(Reporter):
    """Logs the monitor's records to an MLflow run.

    Args:
        tracking_uri: the tracking server or store (``sqlite:///mlflow.db``, an
            ``http://`` server); ``None``: MLflow's own choice (``MLFLOW_TRACKING_URI``).
        experiment: the experiment of a run this reporter starts (``None``: MLflow's
            default one).
        run_name: the name of a run this reporter starts.
        prefix: the key prefix (``gradwatch``).
        layer_norms: also log ``grad_norm/<layer>`` for every layer at every step.

    Raises:
        ImportError: mlflow is not installed (the message has the command).
        ValueError: ``prefix`` is empty.
    """

    def __init__(self, tracking_uri: str | None = None, *, experiment: str | None = None,
                 run_name: str | None = None, prefix: str = "gradwatch",
                 layer_norms: bool = True) -> None:
        require_installed()
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix={prefix!r} must be a non-empty string, e.g. 'gradwatch'")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.prefix = prefix.strip("/")
        self.layer_norms = layer_norms
        self.run_id: str | None = None
        self._client: Any = None
        self._owns_run = False
        self._actions = ActionCounts()
        self._events: list[dict[str, Any]] = []

    def start(self, run: RunInfo) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if self.tracking_uri is not None:
            mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        if active is None:
            if self.experiment is not None:
                mlflow.set_experiment(self.experiment)
            active = mlflow.start_run(run_name=self.run_name)
            self._owns_run = True
        self.run_id = active.info.run_id
        self._client = MlflowClient(mlflow.get_tracking_uri())
        if run.first_step == 0:  # a resumed run has its parameters already
            mlflow.log_params({f"{self.prefix}.{k}": _param(v)
                               for k, v in run.config.to_dict().items()})

    def report(self, chunk: Chunk) -> None:
        if self._client is None or not len(chunk.steps):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for step, values in zip(chunk.steps, chunk.metrics(layer_norms=self.layer_norms)):
            for key, value in {**values, **self._actions.add(values["action"])}.items():
                if key != "action" and math.isfinite(value):
                    metrics.append(Metric(f"{self.prefix}/{key}", float(value), now, int(step)))
        for start in range(0, len(metrics), BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])
        room = EVENTS_KEPT - len(self._events)
        self._events.extend(_plain(e) for e in chunk.events[:max(room, 0)])

    def close(self, error: str | None) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        try:
            if self._events:
                client.log_text(self.run_id, json.dumps(self._events, indent=1),
                                f"{self.prefix}/events.json")
        finally:
            if self._owns_run:
                import mlflow

                status = "FAILED" if error is not None else "FINISHED"
                client.set_terminated(self.run_id, status=status)
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status=status)


def _param(value: Any) -> str:
    return str(value)[:500]  # MLflow's limit on a parameter's length


def _plain(event: dict[str, Any]) -> dict[str, Any]:
    """An event with plain JSON values (numpy numbers as Python ones, NaN as None)."""
    out = {}
    for key, value in event.items():
        if hasattr(value, "item"):  # a numpy number of a host row (never a device tensor)
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
