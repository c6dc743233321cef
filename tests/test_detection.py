"""Statistical detection on synthetic gradient streams with spikes at known steps,
and the auto policy's choice between value and norm clipping."""

from __future__ import annotations

import pytest
import torch
from helpers import GradStream, TinyNet, mlp

import gradwatch

WARMUP = 25


def _run(monitor, stream, steps, plan):
    """Run ``steps`` steps; ``plan`` maps step -> kwargs for GradStream.write."""
    for t in range(steps):
        stream.write(**plan.get(t, {}))
        monitor.step()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_and_false_positive_rate(seed, tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none", warmup_steps=WARMUP)
    stream = GradStream(tiny_net, seed=seed, sigma=0.15)
    layers = ["embed", "blocks.0.attn", "blocks.1.mlp", "head"]
    spikes = {
        t: {"diffuse": {layers[i % len(layers)]: 30.0}}
        for i, t in enumerate(range(60, 600, 45))
    }
    _run(monitor, stream, 600, spikes)
    events = monitor.events()
    explosions = events[events.kind == "explosion"]
    detected = set(explosions.step)
    recall = len(detected & set(spikes)) / len(spikes)
    clean_steps = 600 - WARMUP - len(spikes)
    false_positive_rate = len(detected - set(spikes)) / clean_steps
    assert recall == 1.0
    assert false_positive_rate <= 0.01
    # The event names the layer where the spike is.
    for t, spec in spikes.items():
        (layer,) = spec["diffuse"]
        assert explosions.set_index("step").loc[t, "layer"] == layer


def test_spike_does_not_drag_statistics_consecutive_spikes_caught(tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none")
    stream = GradStream(tiny_net, sigma=0.1)
    huge = {"diffuse": {"head": 1000.0}}
    moderate = {"diffuse": {"head": 5.0}}
    _run(monitor, stream, 200, {100: huge, 101: huge, 102: huge, 104: moderate, 110: huge})
    caught = set(monitor.events().query("kind == 'explosion'").step)
    # A 5x growth right after three 1000x spikes is still caught: the spikes entered
    # the statistics clipped, so neither the mean nor the deviation blew up.
    assert {100, 101, 102, 104, 110} <= caught
    hist = monitor.history().query("layer == 'head'").set_index("step")
    # Each spike moves the level by at most (1 - level_decay) of the boundary: four of
    # them, a few percent each, where fed raw they would have moved it 1000-fold.
    assert hist.loc[111, "typical_norm"] == pytest.approx(hist.loc[99, "typical_norm"], rel=0.2)
    assert hist.loc[111, "norm_threshold"] < 2 * hist.loc[99, "norm_threshold"]


def test_no_detection_during_warmup(tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none", warmup_steps=30)
    stream = GradStream(tiny_net)
    _run(monitor, stream, 40, {10: {"diffuse": {"head": 100.0}}})
    assert len(monitor.events()) == 0
    assert (monitor.steps().z.iloc[:30] == 0).all()


def test_single_nan_does_not_poison_statistics(tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none", nonfinite="zero")
    stream = GradStream(tiny_net)
    for t in range(120):
        stream.write()
        if t == 50:
            tiny_net.head.weight.grad[0, 0] = float("nan")
        monitor.step()
    stream.write(diffuse={"head": 50.0})
    result = monitor.step()
    assert result.explosion and result.flagged_layers[0] == "head"
    state = monitor.state_dict()["detector"]["stats"]
    assert torch.isfinite(state["mean"]).all() and torch.isfinite(state["var"]).all()
    steps = monitor.steps()
    assert steps.threshold.iloc[WARMUP:].notna().all()


def _warm(monitor, stream, steps=60):
    for _ in range(steps):
        stream.write()
        monitor.step()


def test_auto_value_clips_a_spike_in_one_component():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model)  # clip="auto"
    stream = GradStream(model)
    _warm(monitor, stream)
    stream.write(spike={"2.weight": 50.0})  # one component, ~5000x its neighbours
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    result = monitor.step()
    assert result.explosion and result.action == "clip_value"
    assert result.flagged_layers[0] == "2"
    event = monitor.events().iloc[-1]
    assert event.action == "clip_value" and event.layer == "2"
    assert "clipped by value" in event.reason and "concentration" in event.reason
    tau = monitor.history().query("step == 60 and layer == '2'").value_threshold.item()
    after = dict(model.named_parameters())
    # The outlier is clamped to the layer's value threshold, the rest is untouched.
    assert after["2.weight"].grad.view(-1)[0].item() == pytest.approx(tau, rel=1e-5)
    assert tau < 1.0
    assert torch.equal(after["2.weight"].grad.view(-1)[1:], before["2.weight"].view(-1)[1:])
    for name in ("0.weight", "0.bias", "4.weight", "2.bias"):
        assert torch.equal(after[name].grad, before[name]), name


def test_auto_norm_clips_diffuse_growth_preserving_direction():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model)
    stream = GradStream(model)
    _warm(monitor, stream)
    stream.write(diffuse={"2": 40.0})
    before = [p.grad.clone() for p in model.parameters()]
    result = monitor.step()
    assert result.explosion and result.action == "clip_norm"
    event = monitor.events().iloc[-1]
    assert event.layer == "2" and "diffuse growth" in event.reason
    coef = result.clipped_norm / result.global_norm
    assert coef < 0.2
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, b * coef, rtol=1e-4, atol=1e-10)
    # The spiked layer comes back to its own clipping boundary.
    row = monitor.history().query("step == 60 and layer == '2'").iloc[0]
    assert row.clipped_norm == pytest.approx(row.norm_threshold, rel=1e-3)


def test_auto_leaves_normal_steps_untouched():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model)
    stream = GradStream(model, sigma=0.05)
    for _ in range(100):
        stream.write()
        before = [p.grad.clone() for p in model.parameters()]
        result = monitor.step()
        if result.action == "none":
            assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
    assert (monitor.steps().action == "none").mean() > 0.95


