"""Full training steps with each gradient tool, interleaved on the same machine.

Every variant trains its own copy of the model (same initial weights, same fixed
batch, AdamW) so that hooks and state do not interfere. Rounds run the variants in
turn (A B C ... A B C ...), a few steps each, so drifts of the machine (frequency,
other load) hit all of them alike. Per variant: the median step time over all rounds,
and the median, min and max over rounds of its ratio to the bare step (and to
``clip_grad_norm_``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import models

VARIANTS = [
    "bare", "clip_grad_norm_", "clip_grad_value_", "zclip", "autoclip", "item_loop",
    "wandb.watch(1)", "wandb.watch(100)", "gradwatch none", "gradwatch norm",
    "gradwatch auto", "gradwatch auto + W&B",
]


@dataclass
class Runner:
    name: str
    step: Callable[[], None]
    close: Callable[[], None] = lambda: None


def _wandb_run():
    import wandb

    if wandb.run is None:
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb.init(mode="offline", project="gradwatch-bench", dir=os.environ.get(
            "GRADWATCH_BENCH_DIR", "."))
    return wandb


def make_runner(variant: str, model_name: str, device: torch.device) -> Runner:
    import gradwatch

    model, (x, y), loss_fn = models.make(model_name, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    clip: Callable[[], Any] = lambda: None  # noqa: E731
    close: Callable[[], None] = lambda: None  # noqa: E731
    hooks_model = model

    if variant == "clip_grad_norm_":
        clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)  # noqa: E731
    elif variant == "clip_grad_value_":
        clip = lambda: torch.nn.utils.clip_grad_value_(params, 0.01)  # noqa: E731
    elif variant == "zclip":
        from zclip import ZClip

        zc = ZClip()
        clip = lambda: zc.step(model)  # noqa: E731
    elif variant == "autoclip":
        from autoclip.torch import QuantileClip

        qc = QuantileClip(model.parameters(), quantile=0.9, history_length=1000)
        clip = qc.step
    elif variant == "item_loop":
        # What hand-written monitors (and Lightning's grad_norm utility) do: one
        # norm and one host read per parameter.
        norms: dict[str, float] = {}
        named = list(model.named_parameters())

        def clip() -> None:
            for n, p in named:
                if p.grad is not None:
                    norms[n] = p.grad.norm().item()
    elif variant.startswith("wandb.watch"):
        wandb = _wandb_run()
        freq = int(variant[len("wandb.watch("):-1])
        wandb.watch(hooks_model, log="gradients", log_freq=freq)
        close = lambda: wandb.unwatch(hooks_model)  # noqa: E731
    elif variant.startswith("gradwatch"):
        mode = variant.split()[1]
        kwargs: dict[str, Any] = {"clip": mode, "run_dir": False}
        if mode == "norm":
            kwargs["max_norm"] = 1.0
        if variant.endswith("W&B"):
            _wandb_run()
            kwargs["wandb"] = True
        monitor = gradwatch.attach(model, optimizer, **kwargs)
        clip = monitor.step
        close = monitor.detach

    def step() -> None:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip()
        optimizer.step()

    return Runner(variant, step, close)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, variants: list[str], device: torch.device, *, rounds: int,
          steps: int, warmup: int) -> dict[str, dict[str, float]]:
    runners = []
    for v in variants:
        try:
            runners.append(make_runner(v, model_name, device))
        except ImportError as err:  # an optional peer not installed
            print(f"  skipping {v}: {err}")
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    per_round: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:  # warm-up (statistics, allocator, wandb.watch's first log)
        for _ in range(warmup):
            r.step()
    _sync(device)
    for _ in range(rounds):
        for r in runners:
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                r.step()
                _sync(device)
                ts.append(time.perf_counter() - t0)
            times[r.name] += ts
            per_round[r.name].append(statistics.median(ts))
    for r in runners:
        r.close()
    out = {}
    refs = {"bare": per_round.get("bare"), "clip": per_round.get("clip_grad_norm_"),
            "zclip": per_round.get("zclip")}
    for name, ts in times.items():
        row = {"median_ms": 1e3 * statistics.median(ts)}
        for key, denom in refs.items():
            if denom:
                ratios = [a / b for a, b in zip(per_round[name], denom)]
                row[f"vs_{key}"] = statistics.median(ratios)
                row[f"vs_{key}_min"] = min(ratios)
                row[f"vs_{key}_max"] = max(ratios)
        out[name] = row
    return out
