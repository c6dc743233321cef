"""state_dict -> save -> new monitor -> load_state_dict continues exactly."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from helpers import GradStream, TinyNet, mlp

import gradwatch
from gradwatch.monitor import STATE_VERSION

SPIKES = {40: {"diffuse": {"head": 50.0}}, 130: {"diffuse": {"embed": 30.0}},
          150: {"spike": {"blocks.1.mlp.weight": 5.0}}, 170: {"diffuse": {"blocks.0.attn": 80.0}}}


def _drive(monitor, stream, start, stop):
    for t in range(start, stop):
        stream.write(**SPIKES.get(t, {}))
        if t == 160:
            next(iter(monitor.model.parameters())).grad[0, 0] = float("nan")
        monitor.step()


def _resumed(monitor, model, step, sigma, **options):
    """A new monitor on ``model`` loaded from ``monitor``'s state through a file, and a
    gradient stream that goes on from ``step``."""
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    resumed = gradwatch.attach(model, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    stream = GradStream(model, sigma=sigma)
    stream.step = step
    return resumed, stream


@pytest.mark.parametrize("clip", ["auto", "percentile", "zscore"])
def test_resume_gives_identical_decisions(clip):
    options = dict(clip=clip, log_every=7, window=32, nonfinite="zero")
    torch.manual_seed(0)
    model = TinyNet()
    full = gradwatch.attach(model, **options)
    stream = GradStream(model, sigma=0.15)
    _drive(full, stream, 0, 200)

    torch.manual_seed(0)
    model_a = TinyNet()
    first = gradwatch.attach(model_a, **options)
    stream_a = GradStream(model_a, sigma=0.15)
    _drive(first, stream_a, 0, 100)
    torch.manual_seed(1)  # a fresh process: other weights do not matter to the monitor
    resumed, stream_b = _resumed(first, TinyNet(), 100, 0.15, **options)
    _drive(resumed, stream_b, 100, 200)

    a = full.steps().set_index("step").loc[100:]
    b = resumed.steps().set_index("step")
    assert list(b.index) == list(range(100, 200))  # the step count continues
    assert (a.action == b.action).all()
    for col in ("threshold", "global_norm", "clipped_norm", "z"):
        torch.testing.assert_close(torch.tensor(a[col].values), torch.tensor(b[col].values),
                                   equal_nan=True, rtol=0, atol=0)
    ev_full, ev_resumed = full.events(), resumed.events()
    assert list(ev_full.step) == list(ev_resumed.step)  # events before the save came along
    assert list(ev_full.action) == list(ev_resumed.action)
    assert {130, 150, 160, 170} <= set(ev_resumed.step)


def test_incompatible_model_is_refused():
    state = gradwatch.attach(mlp()).state_dict()
    with pytest.raises(ValueError, match=r"incompatible model: layers differ .*not in the state: \['6'\]"):
        gradwatch.attach(mlp((16, 32, 32, 32, 4))).load_state_dict(state)
    # Same layer names, other widths: the statistics would not fit.
    with pytest.raises(ValueError, match=r"incompatible model: layer '0' has 1088 parameters here but 544"):
        gradwatch.attach(mlp((16, 64, 32, 4))).load_state_dict(state)


def test_version_and_foreign_state_are_refused():
    monitor = gradwatch.attach(mlp())
    state = monitor.state_dict()
    assert state["version"] == STATE_VERSION
    with pytest.raises(ValueError, match=r"version 99 is not supported .* upgrade gradwatch"):
        monitor.load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match=r"not a gradwatch monitor state"):
        monitor.load_state_dict({"model": 1})


def test_resuming_with_other_config_warns():
    state = gradwatch.attach(mlp()).state_dict()
    with pytest.warns(UserWarning, match=r"different config \(z_threshold\)"):
        gradwatch.attach(mlp(), z_threshold=5.0).load_state_dict(state)


def test_resume_keeps_a_tightened_threshold():
    # Norms crossing their boundary on most steps have tightened the clipping threshold
    # at the save; the resumed monitor goes on from the same place.
    def drive(monitor, stream, start, stop):
        for t in range(start, stop):
            jump = 4.0 if t >= 40 and t % 2 else 1.0
            stream.write(diffuse={m: jump for m in ("0", "2", "4")})
            monitor.step()

    torch.manual_seed(0)
    model = mlp()
    full = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.01),
                            run_dir=False)
    drive(full, GradStream(model, sigma=0.1), 0, 120)

    torch.manual_seed(0)
    model_a = mlp()
    first = gradwatch.attach(model_a, torch.optim.SGD(model_a.parameters(), lr=0.01),
                             run_dir=False)
    drive(first, GradStream(model_a, sigma=0.1), 0, 80)
    model_b = mlp()
    resumed, stream_b = _resumed(first, model_b, 80, 0.1, run_dir=False,
                                 optimizer=torch.optim.SGD(model_b.parameters(), lr=0.01))
    drive(resumed, stream_b, 80, 120)

    a = full.steps().set_index("step").loc[80:]
    b = resumed.steps().set_index("step")
    assert (a.threshold < 1.9 * a.typical_norm).all()  # tightened when saved
    assert a.threshold.values.tolist() == b.threshold.values.tolist()


def _assert_same(a, b, where="state"):
    """Two states equal exactly (tensors bit for bit, NaN where NaN)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN floats in events