def test_flagged_layers_ordered_by_z(tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none")
    stream = GradStream(tiny_net, sigma=0.1)
    _warm(monitor, stream)
    stream.write(diffuse={"head": 1000.0, "embed": 20.0})
    result = monitor.step()
    assert result.flagged_layers[:2] == ["head", "embed"]
    assert result.action == "none" and result.explosion


def test_skip_threshold_skips_catastrophic_spike():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, skip_threshold=20.0)
    stream = GradStream(model, sigma=0.1)
    for _ in range(60):
        stream.write()
        monitor.step()
        opt.step()
    stream.write(diffuse={"2": 1e6})
    params = [p.detach().clone() for p in model.parameters()]
    result = monitor.step()
    opt.step()
    assert result.action == "skip"
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    event = monitor.events().iloc[-1]
    assert event.action == "skip" and "skip_threshold=20" in event.reason
    # A moderate spike (z between z_threshold and skip_threshold) is clipped, not skipped.
    stream.write(diffuse={"2": 3.0})
    result = monitor.step()
    assert result.explosion and result.action == "clip_norm"


def _rising(max_ratio, *, warmup, sigma, steps, growth):
    """The steps table of an MLP trained with SGD whose gradients are multiplied by
    growth(t) at step t."""
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.01),
                               run_dir=False, max_ratio=max_ratio, warmup_steps=warmup)
    stream = GradStream(model, sigma=sigma)
    for t in range(steps):
        stream.write(diffuse={m: growth(t) for m in ("0", "2", "4")})
        monitor.step()
    return monitor.steps().set_index("step")


def test_a_steady_rise_cannot_drag_the_threshold_up_with_it():
    # A learning rate blowing up: every step's norm is 12% above the last, each step
    # only mildly anomalous (z about 2), so clip_z deviations alone would follow it up.
    # max_ratio anchors the threshold to the typical norm and the statistics with it;
    # None shows what happens without.
    def run(max_ratio):
        return _rising(max_ratio, warmup=20, sigma=0.3, steps=100,
                       growth=lambda t: 1.12 ** max(0, t - 60))

    anchored, free = run(2.0), run(None)
    rise = slice(80, 99)
    assert (anchored.loc[rise, "action"] == "clip_norm").all()
    assert (anchored.loc[rise, "clipped_norm"] <= 2.0 * anchored.loc[rise, "typical_norm"] * 1.0001).all()
    assert anchored.loc[99, "typical_norm"] < 2 * anchored.loc[60, "typical_norm"]
    # Without the anchor the threshold climbs with the norm, and most rising steps pass.
    assert free.loc[99, "threshold"] > 5 * free.loc[60, "threshold"]
    assert (free.loc[rise, "action"] == "none").sum() > 5


