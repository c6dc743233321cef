"""state_dict -> save -> new monitor -> load_state_dict continues exactly."""

from __future__ import annotations

import io

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