def _trained(steps, **options):
    torch.manual_seed(0)
    model = TinyNet()
    monitor = gradwatch.attach(model, log_every=5, nonfinite="zero", run_dir=False, **options)
    stream = GradStream(model, sigma=0.15)
    _drive(monitor, stream, 0, steps)
    return monitor, stream


def test_refused_state_leaves_the_monitor_as_it_was():
    # A state from a run with another window: refused before anything is assigned,
    # and without the "different config" warning (nothing was loaded).
    foreign, _ = _trained(60, window=16)
    monitor, stream = _trained(45, window=32)
    twin, twin_stream = _trained(45, window=32)  # never sees the foreign state
    before = monitor.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"the state's window holds 16 steps, this "
                                             r"monitor's 32 \(MonitorConfig.window\): load "
                                             r"it into a monitor made with window=16"):
            monitor.load_state_dict(foreign.state_dict())
    assert [str(w.message) for w in caught] == []
    _assert_same(before, monitor.state_dict())
    # Training goes on exactly as if the load had not been tried.
    _drive(monitor, stream, 45, 200)
    _drive(twin, twin_stream, 45, 200)
    a, b = monitor.steps(), twin.steps()
    assert a.equals(b)
    assert monitor.events().equals(twin.events())
    _assert_same(twin.state_dict(), monitor.state_dict())


def _drop(path):
    def edit(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        del state[last]
    return edit


def _put(path, value):
    def edit(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        state[last] = value
    return edit


MALFORMED = {
    "no step": (_drop(["step"]), r"monitor state \(version 2\) lacks 'step': it was not "
                                 r"written by GradMonitor.state_dict\(\), or was damaged"),
    "no detector": (_drop(["detector"]), r"lacks 'detector'"),
    "no tail": (_drop(["detector", "tail"]), r"detector state \(version 3\) lacks 'tail'"),
    "no peak": (_drop(["detector", "peak"]), r"detector state \(version 3\) lacks 'peak'"),
    "no variance": (_drop(["detector", "stats", "var"]), r"statistics state lacks 'var'"),
    "no window values": (_drop(["detector", "window", "values"]),
                         r"window state lacks 'values'"),
    "no drift sum": (_drop(["detector", "drift", "sum"]), r"drift test state lacks 'sum'"),
    "tail of another shape": (_put(["detector", "tail", "value"], torch.zeros(3, 4)),
                              r"running quantile 'value' has shape \(3, 4\), expected "
                              r"\(2, 9\): the state comes from a different model"),
    "count of another shape": (_put(["detector", "stats", "count"], torch.zeros(3)),
                               r"statistics 'count' has shape \(3,\), expected \(25,\)"),
    "alarm clock not a tensor": (_put(["detector", "since_alarm"], "soon"),
                                 r"detector 'since_alarm' is a str, not a tensor"),
    "tightness of another shape": (_put(["detector", "tightness"], torch.zeros(2)),
                                   r"detector 'tightness' has shape \(2,\), expected \(\)"),
    "detector not a dict": (_put(["detector"], [1, 2]),
                            r"detector state is a list, expected the dict"),
    "negative step": (_put(["step"], -3), r"monitor state 'step' is -3, expected an integer"),
    "events not a list": (_put(["events"], "none"), r"monitor state 'events' is a str"),
    "layer_numel cut short": (_put(["layer_numel"], [1, 2]),
                              r"'layer_numel' has 2 entries for 8 layers"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_state_is_refused_naming_what_is_wrong(name):
    edit, message = MALFORMED[name]
    donor, _ = _trained(40)
    state = copy.deepcopy(donor.state_dict())
    edit(state)
    monitor, _ = _trained(20)
    before = monitor.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=message):
            monitor.load_state_dict(state)
    assert [str(w.message) for w in caught] == []
    _assert_same(before, monitor.state_dict())


def test_version_1_state_still_loads():
    # Version 1 kept the statistics flat and had no tail, drift test or alarm clock.
    donor, _ = _trained(40)
    state = donor.state_dict()
    detector = state.pop("detector")
    state.update(version=1, stats=detector["stats"], window=detector["window"])
    monitor, _ = _trained(10)
    monitor.load_state_dict(state)
    _assert_same(detector["stats"], monitor.state_dict()["detector"]["stats"])
    assert monitor.num_steps == 40


def test_a_detector_state_without_the_peak_level_still_loads():
    # Version 2 (before the converging rule) had no peak: it is learnt again from there.
    donor, _ = _trained(40)
    state = donor.state_dict()
    assert state["detector"]["version"] == 3 and torch.isfinite(state["detector"]["peak"])
    del state["detector"]["peak"]
    state["detector"]["version"] = 2
    monitor, _ = _trained(10)
    monitor.load_state_dict(state)
    loaded = monitor.state_dict()["detector"]
    assert loaded["peak"].item() == float("-inf")
    _assert_same(state["detector"]["stats"], loaded["stats"])
