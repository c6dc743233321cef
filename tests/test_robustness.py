"""Edge cases found in review: schedulers, several monitors, optimizer state on a
skipped first step, layers that come and go, deep models, dtypes and odd parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import GradStream, mlp
from torch import nn

import gradwatch


def _nan_step(model, monitor, opt):
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    monitor.step()
    opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_lr_scheduler_created_after_attach(fused):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    monitor = gradwatch.attach(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    stream = GradStream(model)
    for _ in range(3):
        stream.write()
        monitor.step()
        opt.step()
        sched.step()
    before = [p.detach().clone() for p in model.parameters()]
    _nan_step(model, monitor, opt)  # still skipped through the scheduler's wrapper
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_lr_scheduler_created_before_attach_sees_its_wrapper():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    monitor = gradwatch.attach(model, opt)
    GradStream(model).write()
    monitor.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "optimizer.step() has been overridden"
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    ],
    ids=["sgd_momentum_fused", "adam_fused"],
)
def test_skipped_first_step_leaves_no_optimizer_state(make):
    """Fused kernels create state on a skipped step (fused SGD with uninitialised
    momentum): the first steps are gated on the host instead."""

    def run(nan_first: bool):
        torch.manual_seed(0)
        model = nn.Linear(8, 8)
        opt = make(model.parameters())
        monitor = gradwatch.attach(model, opt)
        if nan_first:
            _nan_step(model, monitor, opt)
            assert opt.state_dict()["state"] == {}
        for seed in range(3):
            torch.manual_seed(seed + 1)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 0.01
            monitor.step()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_two_monitors_on_one_optimizer_detach_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gradwatch.attach(model[0], opt)
    second = gradwatch.attach(model[1], opt)
    first.detach()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    assert second.step().action == "skip"
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    second.detach()  # both gone: steps pass straight through again
    opt.step()
    assert not torch.equal(before[0], model[0].weight)


def test_parameters_outside_the_optimizer_are_reported():
    model = mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"4 trainable parameter\(s\) of the model are not in the optimizer"):
        gradwatch.attach(model, opt)


def test_layer_absent_for_a_while_keeps_clean_concentration_statistics():
    def run(frozen: bool) -> str:
        torch.manual_seed(0)
        model = mlp()
        monitor = gradwatch.attach(model)
        stream = GradStream(model)
        for _ in range(100):
            stream.write()
            if frozen:
                model[2].weight.grad = model[2].bias.grad = None
            monitor.step()
        for _ in range(26):
            stream.write()
            monitor.step()
        stream.write(diffuse={"2": 40.0})
        return monitor.step().action

    assert run(frozen=False) == run(frozen=True) == "clip_norm"


@pytest.mark.parametrize("depth", [3, 48])
def test_deep_model_normal_steps_are_rarely_touched(depth):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])
    monitor = gradwatch.attach(model)
    stream = GradStream(model, sigma=0.15)  # stationary: nothing anomalous at all
    for _ in range(400):
        stream.write()
        monitor.step()
    steps = monitor.steps().iloc[50:]
    assert (steps.action != "none").mean() <= 0.03
    assert steps.explosion.mean() <= 0.01
    assert monitor.layer_z_threshold > monitor.config.z_threshold if depth > 1 else True


def test_percentile_threshold_uses_raw_norms_even_when_noisy():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, clip="percentile", percentile=95.0, window=50)
    stream = GradStream(model, sigma=0.6)
    norms = []
    for _ in range(80):
        stream.write()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        result = monitor.step()
    expected = torch.tensor(norms[-51:-1]).log().quantile(0.95).exp().item()
    assert result.threshold == pytest.approx(expected, rel=1e-4)


def test_float64_model():
    torch.manual_seed(0)
    model = mlp().double()
    monitor = gradwatch.attach(model, clip="norm", max_norm=1e-3)
    GradStream(model).write()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    result = monitor.step()
    assert result.global_norm == pytest.approx(expected, rel=1e-6)
    assert result.clipped_norm == pytest.approx(1e-3, rel=1e-5)


def test_complex_parameters_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: complex modules are experimental
        model = nn.Linear(2, 2).to(torch.complex64)
    with pytest.raises(ValueError, match=r"model has complex parameters \(weight, bias\)"):
        gradwatch.attach(model)


def test_empty_parameter_and_no_gradients_at_all():
    model = mlp()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    monitor = gradwatch.attach(model)
    with pytest.warns(UserWarning, match=r"monitor.step\(\) found no gradients"):
        result = monitor.step()  # no gradient anywhere yet
    assert result.global_norm == 0.0 and result.action == "none" and not result.nonfinite
    GradStream(model).write()
    assert model.empty.grad.numel() == 0
    assert not monitor.step().nonfinite


def test_changing_gradient_sets_use_correct_norms_and_bounded_plans():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    monitor = gradwatch.attach(model, clip="none")
    stream = GradStream(model)
    gen = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(200):
        stream.write()
        for layer in model:
            if torch.rand((), generator=gen) < 0.5:  # routing: half the layers idle
                layer.weight.grad = layer.bias.grad = None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        totals.append(torch.nn.utils.get_total_norm(grads).item() if grads else 0.0)
        monitor.step()
    assert monitor.steps().global_norm.tolist() == pytest.approx(totals, rel=1e-5)
    assert monitor._reader.num_plans <= 64


def test_dtype_change_after_attach_is_followed():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, clip="norm", max_norm=1e-3)
    GradStream(model).write()
    monitor.step()
    model.half()
    GradStream(model).write(dtype=torch.float16)
    result = monitor.step()
    assert result.clipped_norm == pytest.approx(1e-3, rel=1e-2)
    assert all(p.grad.dtype == torch.float16 for p in model.parameters())


def test_fp16_tiny_clip_coefficient_does_not_underflow():
    model = nn.Linear(64, 64).half()
    monitor = gradwatch.attach(model, clip="norm", max_norm=1e-4)
    model.weight.grad = torch.full_like(model.weight, 60000.0)
    model.bias.grad = torch.zeros_like(model.bias)
    monitor.step()  # coefficient ~2.6e-11: below fp16's smallest subnormal
    measured = torch.linalg.vector_norm(model.weight.grad.float()).item()
    assert measured == pytest.approx(1e-4, rel=1e-2)
