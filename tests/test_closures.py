"""Optimizers whose ``step(closure)`` moves the parameters and then evaluates the
closure again (LBFGS, SAM-style): refused where the monitor would gate them, with the
fix, and the fixes themselves keep a non-finite gradient out of the parameters without
skipping the next, healthy step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from helpers import mlp

import gradwatch
from gradwatch.monitor import GradMonitor

X, Y = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.randn(
    8, 4, generator=torch.Generator().manual_seed(2)
)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (Foret et al. 2021, after the reference
    implementation): the closure runs at w, the parameters climb to w + e along the
    normalised gradient, the closure runs again there, and the base optimizer steps
    from w with the gradient at w + e."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure):
        closure = torch.enable_grad()(closure)
        loss = closure()  # gradients at w
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(p.grad * (group["rho"] / (norm + 1e-12)))  # climb to w + e
        self.zero_grad()
        closure()  # gradients at w + e
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p]["old_p"])  # back to w
        self.base_optimizer.step()
        return loss


class Unmarked(SAM):
    """The same algorithm, without the marks attach recognises (no ``base_optimizer``
    attribute): only its first step can tell."""

    def __init__(self, params, base_optimizer, **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self._inner = self.__dict__.pop("base_optimizer")

    def step(self, closure):
        self.__dict__["base_optimizer"] = self._inner
        try:
            return super().step(closure)
        finally:
            del self.__dict__["base_optimizer"]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _closure(model, opt, monitor, bad_calls=(), calls=None, results=None):
    """A closure that runs backward, then the monitor's step (its results appended to
    ``results``); its evaluations listed in ``bad_calls`` (0-based, counted in
    ``calls``) produce NaN gradients."""
    calls = calls if calls is not None else [0]
    results = results if results is not None else []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        if calls[0] in bad_calls:
            loss = loss * float("nan")
        calls[0] += 1
        loss.backward()
        results.append(monitor.step())
        return loss

    return closure


# ---------------------------------------------------------------------- refused
def test_lbfgs_is_refused_at_attach_with_the_fix(tmp_path):
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters())
    run_dir = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"cannot gate LBFGS: it evaluates its closure many times in one step.*"
        r"gradwatch\.attach\(model, optimizer=None, \.\.\.\), and call monitor\.step\(\) "
        r"yourself inside the closure after backward",
    ):
        gradwatch.attach(model, opt, run_dir=run_dir)
    assert not run_dir.exists()  # refused before the run record was started
    assert "step" not in opt.__dict__  # and its step is not wrapped
    from gradwatch.run_record import RunRecorder

    direct = tmp_path / "direct"
    with pytest.raises(ValueError, match="cannot gate LBFGS"):  # built directly too
        GradMonitor(model, opt, config=gradwatch.MonitorConfig(nonfinite="zero"),
                    reporters=[RunRecorder(direct)])
    assert not direct.exists()  # before its reporters started


def test_sam_is_refused_at_attach_with_the_fix():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(
        ValueError,
        match=r"cannot gate SAM, a SAM-style optimizer: its step computes the gradients "
        r"it uses at perturbed parameters.*gradwatch\.attach\(model, "
        r"optimizer\.base_optimizer, \.\.\.\) and call monitor\.step\(\) yourself after "
        r"the backward at w \+ e",
    ):
        gradwatch.attach(model, opt, run_dir=False)
    assert "step" not in opt.__dict__


def test_unmarked_sam_is_refused_at_its_first_step():
    """A SAM-style optimizer attach cannot recognise: its first step stops with the fix
    instead of stepping on gradients computed at other parameters."""
    torch.manual_seed(0)
    model = mlp()
    opt = Unmarked(model.parameters(), torch.optim.SGD, lr=0.1)
    monitor = gradwatch.attach(model, opt, run_dir=False)
    with pytest.raises(
        RuntimeError,
        match=r"Unmarked\.step moved the parameters and then evaluated its closure again.*"
        r"Attach with optimizer=None and call monitor\.step\(\) yourself inside the "
        r"closure after backward",
    ):
        opt.step(_closure(model, opt, monitor))
    monitor.detach()


@pytest.mark.parametrize("fused", [False, True])
def test_an_optimizer_that_reevaluates_at_the_same_parameters_is_served(fused):
    """Evaluating the closure twice without moving the parameters is fine: both calls
    get the gate's evaluation, and a flagged step is still skipped."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    original = opt.step

    def step(closure):
        first = closure()
        assert closure() is first
        return original(closure)

    opt.step = step
    monitor = gradwatch.attach(model, opt, run_dir=False)
    opt.step(_closure(model, opt, monitor))
    before = _params(model)
    opt.step(_closure(model, opt, monitor, bad_calls=(0,)))
    assert _same(before, _params(model))
    opt.step(_closure(model, opt, monitor))
    assert not _same(before, _params(model))


# ---------------------------------------------------------------------- the fixes
@pytest.mark.parametrize("evaluation", [0, 1, 2], ids=["at_w", "at_w_plus_e", "both"])
def test_sam_gated_through_its_base_optimizer(evaluation):
    """The fix the refusal names: attach to the base optimizer. A NaN at w or w + e
    leaves the parameters and the base optimizer's state bit-identical, and the next
    step is taken."""
    torch.manual_seed(0)
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    monitor = gradwatch.attach(model, opt.base_optimizer, run_dir=False)
    calls = [0]
    for _ in range(3):
        opt.step(_closure(model, opt, monitor, calls=calls))
    before, state = _params(model), copy.deepcopy(opt.base_optimizer.state_dict())
    bad = {0: (calls[0],), 1: (calls[0] + 1,), 2: (calls[0], calls[0] + 1)}[evaluation]
    results = []
    opt.step(_closure(model, opt, monitor, bad_calls=bad, calls=calls, results=results))
    assert results[-1].action == "skip" and results[-1].nonfinite  # what was recorded
    assert _same(before, _params(model))
    after = opt.base_optimizer.state_dict()
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])
    results = []  # the healthy step after it is taken, and not skipped
    opt.step(_closure(model, opt, monitor, calls=calls, results=results))
    assert [r.action for r in results] == ["none", "none"]
    assert not _same(before, _params(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monitor.detach()


@pytest.mark.parametrize("evaluation", [0, 1, 2], ids=["first", "second", "third"])
def test_lbfgs_watched_inside_the_closure(evaluation):
    """The alternative the refusal names for LBFGS: attach without it and call
    monitor.step() inside the closure. Every evaluation is a monitor step; without a
    line search and with nonfinite='zero', LBFGS stops at a NaN (zeroed) in any
    evaluation, so it never reaches the parameters, and the next step proceeds.
    (Not promised with line_search_fn='strong_wolfe': a zeroed gradient with a NaN
    loss breaks torch's line search, and a NaN at its first evaluation reaches the
    parameters when left as it is.)"""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    monitor = gradwatch.attach(model, None, nonfinite="zero", run_dir=False)
    calls = [0]
    for _ in range(3):
        opt.step(_closure(model, opt, monitor, calls=calls))
    assert monitor._step == calls[0]  # one monitor step per closure evaluation
    before = _params(model)
    start = calls[0]
    opt.step(_closure(model, opt, monitor, bad_calls=(start + evaluation,), calls=calls))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if evaluation == 0:  # a zero gradient at the first evaluation: LBFGS stops there
        assert _same(before, _params(model))
        assert calls[0] == start + 1
    moved = _params(model)
    opt.step(_closure(model, opt, monitor, calls=calls))
    assert not _same(moved, _params(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monitor.detach()
