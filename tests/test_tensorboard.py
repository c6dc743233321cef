"""TensorBoard through the reporter contract: ``attach(report_to=["tensorboard"])``
writes every step's metrics, the events and histograms, read back here with
TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GradStream, mlp

import gradwatch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

SPIKE = 30


def _train(tmp_path, steps=40, **kwargs):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, log_every=10, warmup_steps=5, **kwargs)
    stream = GradStream(model)
    for t in range(steps):
        stream.write(diffuse={"2": 50.0} if t == SPIKE else None)
        monitor.step(loss=torch.tensor(1.0 / (t + 1)))
        opt.step()
    return monitor


def _read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0,
                                                         "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_every_step_its_metrics_events_and_histograms(tmp_path):
    monitor = _train(tmp_path, run_dir=tmp_path / "run", report_to=["tensorboard"])
    steps = monitor.steps().set_index("step")
    hist = monitor.history()
    recorded = monitor.events()
    monitor.detach()
    acc = _read(tmp_path / "run" / "tensorboard")  # beside the run record by default
    norms = _scalars(acc, "gradwatch/global_norm")
    assert sorted(norms) == list(range(40))
    assert [norms[s] for s in range(40)] == pytest.approx(list(steps.global_norm), rel=1e-6)
    assert [_scalars(acc, "gradwatch/loss")[s] for s in range(40)] == pytest.approx(
        [1.0 / (t + 1) for t in range(40)], rel=1e-6)
    assert list(_scalars(acc, "gradwatch/lr").values()) == pytest.approx([0.01] * 40)
    # Cumulative action counts, the same keys W&B gets.
    clipped = _scalars(acc, "gradwatch/actions/clip_norm")
    assert clipped[39] == (steps.action == "clip_norm").sum() >= 1
    assert _scalars(acc, "gradwatch/explosion")[SPIKE] == 1
    # The update ratio where it was measured (the first step of each interval).
    measured = hist[hist.update_ratio.notna() & (hist.layer == "2")]
    got = _scalars(acc, "gradwatch/update_ratio/2")
    assert sorted(got) == list(measured.step) == [0, 10, 20, 30]
    assert [got[s] for s in sorted(got)] == pytest.approx(list(measured.update_ratio), rel=1e-6)
    # Every event as text at its step (the spike's among them); a histogram per
    # logging interval.
    events = acc.Tensors("gradwatch/events/text_summary")
    assert [e.step for e in events] == list(recorded.step) and SPIKE in list(recorded.step)
    spike = events[list(recorded.step).index(SPIKE)].tensor_proto.string_val[0].decode()
    assert spike.startswith("**explosion**") and "clip_norm" in spike
    assert [h.step for h in acc.Histograms("gradwatch/layer_log10_grad_norm")] == [9, 19, 29, 39]
    config = acc.Tensors("gradwatch/config/text_summary")[0].tensor_proto.string_val[0]
    assert b"| clip | 'auto' |" in config


def test_tensorboard_dir_and_the_default_without_a_record(tmp_path, monkeypatch):
    _train(tmp_path, run_dir=False, report_to="tensorboard",
           tensorboard_dir=tmp_path / "tb").detach()
    assert len(_read(tmp_path / "tb").Scalars("gradwatch/global_norm")) == 40
    monkeypatch.chdir(tmp_path)
    _train(tmp_path, run_dir=False, report_to=["tensorboard"]).detach()
    (written,) = (tmp_path / "runs").iterdir()  # TensorBoard's own default: runs/<date>_<host>
    assert len(_read(written).Scalars("gradwatch/global_norm")) == 40


def test_an_unknown_tracker_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"report_to='neptune' is not a tracker gradwatch "
                       r"reports to: use 'wandb', 'tensorboard', 'mlflow', or pass your own "
                       r"reporter in reporters=\[...\]"):
        gradwatch.attach(mlp(), run_dir=False, report_to=["tensorboard", "neptune"])


def test_a_failing_writer_warns_once_and_training_and_the_record_go_on(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10,
                               report_to="tensorboard")
    reporter = next(r for r in monitor._reporters.reporters
                    if type(r).__name__ == "TensorBoardReporter")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    reporter.writer.add_scalar = disk_full
    stream = GradStream(model)
    with pytest.warns(UserWarning, match=r"TensorBoardReporter.report failed \(OSError"):
        for _ in range(30):
            stream.write()
            monitor.step()
            opt.step()
    monitor.detach()
    from gradwatch.report import load_run

    assert len(load_run(tmp_path / "run").steps) == 30
    assert math.isfinite(monitor.steps().global_norm.iloc[-1])
