"""The update-to-weight ratio ||w_new - w|| / ||w|| of the optimizer step after the
first monitor step of every logging interval: measured around optimizer.step() on
the device, recorded in that step's row of history(), the run record and the
trackers, drawn in the report, and read by the advice."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import GradStream, mlp
from torch import nn

import gradwatch
from gradwatch.advice import update_ratios
from gradwatch.report import export_report, load_run
from gradwatch.rows import RowLayout, row_metrics


def _train(model, opt, monitor, steps, *, write=None):
    """Synthetic gradients; returns, per step, each layer's true ratio (computed on the
    host from copies) of the optimizer step after monitor.step()."""
    stream = GradStream(model)
    layers = monitor.layers
    truth = []
    for _ in range(steps):
        (write or stream.write)()
        monitor.step()
        before = [p.detach().clone() for p in layers.params]
        opt.step()
        moved = np.zeros(layers.num_layers)
        size = np.zeros(layers.num_layers)
        for p, b, j in zip(layers.params, before, layers.param_layer):
            moved[j] += float(((p.detach() - b) ** 2).sum())
            size[j] += float((b**2).sum())
        truth.append(np.sqrt(moved) / np.sqrt(size))
    return truth


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),  # the coefficient in grad_scale
], ids=["sgd", "adamw", "adamw-fused"])
def test_the_ratio_of_the_step_after_the_first_row_of_each_interval_is_recorded_there(
        make_opt):
    torch.manual_seed(0)
    model = mlp()
    opt = make_opt(model.parameters())
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=5)
    truth = _train(model, opt, monitor, 17)
    hist = monitor.history()
    measured = hist[hist.update_ratio.notna()]
    # One step in every log_every, the first of each interval: 0, 5, 10, 15.
    assert sorted(set(measured.step)) == [0, 5, 10, 15]
    for step in (0, 5, 10, 15):
        got = measured[measured.step == step].set_index("layer")["update_ratio"]
        want = pd.Series(truth[step], index=list(monitor.layers.names))
        assert got.to_numpy() == pytest.approx(want[got.index].to_numpy(), rel=1e-4)
    assert (measured.update_ratio > 0).all()


def test_not_measured_when_switched_off_without_an_optimizer_or_every_step_flushed():
    for kwargs in ({"update_ratio": False}, {"log_every": 1}):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = gradwatch.attach(model, opt, run_dir=False, **{"log_every": 4, **kwargs})
        _train(model, opt, monitor, 9)
        assert monitor.history().update_ratio.isna().all(), kwargs
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, run_dir=False, log_every=4)  # no optimizer given
    _train(model, opt, monitor, 9)
    assert monitor.history().update_ratio.isna().all()


def test_a_step_the_monitor_skips_has_no_ratio_and_a_layer_without_gradient_none():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=4)
    stream = GradStream(model)
    first = model[0]

    def write():
        stream.write()
        if stream.step == 5:  # monitor step 4, the first of its interval: NaN gradient
            first.weight.grad[0, 0] = math.nan
        if stream.step == 9:  # monitor step 8: the last layer has no gradient
            model[-1].weight.grad = None
            model[-1].bias.grad = None

    _train(model, opt, monitor, 12, write=write)
    hist = monitor.history()
    assert monitor.steps().set_index("step").loc[4, "action"] == "skip"
    assert hist[hist.step == 4].update_ratio.isna().all()  # no optimizer step: nothing moved
    at_8 = hist[hist.step == 8].set_index("layer")
    assert "4" not in at_8.index  # no gradient: no row, so no ratio
    assert at_8.update_ratio.notna().all() and (at_8.update_ratio > 0).all()


def test_recorded_on_disk_sent_to_trackers_and_drawn_in_the_report(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=5)
    _train(model, opt, monitor, 30)
    in_memory = monitor.history()
    monitor.detach()
    run = load_run(tmp_path / "run")
    on_disk = run.layers.set_index(["step", "layer"]).update_ratio
    mem = in_memory.set_index(["step", "layer"]).update_ratio
    assert on_disk.notna().sum() == mem.notna().sum() == 6 * 3  # 6 intervals, 3 layers
    assert on_disk.dropna().to_numpy() == pytest.approx(mem.dropna().to_numpy())
    html = export_report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert 'id="update-ratio"' in html

    layout = RowLayout(2)
    row = np.zeros(layout.width, dtype=np.float32)
    row[layout.layer["update_ratio"]] = [2e-3, math.nan]
    metrics = row_metrics(layout, ["a", "b"], row)
    assert metrics["update_ratio/a"] == pytest.approx(2e-3)
    assert "update_ratio/b" not in metrics  # not measured there: not sent


def test_a_record_written_before_the_ratio_existed_still_loads(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=5)
    _train(model, opt, monitor, 10)
    monitor.detach()
    parts = list((tmp_path / "run" / "layers").glob("*.parquet"))
    assert parts
    for part in parts:
        pd.read_parquet(part).drop(columns="update_ratio").to_parquet(part)
    run = load_run(tmp_path / "run")
    assert len(run.layers) == 30 and run.layers.update_ratio.isna().all()
    export_report(tmp_path / "run", tmp_path / "r.html")  # no ratio panel, no error


def test_advice_names_a_learning_rate_too_high_for_a_layer_and_a_layer_that_does_not_learn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    # The first layer at a learning rate 300 times the others'; the last not stepped.
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 3.0},
                           {"params": model[2].parameters(), "lr": 0.01}])
    with pytest.warns(UserWarning, match="not in the optimizer"):
        monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    for t in range(200):
        idx = torch.randint(0, 256, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        monitor.step(loss=loss.detach())
        opt.step()
    found = {a.rule: a for a in update_ratios(monitor.history())}
    assert set(found) == {"update_ratio_high", "update_ratio_dead"}
    high, dead = found["update_ratio_high"], found["update_ratio_dead"]
    assert list(high.evidence["median_update_ratio"]) == ["0"]
    assert "learning rate is likely too high" in high.title and "'0'" in high.title
    assert list(dead.evidence["median_update_ratio"]) == ["4"]
    assert dead.evidence["median_update_ratio"]["4"] == 0.0
    assert "'4'" in dead.title and "in the optimizer" in dead.detail


def test_no_advice_on_a_healthy_run_or_without_enough_measurements():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    for _ in range(200):
        idx = torch.randint(0, 256, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
    hist = monitor.history()
    assert update_ratios(hist) == []
    high = hist.assign(update_ratio=hist.update_ratio * 1e3)
    assert [a.rule for a in update_ratios(high)] == ["update_ratio_high"]
    few = high[high.step < 30]  # two measurements after the opening 20 %: too few
    assert update_ratios(few) == []


def test_update_ratio_must_be_a_bool():
    with pytest.raises(ValueError, match=r"update_ratio='yes' must be True or False"):
        gradwatch.MonitorConfig(update_ratio="yes")
