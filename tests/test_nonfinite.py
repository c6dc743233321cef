"""NaN/Inf gradients: detected on the device, kept out of the statistics, and the
optimizer step skipped with parameters and optimizer state bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from helpers import GradStream, mlp

import gradwatch

OPTIMIZERS = {
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_loop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()["state"]),
    )


def _assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        for name, v in state_a[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_b[k][name])), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_nonfinite_step_is_skipped_bit_identically(opt_name, bad):
    torch.manual_seed(0)
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    monitor = gradwatch.attach(model, opt)
    stream = GradStream(model)
    for t in range(40):
        stream.write()
        if t == 30:
            model[2].weight.grad[3, 4] = bad
            before = _snapshot(model, opt)
        result = monitor.step()
        opt.step()
        if t == 30:
            _assert_same(before, _snapshot(model, opt))
            assert result.nonfinite and result.action == "skip" and not result.explosion
        opt.zero_grad()
    events = monitor.events()
    assert list(events.kind) == ["nonfinite"]
    event = events.iloc[0]
    assert event.step == 30 and event.layer == "2" and event.action == "skip"
    assert "statistics not updated" in event.reason
    # Training went on: the step after the bad one moved the parameters again.
    stats = monitor.state_dict()["detector"]["stats"]
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert monitor.steps().threshold.iloc[31:].notna().all()


def test_fused_skip_also_works_without_a_prior_clean_step():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    monitor = gradwatch.attach(model, opt)
    GradStream(model).write()
    model[0].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    monitor.step()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not hasattr(opt, "found_inf")  # the attribute is only set inside step()


def test_zero_mode_zeroes_the_gradients_without_optimizer_help():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, nonfinite="zero")
    stream = GradStream(model)
    stream.write()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    result = monitor.step()
    assert result.action == "skip"
    assert all((p.grad == 0).all() for p in model.parameters())
    opt.step()  # plain SGD with zero gradients leaves the parameters as they were
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert "gradients zeroed" in monitor.events().iloc[0].reason
    stream.write()
    grads = [p.grad.clone() for p in model.parameters()]
    monitor.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_without_optimizer_nonfinite_is_recorded_and_warned():
    model = mlp()
    monitor = gradwatch.attach(model, log_every=1)
    GradStream(model).write()
    model[4].bias.grad[1] = float("inf")
    with pytest.warns(UserWarning, match=r"NaN/Inf gradients at step 0 were left as they are"):
        result = monitor.step()
    assert result.nonfinite and result.action == "none"
    assert "no optimizer was given" in monitor.events().iloc[0].reason
    assert torch.isinf(model[4].bias.grad[1])  # a monitor without optimizer changes nothing


def test_without_optimizer_zero_mode_zeroes():
    model = mlp()
    monitor = gradwatch.attach(model, nonfinite="zero")
    GradStream(model).write()
    model[4].bias.grad[1] = float("nan")
    assert monitor.step().action == "skip"
    assert all((p.grad == 0).all() for p in model.parameters())


def test_skip_threshold_needs_an_optimizer():
    with pytest.raises(ValueError, match=r"skip_threshold=20.0 needs the optimizer"):
        gradwatch.attach(mlp(), skip_threshold=20.0)


def test_grad_scaler_overflow_is_amp_overflow_not_explosion():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    monitor = gradwatch.attach(model, opt, scaler=scaler)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    for t in range(40):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if t == 35:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = [p.detach().clone() for p in model.parameters()]
        result = monitor.step()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if t == 35:
            assert result.nonfinite and result.action == "skip" and not result.explosion
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            assert scaler.get_scale() == scale / 2  # the scaler saw it and backed off
    events = monitor.events()
    assert list(events.kind) == ["amp_overflow"]
    assert events.iloc[0].step == 35 and "GradScaler" in events.iloc[0].reason


def test_grad_scaler_with_fused_optimizer_and_skip_threshold():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    monitor = gradwatch.attach(model, opt, scaler=scaler, skip_threshold=20.0)
    stream = GradStream(model, sigma=0.1)
    scaler.scale(torch.zeros(()))  # initialise the scale, as scaling a loss does
    for t in range(50):
        stream.write(diffuse={"2": 1e6} if t == 45 else None)
        # Mimic unscale_ so the scaler holds a clean found_inf for this optimizer.
        for p in model.parameters():
            p.grad.mul_(scaler.get_scale())
        scaler.unscale_(opt)
        before = [p.detach().clone() for p in model.parameters()]
        result = monitor.step()
        scaler.step(opt)
        scaler.update()
        if t == 45:
            assert result.action == "skip"
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        elif t > 1:
            assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_warns_when_called_before_unscale():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    monitor = gradwatch.attach(model, opt, scaler=scaler)
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    with pytest.warns(UserWarning, match=r"monitor.step\(\) ran before scaler.unscale_"):
        monitor.step()


def test_detach_restores_optimizer_step():
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    monitor = gradwatch.attach(model, opt)
    assert "step" in opt.__dict__
    monitor.detach()
    assert "step" not in opt.__dict__
    with pytest.raises(RuntimeError, match="detached"):
        monitor.step()


@pytest.mark.parametrize("fused", [False, True])
def test_skip_works_when_the_optimizer_runs_a_closure(fused):
    """Lightning calls optimizer.step(closure) and the closure runs backward and the
    monitor: the skip flag only exists once the closure has run."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    monitor = gradwatch.attach(model, opt, run_dir=False)
    x, y = torch.randn(8, 16), torch.randn(8, 4)

    def make_closure(bad: bool):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss * (float("nan") if bad else 1.0)).backward()
            monitor.step()
            return loss

        return closure

    for _ in range(3):
        opt.step(make_closure(False))
    before = _snapshot(model, opt)
    loss = opt.step(make_closure(True))
    _assert_same(before, _snapshot(model, opt))
    assert torch.isfinite(loss)  # the closure's loss is still returned
    opt.step(make_closure(False))
    assert not torch.equal(before[0][0], next(model.parameters()))


def test_fused_skip_after_add_param_group_leaves_the_new_parameters_untouched():
    # A fused optimizer creates state even on a skipped step (fused SGD's momentum from
    # uninitialised memory): parameters added later must get the host-checked skip
    # until they have state, like the first ones did.
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.Sequential(a, b)
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, fused=True)
    monitor = gradwatch.attach(model, opt, run_dir=False)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        monitor.step()
        opt.step()
    opt.add_param_group({"params": list(b.parameters())})
    before = [p.detach().clone() for p in b.parameters()]
    opt.zero_grad()
    model(x).square().mean().backward()
    b.weight.grad[0, 0] = float("nan")
    assert monitor.step().action == "skip"
    opt.step()
    for p, q in zip(b.parameters(), before):
        torch.testing.assert_close(p, q)
    assert all(p not in opt.state for p in b.parameters())