def test_a_blow_up_during_warm_up_is_held_to_the_first_steps_scale():
    # A learning rate far too high blows a run up within its first steps, before the
    # statistics have a deviation to score against. With max_ratio the model's norm is
    # clipped to max_ratio times its running typical value from the second step on, and
    # the statistics are fed the clipped value; without it warm-up is unprotected.
    def run(max_ratio):  # from step 5 on, 3x a step
        return _rising(max_ratio, warmup=25, sigma=0.1, steps=12,
                       growth=lambda t: 3.0 ** max(0, t - 4))

    held, free = run(2.0), run(None)
    assert (held.loc[:4, "action"] == "none").all()  # normal steps pass untouched
    assert (held.loc[5:, "action"] == "clip_norm").all()
    assert (held.loc[5:, "clipped_norm"] <= 2.0 * held.loc[5:, "typical_norm"] * 1.0001).all()
    # The typical norm creeps up (the clipped values are fed) instead of following 3^t.
    assert held.loc[11, "typical_norm"] < 4 * held.loc[4, "typical_norm"]
    assert held.loc[11, "global_norm"] > 500 * held.loc[4, "global_norm"]
    assert (free.loc[:, "action"] == "none").all()
    assert free.loc[11, "clipped_norm"] == pytest.approx(free.loc[11, "global_norm"])


def test_steps_beyond_the_boundary_do_not_walk_the_typical_norm_up():
    # SGD with a learning rate too high for the whole run: from step 40 on most steps' norms
    # are 2-8x the earlier level. Those steps are clipped, and they do not teach the
    # statistics a new typical level (only the steps within the boundary do), so the
    # boundary holds at the scale of the normal steps instead of following them up.
    gen = torch.Generator().manual_seed(0)
    jumps = torch.exp(torch.empty(200).uniform_(0.7, 2.1, generator=gen)).tolist()

    def growth(t):
        return 1.0 if t < 40 else jumps[t]

    held = _rising(2.0, warmup=25, sigma=0.1, steps=200, growth=growth)
    before = held.loc[39, "typical_norm"]
    assert held.loc[199, "typical_norm"] < 1.3 * before
    late = held.loc[100:]
    assert (late["action"] == "clip_norm").mean() > 0.7
    assert (late["clipped_norm"] <= 2.0 * late["typical_norm"] * 1.0001).all()
    # Without max_ratio the typical level follows the new norms.
    free = _rising(None, warmup=25, sigma=0.1, steps=200, growth=growth)
    assert free.loc[199, "typical_norm"] > 2 * before


def test_statistics_learn_the_level_and_the_spread_from_different_values():
    # What lets a clipped step widen the spread without moving the typical level.
    from gradwatch.stats import EmaStats

    stats = EmaStats(1, 0.5, torch.device("cpu"))
    on = torch.tensor([True])
    stats.update(torch.tensor([1.0]), on)
    stats.update(torch.tensor([1.0]), on, spread=torch.tensor([3.0]))
    mean, var = stats.moments()
    assert mean.item() == pytest.approx(1.0)
    assert var.item() > 1.0  # from the deviation of 2 the spread was given


def _jumping(crossing_rate, steps=700, optimizer=torch.optim.SGD):
    """An MLP's steps table: normal norms, then 2-8x jumps on most steps from 40 to 199
    (a learning rate too high for a while), then normal again. The optimizer is given
    (the kind matters, not its steps: the gradients are written, not learned)."""
    gen = torch.Generator().manual_seed(0)
    jumps = torch.exp(torch.empty(steps).uniform_(0.7, 2.1, generator=gen)).tolist()
    torch.manual_seed(0)
    model = mlp()
    opt = optimizer(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=False, crossing_rate=crossing_rate)
    stream = GradStream(model, sigma=0.1)
    for t in range(steps):
        stream.write(diffuse={m: jumps[t] if 40 <= t < 200 else 1.0 for m in ("0", "2", "4")})
        monitor.step()
    return monitor


