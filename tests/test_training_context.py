"""The training context recorded beside the gradients: the loss given to
``monitor.step(loss=...)`` and the learning rate of the optimizer's first parameter
group, per step, in ``steps()``, the run record and the report."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import GradStream, mlp

import gradwatch
from gradwatch.report import export_report
from gradwatch.rows import RowLayout, row_metrics


def _fp32(values):
    return [float(torch.tensor(v, dtype=torch.float32)) for v in values]


def test_loss_is_recorded_as_given_and_lr_as_the_scheduler_sets_it():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=4)
    stream = GradStream(model)
    given = [torch.tensor(2.5), torch.tensor([1.25]), 0.75, None,
             torch.tensor([[0.5]], dtype=torch.bfloat16), torch.tensor(0.1, dtype=torch.float64)]
    lrs = []
    for loss in given:
        stream.write()
        lrs.append(opt.param_groups[0]["lr"])
        result = monitor.step(loss=loss)
        opt.step()
        sched.step()
    steps = monitor.steps()
    want = [math.nan if v is None else float(torch.as_tensor(v).float()) for v in given]
    assert steps["loss"].tolist() == pytest.approx(want, rel=0, nan_ok=True)
    assert steps["lr"].tolist() == _fp32(lrs)
    assert len(set(lrs)) == len(lrs)  # the scheduler changed it every step
    assert steps["loss"].dtype == steps["lr"].dtype == "float32"
    assert result._get("loss") == pytest.approx(0.1)


def test_without_an_optimizer_lr_is_nan():
    model = mlp()
    monitor = gradwatch.attach(model, run_dir=False)
    GradStream(model).write()
    monitor.step(loss=torch.tensor(1.0, requires_grad=True) * 3)
    steps = monitor.steps()
    assert steps["loss"].tolist() == [3.0]
    assert math.isnan(steps["lr"].iloc[0])


@pytest.mark.parametrize(("loss", "error", "match"), [
    (torch.ones(3), ValueError, r"got a tensor of shape \(3,\); pass the scalar loss"),
    ("0.5", TypeError, r"monitor.step\(loss=str\): expected the loss as a tensor or a number"),
    (True, TypeError, r"monitor.step\(loss=bool\)"),
])
def test_a_loss_that_is_not_one_number_is_refused(loss, error, match):
    model = mlp()
    monitor = gradwatch.attach(model, run_dir=False)
    GradStream(model).write()
    with pytest.raises(error, match=match):
        monitor.step(loss=loss)
    assert monitor.num_steps == 0  # nothing measured, nothing recorded


def test_row_metrics_carry_loss_and_lr_only_where_recorded():
    layout = RowLayout(1)
    row = torch.zeros(layout.width).numpy()
    row[layout.step["loss"]] = math.nan
    row[layout.step["lr"]] = 0.5
    metrics = row_metrics(layout, ["a"], row)
    assert "loss" not in metrics and metrics["lr"] == 0.5
    row[layout.step["loss"]] = 2.0
    assert row_metrics(layout, ["a"], row)["loss"] == 2.0


def _record(tmp_path, with_loss: bool):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / ("with" if with_loss else "without")
    monitor = gradwatch.attach(model, opt, run_dir=run_dir, log_every=5)
    stream = GradStream(model)
    for t in range(30):
        stream.write()
        monitor.step(loss=torch.tensor(2.0 * 0.9**t) if with_loss else None)
        opt.step()
    monitor.detach()
    return run_dir


def test_report_draws_the_loss_below_the_global_norm_when_one_was_recorded(tmp_path):
    html = export_report(_record(tmp_path, True), tmp_path / "a.html").read_text()
    assert 'id="loss"' in html
    assert re.search(r'id="global-norm".*<img [^>]*alt="global gradient norm over steps"'
                     r'.*id="loss".*<img [^>]*alt="training loss over steps".*id="heatmap"',
                     html, re.S)
    html = export_report(_record(tmp_path, False), tmp_path / "b.html").read_text()
    assert 'id="loss"' not in html and "training loss" not in html
