"""MLflow through the reporter contract: ``attach(report_to=["mlflow"])`` logs every
step's metrics into the active MLflow run (or one it starts), the config as parameters
and the events as an artifact, read back here with ``MlflowClient`` from a local SQLite
store (MLflow 3 has retired the file store)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import GradStream, mlp

import gradwatch

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

SPIKE = 30


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store, artifacts under tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _train(steps=40, **kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, warmup_steps=5,
                               **kwargs)
    stream = GradStream(model)
    for t in range(steps):
        stream.write(diffuse={"2": 50.0} if t == SPIKE else None)
        monitor.step(loss=torch.tensor(1.0 / (t + 1)))
        opt.step()
    return monitor


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_run_it_starts_holds_every_step_the_config_and_the_events(store):
    monitor = _train(report_to=["mlflow"])
    steps = monitor.steps().set_index("step")
    events = monitor.events()
    hist = monitor.history()
    reporter = next(r for r in monitor._reporters.reporters
                    if type(r).__name__ == "MlflowReporter")
    monitor.detach()
    client = MlflowClient(store)
    run = client.get_run(reporter.run_id)
    assert run.info.status == "FINISHED"  # started by the reporter, so ended by it
    assert run.data.params["gradwatch.clip"] == "auto"
    assert run.data.params["gradwatch.log_every"] == "10"
    norms = _history(client, reporter.run_id, "gradwatch/global_norm")
    assert sorted(norms) == list(range(40))
    assert [norms[s] for s in range(40)] == pytest.approx(list(steps.global_norm), rel=1e-6)
    assert _history(client, reporter.run_id, "gradwatch/loss")[39] == pytest.approx(1 / 40)
    assert _history(client, reporter.run_id, "gradwatch/explosion")[SPIKE] == 1
    counts = _history(client, reporter.run_id, "gradwatch/actions/clip_norm")
    assert counts[39] == (steps.action == "clip_norm").sum() >= 1
    ratios = _history(client, reporter.run_id, "gradwatch/update_ratio/2")
    assert sorted(ratios) == sorted(hist[hist.update_ratio.notna() & (hist.layer == "2")].step)
    logged = json.loads(mlflow.artifacts.load_text(
        f"runs:/{reporter.run_id}/gradwatch/events.json"))
    assert [e["step"] for e in logged] == list(events.step) and SPIKE in list(events.step)
    assert logged[list(events.step).index(SPIKE)]["kind"] == "explosion"


def test_the_active_run_is_used_and_left_open(store):
    with mlflow.start_run() as active:
        monitor = _train(steps=20, report_to="mlflow")
        monitor.detach()
        assert mlflow.active_run().info.run_id == active.info.run_id  # still the user's
    client = MlflowClient(store)
    assert len(_history(client, active.info.run_id, "gradwatch/global_norm")) == 20
    assert client.get_run(active.info.run_id).info.status == "FINISHED"  # ended by its owner


def test_a_crash_marks_the_run_it_started_failed(store):
    monitor = _train(steps=10, report_to="mlflow")
    reporter = next(r for r in monitor._reporters.reporters
                    if type(r).__name__ == "MlflowReporter")
    monitor.detach(error="RuntimeError")
    assert MlflowClient(store).get_run(reporter.run_id).info.status == "FAILED"


def test_a_tracking_server_that_fails_warns_once_and_training_goes_on(store):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, report_to="mlflow")
    reporter = next(r for r in monitor._reporters.reporters
                    if type(r).__name__ == "MlflowReporter")

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    reporter._client.log_batch = unreachable
    stream = GradStream(model)
    with pytest.warns(UserWarning, match=r"MlflowReporter.report failed \(ConnectionError"):
        for _ in range(30):
            stream.write()
            monitor.step()
            opt.step()
    assert len(monitor.steps()) == 30
    monitor.detach()