def test_frequent_crossings_bring_the_threshold_down_to_the_typical_norm_and_back():
    # Most steps crossing the boundary: the threshold tightens from max_ratio times the
    # typical norm to the typical norm itself (never below), so each step is held at a
    # typical step's size; once crossings are rare again it relaxes back to the
    # boundary. crossing_rate=None keeps it at the boundary throughout.
    tight = _jumping(0.02)
    fixed = _jumping(None)
    t, f = tight.steps().set_index("step"), fixed.steps().set_index("step")
    jumping = slice(100, 199)
    assert t.loc[jumping, "threshold"].values == pytest.approx(
        t.loc[jumping, "typical_norm"].values, rel=0.01)  # a step within relaxes a little
    assert (t.loc[jumping, "clipped_norm"] <= t.loc[jumping, "typical_norm"] * 1.01).all()
    assert f.loc[jumping, "threshold"].values == pytest.approx(
        2.0 * f.loc[jumping, "typical_norm"].values, rel=1e-4)
    assert t.loc[jumping, "clipped_norm"].mean() < 0.6 * f.loc[jumping, "clipped_norm"].mean()
    armed = t.threshold.notna()
    assert (t.threshold[armed] >= t.typical_norm[armed] * 0.9999).all()
    # Relaxed: 500 normal steps later the threshold is back at the boundary, at the
    # same multiple of the typical norm as without tightening.
    assert (t.loc[699, "threshold"] / t.loc[699, "typical_norm"]) == pytest.approx(
        f.loc[699, "threshold"] / f.loc[699, "typical_norm"], rel=0.03)  # spreads differ
    assert t.loc[699, "threshold"] > 1.1 * t.loc[699, "typical_norm"]
    assert t.loc[600:, "action"].eq("none").all()


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW,
                                       torch.optim.RMSprop, None])
def test_the_threshold_never_tightens_without_an_sgd_type_optimizer(optimizer):
    # An adaptive optimizer's step barely depends on the gradient's scale: holding
    # many of its steps at the typical norm would only harm. Without the optimizer the
    # monitor cannot tell, and does no harm either.
    if optimizer is None:
        optimizer = lambda params, lr: None  # noqa: E731 - attached without one
    monitor = _jumping(0.02, steps=200, optimizer=optimizer)
    fixed = _jumping(None, steps=200, optimizer=optimizer)
    assert monitor.steps().threshold.equals(fixed.steps().threshold)
    assert monitor.steps().action.equals(fixed.steps().action)


def _risen_for_good(optimizer):
    """The steps table of a monitor whose model norm rises fourfold for good at step
    100 (as norms often do under Adam), with ``optimizer`` given."""
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, optimizer(model.parameters(), lr=0.01), run_dir=False)
    stream = GradStream(model, sigma=0.1)
    for t in range(400):
        stream.write(diffuse={m: 4.0 if t >= 100 else 1.0 for m in ("0", "2", "4")})
        monitor.step()
    return monitor.steps().set_index("step")


def test_with_an_adaptive_optimizer_the_level_follows_a_lasting_rise():
    # Holding the level bounds an SGD step; an Adam step it does not bound, and a held
    # level would go stale and clip every step after the rise.
    adam = _risen_for_good(torch.optim.Adam)
    late = adam.loc[300:]
    assert (late.typical_norm / late.global_norm).between(0.67, 1.5).all()
    assert (late.action != "none").mean() < 0.05
    sgd = _risen_for_good(torch.optim.SGD)  # the documented flip side: held, clipped
    assert (sgd.loc[300:].action == "clip_norm").mean() > 0.9


def test_a_rare_spike_leaves_the_threshold_near_the_boundary():
    # One crossing tightens the threshold by a step only, and it relaxes from there.
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.01),
                               run_dir=False)
    stream = GradStream(model, sigma=0.1)
    for t in range(200):
        stream.write(diffuse={"2": 30.0} if t == 100 else None)
        monitor.step()
    steps = monitor.steps().set_index("step")
    ratio = steps.threshold / steps.typical_norm
    assert steps.loc[100, "action"] == "clip_norm"
    assert ratio.loc[101] > 0.8 * ratio.loc[99]
    assert ratio.loc[199] > ratio.loc[101]
