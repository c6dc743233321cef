"""On a GPU: the whole training step runs under torch.cuda.set_sync_debug_mode("error").

CPU-only machines skip this file; on CPU the dispatch-mode counter in test_nosync.py
is the guard (a device-to-host copy cannot happen there).
"""

from __future__ import annotations

import pytest
import torch
from helpers import mlp

import gradwatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("clip", ["auto", "norm", "value", "zscore", "percentile", "agc", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_never_syncs(clip, dtype):
    torch.manual_seed(0)
    model = mlp().cuda().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    options = {"max_norm": 1.0} if clip == "norm" else {"clip_value": 0.1} if clip == "value" else {}
    monitor = gradwatch.attach(model, opt, clip=clip, log_every=10, warmup_steps=5, **options)
    x = torch.randn(64, 16, device="cuda", dtype=dtype)
    y = torch.randn(64, 4, device="cuda", dtype=dtype)

    def train_step(t: int) -> None:
        loss = torch.nn.functional.mse_loss(model(x * (100.0 if t == 30 else 1.0)), y)
        loss.backward()
        if t == 35:
            # fill_ launches a kernel; `grad[0, 0] = nan` would copy a host scalar and sync.
            model[0].weight.grad[0, 0].fill_(float("nan"))
        monitor.step()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for t in range(3):  # optimizer state, caches and plans built outside the check
        train_step(t)
    torch.cuda.synchronize()
    for t in range(3, 50):
        if (t + 1) % 10 == 0:
            train_step(t)  # a logging step: its one transfer is allowed
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert "nonfinite" in set(monitor.events().kind)
