"""monitor.step() called where it measures nothing new (twice per optimizer step, once
per micro-batch, before backward) warns once; the legitimate patterns never warn; and a
training thread still stepping at interpreter exit leaves a finished run record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import mlp

import gradwatch
from gradwatch.run_record import load_run

TESTS = os.path.dirname(os.path.abspath(__file__))
X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))


def _backward(model, scale=1.0):
    (model(X).square().mean() * scale).backward()


def _misuse_warnings(record):
    return [str(w.message) for w in record
            if issubclass(w.category, UserWarning) and "monitor.step()" in str(w.message)]


def _run(loop, steps=6, **options):
    """Run ``loop(model, opt, monitor)`` ``steps`` times; the step() warnings it raised."""
    torch.manual_seed(0)
    model = mlp()
    make_opt = options.pop("make_opt", lambda m: torch.optim.SGD(m.parameters(), lr=0.01))
    opt = make_opt(model) if make_opt is not None else None
    monitor = gradwatch.attach(model, opt, run_dir=False, **options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(steps):
            loop(model, opt, monitor)
    return _misuse_warnings(record), monitor


# ---------------------------------------------------------------------- misuse
@pytest.mark.parametrize("with_optimizer", [True, False])  # with and without the gate
def test_step_twice_per_optimizer_step_warns_once(with_optimizer):
    def loop(model, opt, monitor):
        model.zero_grad()
        _backward(model)
        monitor.step()
        monitor.step()
        if opt is not None:
            opt.step()

    make_opt = None if not with_optimizer else (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01))
    caught, monitor = _run(loop, make_opt=make_opt)
    assert len(caught) == 1
    assert "ran twice on the same gradients (no backward() ran since" in caught[0]
    assert "Call monitor.step() once per optimizer step" in caught[0]
    assert monitor.num_steps == 12  # a warning, not a refusal


def test_step_per_micro_batch_warns_once():
    # Gradient accumulation with monitor.step() after every micro-batch: new gradients
    # each time (accumulated in place), but no optimizer.step() in between.
    def loop(model, opt, monitor):
        opt.zero_grad()
        for _ in range(4):
            _backward(model, 0.25)
            monitor.step()
        opt.step()

    caught, _ = _run(loop)
    assert len(caught) == 1
    assert "twice without optimizer.step() in between, on gradients accumulated" in caught[0]


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_step_before_backward_warns_once(with_optimizer):
    def loop(model, opt, monitor):
        model.zero_grad(set_to_none=True)
        monitor.step()  # too early: no gradient yet
        _backward(model)
        if opt is not None:
            opt.step()

    make_opt = None if not with_optimizer else (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01))
    caught, _ = _run(loop, make_opt=make_opt)
    assert len(caught) == 1
    assert "found no gradients (every p.grad is None): it ran before loss.backward()" \
        in caught[0]


# ---------------------------------------------------------------------- legitimate
def _plain(model, opt, monitor):
    opt.zero_grad()
    _backward(model)
    monitor.step()
    opt.step()


def _zero_in_place(model, opt, monitor):
    # The same gradient tensors every step, zeroed and written into in place.
    opt.zero_grad(set_to_none=False)
    _backward(model)
    monitor.step()
    opt.step()


def _accumulate(model, opt, monitor):
    opt.zero_grad()
    for _ in range(4):
        _backward(model, 0.25)
    monitor.step()
    opt.step()


def _accumulate_in_place(model, opt, monitor):
    opt.zero_grad(set_to_none=False)
    for _ in range(4):
        _backward(model, 0.25)
    monitor.step()
    opt.step()


def _skipped_nan_steps(model, opt, monitor):
    # The monitor skips optimizer.step() for NaN gradients: the gate consumed its flag.
    opt.zero_grad(set_to_none=False)
    _backward(model)
    model[0].weight.grad[0, 0] = float("nan")
    monitor.step()
    opt.step()


def _own_skip_then_new_gradients(model, opt, monitor):
    # The loop leaves out optimizer.step() itself now and then; zero_grad() and a new
    # backward come before the next monitor step.
    opt.zero_grad()
    _backward(model)
    monitor.step()
    if monitor.num_steps % 2:
        opt.step()


def _no_optimizer(model, opt, monitor):
    model.zero_grad(set_to_none=False)
    _backward(model)
    monitor.step()


def _closure(model, opt, monitor):
    # How Lightning steps: optimizer.step(closure), the closure runs backward and the
    # monitor.
    def closure():
        opt.zero_grad()
        loss = model(X).square().mean()
        loss.backward()
        monitor.step()
        return loss

    opt.step(closure)


def _lbfgs(model, opt, monitor):
    # LBFGS evaluates the closure (and the monitor in it, attached without the
    # optimizer, as gradwatch asks) several times per step.
    opt = monitor.lbfgs = getattr(monitor, "lbfgs", None) or torch.optim.LBFGS(
        model.parameters(), max_iter=3)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = model(X).square().mean()
        loss.backward()
        monitor.step()
        return loss

    opt.step(closure)


def _scaler(model, opt, monitor):
    scaler = monitor.scaler
    opt.zero_grad(set_to_none=False)
    scaler.scale(model(X).square().mean()).backward()
    scaler.unscale_(opt)
    monitor.step()
    scaler.step(opt)
    scaler.update()


def _fused(m):
    return torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)


LEGITIMATE = {
    "plain": (_plain, {}),
    "zero_grad(set_to_none=False)": (_zero_in_place, {}),
    "accumulation": (_accumulate, {}),
    "accumulation, zeroed in place": (_accumulate_in_place, {}),
    "skipped NaN steps": (_skipped_nan_steps, {}),
    "optimizer.step() left out by the loop": (_own_skip_then_new_gradients, {}),
    "no optimizer": (_no_optimizer, {"make_opt": None}),
    "closure (Lightning)": (_closure, {}),
    "fused, clipping by norm": (_zero_in_place, {"make_opt": _fused, "clip": "norm",
                                                 "max_norm": 1e-3}),
    "clipping by value": (_zero_in_place, {"clip": "value", "clip_value": 1e-4}),
    "skip_threshold": (_zero_in_place, {"skip_threshold": 8.0}),
    "LBFGS, attached without it": (_lbfgs, {"make_opt": None}),
}


@pytest.mark.parametrize("name", list(LEGITIMATE))
def test_legitimate_patterns_do_not_warn(name):
    loop, options = LEGITIMATE[name]
    caught, monitor = _run(loop, steps=8, **dict(options))
    assert caught == []
    assert monitor.num_steps >= 8


def test_grad_scaler_skipping_a_step_does_not_warn():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # overflows: steps skipped
    monitor = gradwatch.attach(model, opt, scaler=scaler, run_dir=False, skip_threshold=8.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(6):
            _scaler(model, opt, monitor)
    assert _misuse_warnings(record) == []


# ---------------------------------------------------------------------- exit
DAEMON_RUN = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, {tests!r})
    import torch
    from helpers import mlp
    import gradwatch

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # A record written at every step: the exit hook meets a step writing most times.
    monitor = gradwatch.attach(model, opt, run_dir={run!r}, log_every=1, flush_every=1)
    x = torch.randn(8, 16)

    def train():
        while True:
            opt.zero_grad()
            model(x).square().mean().backward()
            monitor.step()
            opt.step()

    threading.Thread(target=train, daemon=True).start()
    while monitor.num_steps < 3:  # past the first writes (and their imports)
        time.sleep(0.01)
    time.sleep({pause})
    """
)


@pytest.mark.slow
def test_daemon_training_thread_at_exit_leaves_a_finished_record(tmp_path):
    # The exit hook waits for the step in flight, then closes; a step arriving after it
    # records nothing and ends its thread. Before, about a third of such runs left
    # meta.json reading "running" (and a detached-monitor traceback from the thread).
    runs = [tmp_path / f"run{i}" for i in range(10)]
    procs = [
        subprocess.Popen([sys.executable, "-c", DAEMON_RUN.format(
            tests=TESTS, run=str(run), pause=0.01 * i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, run in enumerate(runs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        # A daemon thread still inside torch's C++ code when the interpreter finalises
        # is ended by an abort (torch and CPython, with or without gradwatch): after
        # the exit hooks, so the record is complete either way.
        aborted = proc.returncode == -signal.SIGABRT and "terminate called" in err
        assert proc.returncode == 0 or aborted, err
        assert "Traceback" not in err and "did not finish" not in err, err
    for run in runs:
        data = load_run(run)
        assert data.meta["status"] == "finished", (run, data.meta)
        steps = list(data.steps.step)
        assert steps == list(range(len(steps))) and steps  # every step, once, in order
        assert data.meta["last_step"] == steps[-1]
        assert sorted(set(data.layers.step)) == steps
