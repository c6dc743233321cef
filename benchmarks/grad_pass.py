"""The isolated gradient pass: ``monitor.step()`` alone (no forward, backward or
optimizer), against ``clip_grad_norm_`` and against the physical floor.

The floor is the time to read every gradient byte once at the machine's measured
memory bandwidth (a large ``sum``, out of cache). The sweep grows the number of
tensors at a fixed size and the size at a fixed number of tensors, up to 2,000
tensors and 100M+ parameters, to show the cost per tensor staying flat.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import gradwatch


def bandwidth(device: torch.device, nbytes: int = 1 << 29) -> float:
    """Read bandwidth in bytes/s: a sum over a buffer far larger than any cache."""
    x = torch.ones(nbytes // 4, device=device)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum().item()
        ts.append(time.perf_counter() - t0)
    return nbytes / statistics.median(ts)


class Flat(nn.Module):
    """``n`` parameter tensors holding ``total`` elements together (square-ish)."""

    def __init__(self, n: int, total: int) -> None:
        super().__init__()
        each = max(1, total // n)
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(each)) for _ in range(n))


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call, over ``reps`` batches of 10 calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ts.append((time.perf_counter() - t0) / 10)
    return statistics.median(ts)


def sweep(configs: list[tuple[int, int]], device: torch.device, bw: float,
          reps: int = 15) -> list[dict[str, float]]:
    rows = []
    for n, total in configs:
        torch.manual_seed(0)
        model = Flat(n, total).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        params = list(model.parameters())
        numel = sum(p.numel() for p in params)
        row: dict[str, float] = {"tensors": n, "params": numel,
                                 "floor_ms": 1e3 * 4 * numel / bw}
        row["clip_grad_norm_ms"] = 1e3 * _time(
            lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), device, reps)
        for mode in ("none", "norm", "auto"):
            kwargs = {"max_norm": 1e9} if mode == "norm" else {}
            # Every tensor its own layer (the most statistics); the default log_every,
            # so the timing includes the flush every 50 steps, amortised.
            monitor = gradwatch.attach(model, None, clip=mode, run_dir=False,
                                       granularity="parameter", **kwargs)
            row[f"{mode}_ms"] = 1e3 * _time(monitor.step, device, reps)
            if mode == "auto":
                row["state_kib"] = monitor.memory_bytes / 1024
            monitor.detach()
        rows.append(row)
        del model, params
    return rows
