"""history(), steps() and events() tables, and the StepResult view of one step."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import GradStream, mlp

import gradwatch


@pytest.fixture
def watched():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, log_every=16)
    stream = GradStream(model, sigma=0.1)
    for t in range(50):
        stream.write(diffuse={"2": 100.0} if t == 40 else None)
        result = monitor.step()
        if t == 40:
            spike_result = result
    return monitor, spike_result


def test_history_is_long_format(watched):
    monitor, _ = watched
    hist = monitor.history()
    assert isinstance(hist, pd.DataFrame)
    for col in ("step", "layer", "grad_norm", "clipped_norm", "z", "typical_norm",
                "norm_threshold", "max_abs", "concentration", "concentration_z",
                "value_threshold", "flagged"):
        assert col in hist.columns, col
    assert len(hist) == 50 * 3
    assert list(hist.query("step == 40 and flagged").layer) == ["2"]
    # Concentration is max|g| over the RMS of g: at least 1, at most sqrt(numel).
    assert (hist.concentration >= 1 - 1e-6).all()


def test_steps_and_events(watched):
    monitor, result = watched
    steps = monitor.steps()
    assert list(steps.step) == list(range(50))
    assert steps.loc[40, "action"] == "clip_norm" and steps.loc[40, "explosion"]
    events = monitor.events()
    assert list(events.columns[:6]) == ["step", "kind", "layer", "layers", "action", "reason"]
    assert events.iloc[-1].step == 40 and events.iloc[-1].kind == "explosion"
    assert result.step == 40
    assert result.to_dict() == {
        "step": 40,
        "global_norm": pytest.approx(steps.loc[40, "global_norm"]),
        "clipped_norm": pytest.approx(steps.loc[40, "clipped_norm"]),
        "threshold": pytest.approx(steps.loc[40, "threshold"]),
        "action": "clip_norm",
        "explosion": True,
        "drift": False,
        "nonfinite": False,
        "flagged_layers": ["2"],
    }
    assert "on device" in repr(result)


def test_history_limit_drops_oldest_steps():
    model = mlp()
    monitor = gradwatch.attach(model, log_every=5, history_limit=12)
    stream = GradStream(model)
    for _ in range(40):
        stream.write()
        monitor.step()
    steps = monitor.steps()
    assert list(steps.step) == list(range(28, 40))
    assert len(monitor.history()) == 12 * 3


def test_history_limit_bounds_the_events_too_with_one_warning():
    model = mlp()
    monitor = gradwatch.attach(model, log_every=5, history_limit=12, warmup_steps=5)
    stream = GradStream(model)
    with pytest.warns(UserWarning, match=r"history_limit=12 also bounds the events") as rec:
        for t in range(200):
            # A spike every 25 steps: eight events, one of them in the steps kept.
            stream.write(diffuse={"2": 100.0} if t % 25 == 20 else None)
            monitor.step()
    assert sum("also bounds the events" in str(w.message) for w in rec) == 1
    assert set(monitor.events().step) == {195}  # only events of the 12 steps kept


def test_recent_quantiles():
    model = mlp()
    monitor = gradwatch.attach(model)
    stream = GradStream(model, sigma=0.0)
    for _ in range(10):
        stream.write()
        monitor.step()
    q = monitor.recent_quantiles(0.5)
    hist = monitor.history()
    assert set(q) == {"(model)", "0", "2", "4"}
    assert q["2"] == pytest.approx(hist.query("layer == '2'").grad_norm.median(), rel=1e-3)
    with pytest.raises(ValueError, match=r"q=2 must be in \[0, 1\]"):
        monitor.recent_quantiles(2)
