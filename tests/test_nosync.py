"""No host synchronisation on non-logging steps.

``step()`` runs under a TorchDispatchMode that counts the operators which force the
host to wait for the device: ``_local_scalar_dense`` (what ``.item()``, ``bool()``
and a Python ``if`` on a tensor dispatch to), data-dependent shapes (``nonzero``,
``masked_select``, ``unique``), ``equal``, and copies from an accelerator to the CPU.

The models here live on the CPU, where the monitor reads its decision flags to skip
passes that would change nothing (free without a device). The accelerator path, which
reads nothing, is what these tests check: they switch the CPU branches off
(``_host_branches = False``), and a last test shows that both paths compute the same.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import GradStream, SyncCounter, mlp

import gradwatch


def test_counter_sees_syncs():
    t = torch.ones(3)
    with SyncCounter() as c:
        t.sum().item()
        if t.max() > 0:
            pass
        t[t > 0]
    assert len(c.syncs) == 3


MODES = [
    {"clip": "auto"},
    {"clip": "auto", "max_norm": 0.5},
    {"clip": "none"},
    {"clip": "norm", "max_norm": 0.05},
    {"clip": "value", "clip_value": 0.01},
    {"clip": "agc"},
    {"clip": "zscore"},
    {"clip": "percentile"},
    {"clip": "auto", "nonfinite": "zero"},
    {"clip": "auto", "granularity": "parameter"},
]


@pytest.mark.filterwarnings("ignore:gradwatch. NaN/Inf gradients at step")
@pytest.mark.parametrize("optimizer", ["none", "fused"])
@pytest.mark.parametrize("options", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_step_has_no_host_sync_between_logging_steps(options, optimizer):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), fused=True) if optimizer == "fused" else None
    if opt is not None:
        options = {**options, "skip_threshold": 30.0}
    monitor = gradwatch.attach(model, opt, log_every=10, warmup_steps=5, **options)
    monitor._host_branches = False  # the accelerator path
    stream = GradStream(model)
    for t in range(40):
        # Spikes, concentrated outliers and a NaN exercise every decision branch.
        stream.write(
            diffuse={"2": 100.0} if t == 20 else None,
            spike={"4.weight": 10.0} if t == 25 else None,
        )
        if t == 30:
            model[0].weight.grad[0, 0] = float("nan")
        logging_step = (t + 1) % 10 == 0
        loss = torch.full((1,), 1.0 + t, requires_grad=True) * 2  # as a training step's
        with SyncCounter() as in_monitor:
            monitor.step(loss=loss)
        if not logging_step:
            assert in_monitor.syncs == [], f"step {t}: {in_monitor.syncs}"
        if opt is not None:
            with SyncCounter() as in_optimizer:
                opt.step()
            # A fused optimizer reads the skip flag on the device too, once it has
            # state for its parameters (its first step reads it on the host).
            if t > 0:
                assert in_optimizer.syncs == [], f"optimizer step {t}: {in_optimizer.syncs}"
        if opt is not None:
            opt.zero_grad()
    steps = monitor.steps()
    assert len(steps) == 40
    assert steps["loss"].tolist() == [2.0 * (1 + t) for t in range(40)]
    kinds = set(monitor.events().kind)
    assert "nonfinite" in kinds


@pytest.mark.parametrize("lr", ["float", "tensor"])
@pytest.mark.parametrize("loss", ["0-dim", "bf16", "number", "none"])
def test_loss_and_lr_are_recorded_without_a_host_sync(loss, lr):
    """The training context rides in the step's device row: neither a loss tensor (of
    any dtype) nor a learning rate held as a tensor is read on the host."""
    model = mlp()
    rate = torch.tensor(0.01) if lr == "tensor" else 0.01
    opt = torch.optim.Adam(model.parameters(), lr=rate, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    monitor = gradwatch.attach(model, opt, log_every=10, run_dir=False)
    monitor._host_branches = False  # the accelerator path
    stream = GradStream(model)
    given = []
    for t in range(5):
        stream.write()
        value = {"0-dim": torch.tensor(0.5 * t), "bf16": torch.tensor([[0.5 * t]]).bfloat16(),
                 "number": 0.5 * t, "none": None}[loss]
        given.append(float("nan") if value is None else 0.5 * t)
        with SyncCounter() as in_monitor:
            monitor.step(loss=value)
        assert in_monitor.syncs == [], f"step {t}: {in_monitor.syncs}"
        opt.step()
        sched.step()
    steps = monitor.steps()
    assert steps["loss"].tolist() == pytest.approx(given, nan_ok=True)
    assert steps["lr"].tolist() == pytest.approx([0.01 / (1 + t) for t in range(5)], rel=1e-6)


def test_nonfused_optimizer_pays_one_scalar_sync_in_its_step_only():
    torch.manual_seed(0)
    model, twin = mlp(), mlp()
    opt = torch.optim.Adam(model.parameters(), foreach=True)
    twin_opt = torch.optim.Adam(twin.parameters(), foreach=True)  # no monitor
    monitor = gradwatch.attach(model, opt, log_every=100)
    monitor._host_branches = False  # the accelerator path
    stream, twin_stream = GradStream(model), GradStream(twin)
    for _ in range(5):
        stream.write()
        twin_stream.write()
        with SyncCounter() as in_monitor:
            monitor.step()
        with SyncCounter() as in_optimizer:
            opt.step()
        with SyncCounter() as in_twin:
            twin_opt.step()  # Adam's own syncs on CPU (its step counter)
        assert in_monitor.syncs == []
        assert len(in_optimizer.syncs) == len(in_twin.syncs) + 1


def test_logging_step_transfers_once():
    model = mlp()
    monitor = gradwatch.attach(model, log_every=4)
    stream = GradStream(model)
    for _ in range(8):
        stream.write()
        monitor.step()
    # Nothing is left on the device once a logging step has run.
    assert monitor._transfer.pending == 0
    assert len(monitor.steps()) == 8


@pytest.mark.filterwarnings("ignore:gradwatch. NaN/Inf gradients at step")
@pytest.mark.parametrize("options", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_cpu_branches_compute_what_the_accelerator_path_computes(options):
    def run(host_branches):
        torch.manual_seed(0)
        model = mlp()
        monitor = gradwatch.attach(model, log_every=10, warmup_steps=5, run_dir=False,
                                   **options)
        monitor._host_branches = host_branches
        stream = GradStream(model)
        grads = []
        for t in range(40):
            stream.write(
                diffuse={"2": 100.0} if t == 20 else None,
                spike={"4.weight": 10.0} if t == 25 else None,
            )
            if t == 30:
                model[0].weight.grad[0, 0] = float("nan")
            monitor.step()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return monitor, grads

    fast, fast_grads = run(True)
    slow, slow_grads = run(False)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    pd.testing.assert_frame_equal(fast.steps(), slow.steps())
    pd.testing.assert_frame_equal(fast.history(), slow.history())
    if options.get("clip") in ("auto", "value", "norm"):  # the skipped passes mattered
        assert (fast.steps().action != "none").any()
