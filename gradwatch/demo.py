"""``gradwatch demo``: a short run of the injected-faults experiment, end to end.

An MLP learns scikit-learn's bundled handwritten digits (no download) with SGD and
momentum. At known steps the batch is corrupted: a loss scaled by 1e3, one input
component set to 1e3, a batch of random labels, a NaN input, and finally a learning
rate that grows 10 % a step. The same batches train the model twice: plainly, and
with ``gradwatch.attach`` in its default ``auto`` mode, recorded to a run directory
and logged to an offline W&B run. The demo then prints which faults the monitor
caught, when and what it did, what it flagged on clean steps, the two outcomes, and
writes the diagnostic report.

Needs scikit-learn (``pip install 'gradwatch[examples]'``); W&B and the report are
used when installed (``gradwatch[wandb,report]``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Fault:
    step: int
    kind: str
    what: str
    length: int = 1  # steps the fault lasts

    def window(self, slack: int) -> range:
        """Steps at which a flag counts as catching this fault."""
        return range(self.step, self.step + self.length + slack)


def schedule(steps: int) -> list[Fault]:
    """The faults of a ``steps``-step demo, from 35 % of the way in, leaving a third of
    the run to recover after the blow-up."""
    if steps < 200:
        raise ValueError(
            f"steps={steps} is too short: the demo needs at least 200 steps (warm-up, "
            "then five faults some way apart)"
        )
    at = [int(steps * f) for f in (0.35, 0.43, 0.51, 0.59, 0.67)]
    return [
        Fault(at[0], "loss_spike", "the batch loss multiplied by 1e3"),
        Fault(at[1], "outlier", "one input component of one sample set to 1e3"),
        Fault(at[2], "bad_labels", "a batch of random labels"),
        Fault(at[3], "nan", "one input value NaN"),
        Fault(at[4], "lr_blowup", "the learning rate growing 10 % a step", length=40),
    ]


BLOWUP_GROWTH = 1.1
SLACK = 3  # a flag within this many steps after a fault still catches it


def load_digits(normalise: bool = True) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled digits as (x_train, y_train, x_test, y_test), split 1400
    / 397 the same way every time; ``normalise``: per-pixel standardisation."""
    try:
        from sklearn.datasets import load_digits as load
    except ImportError as err:
        raise RuntimeError(
            "the demo trains on scikit-learn's bundled digits: install it with "
            "pip install 'gradwatch[examples]'"
        ) from err
    d = load()
    x = torch.tensor(d.data, dtype=torch.float32)
    if normalise:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def inject(kind: str, xb: torch.Tensor, yb: torch.Tensor, noise: torch.Tensor,
           magnitude: float = 1e3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Corrupt one batch in place: returns (inputs, labels, loss scale). ``loss_spike``
    scales the loss by ``magnitude``, ``outlier`` sets one input component of one
    sample to it, ``bad_labels`` uses ``noise`` as labels, ``nan`` puts a NaN in."""
    scale = 1.0
    if kind == "loss_spike":
        scale = magnitude
    elif kind == "outlier":
        xb[0, 20] = magnitude
    elif kind == "bad_labels":
        yb = noise
    elif kind == "nan":
        xb[0, 0] = math.nan
    return xb, yb, scale


def train(data, faults: list[Fault], *, seed: int, steps: int, lr: float,
          monitor_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """One run on the fault stream; ``monitor_kwargs`` None: no monitor."""
    import gradwatch

    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, 128), act1=nn.ReLU(), fc2=nn.Linear(128, 128), act2=nn.ReLU(),
        out=nn.Linear(128, 10),
    ))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gw = None if monitor_kwargs is None else gradwatch.attach(model, opt, **monitor_kwargs)
    g = torch.Generator().manual_seed(seed)
    by_step = {f.step: f for f in faults}
    blowup = next(f for f in faults if f.kind == "lr_blowup")
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (32,), generator=g)
        xb, yb = x_tr[idx].clone(), y_tr[idx].clone()
        noise = torch.randint(0, 10, yb.shape, generator=g)  # drawn every step alike
        scale = 1.0
        fault = by_step.get(step)
        if fault is not None:
            xb, yb, scale = inject(fault.kind, xb, yb, noise)
        grow = step - blowup.step + 1
        for group in opt.param_groups:
            group["lr"] = lr * BLOWUP_GROWTH ** grow if 0 < grow <= blowup.length else lr
        loss = nn.functional.cross_entropy(model(xb), yb) * scale
        opt.zero_grad()
        loss.backward()
        if gw is not None:
            gw.step(loss=loss)  # the loss rides along as a device tensor: no sync
        opt.step()
    if gw is not None:
        gw.detach()  # flush the record, finish the W&B run
    with torch.no_grad():
        logits = model(x_te)
        test_loss = nn.functional.cross_entropy(logits, y_te).item()
        accuracy = (logits.argmax(1) == y_te).float().mean().item()
    return {"test_loss": test_loss, "accuracy": accuracy, "monitor": gw,
            "diverged": not math.isfinite(test_loss) or accuracy < 0.2}


def caught(faults: list[Fault], events) -> tuple[list[dict[str, Any]], list[int]]:
    """Per fault: the first event in its window; and the flagged steps outside every
    window (false alarms)."""
    flagged = sorted(set(int(s) for s in events["step"]))
    rows, covered = [], set()
    for f in faults:
        window = f.window(SLACK)
        covered.update(window)
        hits = events[events["step"].isin(list(window))]
        first = hits.iloc[0] if len(hits) else None
        rows.append({"fault": f, "event": first,
                     "latency": None if first is None else int(first["step"]) - f.step})
    return rows, [s for s in flagged if s not in covered]


def run(out: Path, *, seed: int = 0, steps: int = 400, lr: float = 0.05,
        use_wandb: bool = True) -> int:
    os.environ.setdefault("WANDB_MODE", "offline")  # works with no account
    os.environ.setdefault("WANDB_SILENT", "true")
    faults = schedule(steps)
    data = load_digits()
    use_wandb = use_wandb and importlib.util.find_spec("wandb") is not None
    start = time.perf_counter()
    print(f"gradwatch demo: a digits MLP, SGD(lr={lr:g}, momentum=0.9), {steps} steps, "
          f"seed {seed}, with faults injected at known steps:")
    for f in faults:
        span = f" for {f.length} steps" if f.length > 1 else ""
        print(f"  step {f.step:4d}  {f.kind:10s}  {f.what}{span}")
    run_dir = out / "run"
    if (run_dir / "meta.json").is_file():
        # The demo's own record from an earlier demo: each demo records a new run.
        shutil.rmtree(run_dir)
        print(f"(replacing the record of the previous demo in {run_dir})")
    wandb: Any = False
    if use_wandb:
        wandb = {"init_kwargs": {"project": "gradwatch-demo", "name": f"demo-seed{seed}",
                                 "dir": str(out), "config": {"lr": lr, "seed": seed}}}
    plain = train(data, faults, seed=seed, steps=steps, lr=lr, monitor_kwargs=None)
    watched = train(data, faults, seed=seed, steps=steps, lr=lr,
                    monitor_kwargs={"run_dir": run_dir, "wandb": wandb})
    monitor = watched["monitor"]
    events = monitor.events()
    rows, false_alarms = caught(faults, events)
    n_caught = sum(r["event"] is not None for r in rows)

    print(f"\nWhat gradwatch caught ({n_caught} of {len(faults)} faults; a flag up to "
          f"{SLACK} steps after a fault counts):")
    for r in rows:
        f, ev = r["fault"], r["event"]
        if ev is None:
            print(f"  step {f.step:4d}  {f.kind:10s}  MISSED")
            continue
        layer = ev["layer"]
        where = f" in layer {layer}" if isinstance(layer, str) and layer else ""
        print(f"  step {f.step:4d}  {f.kind:10s}  caught at step {int(ev['step'])} "
              f"(+{r['latency']}): {ev['kind']}{where}, action {ev['action']}")
    steps_table = monitor.steps()
    first = faults[0].step
    before = steps_table[steps_table["step"] < first]
    print(f"Before the first fault ({first} steps of clean training): "
          f"{sum(s < first for s in false_alarms)} flagged, "
          f"{int((before['action'] != 'none').sum())} clipped (a norm more than "
          f"{monitor.config.max_ratio or 0:g}x its typical value is scaled back to it; while "
          "norms cross that line often, the threshold comes down towards the typical "
          "value).")
    later = [s for s in false_alarms if s >= first]
    if later:
        shown = ", ".join(map(str, later[:10])) + (", ..." if len(later) > 10 else "")
        print(f"Flagged between or after the faults' windows: {len(later)} (steps {shown}; "
              "the optimizer's momentum carries a fault for a while).")

    def outcome(r: dict[str, Any]) -> str:
        state = "DIVERGED" if r["diverged"] else "trained "
        return f"{state}  test loss {r['test_loss']:8.3g}  accuracy {r['accuracy']:6.1%}"

    print(f"\nno clipping     {outcome(plain)}")
    print(f"gradwatch auto  {outcome(watched)}")

    print(f"\nRun record: {run_dir}")
    if importlib.util.find_spec("matplotlib") and importlib.util.find_spec("scipy"):
        from .report import export_report

        print(f"Report:     {export_report(run_dir, out / 'report.html')}")
    else:
        print("Report:     skipped (pip install 'gradwatch[report]' for the HTML report)")
    if use_wandb:
        runs = sorted((out / "wandb").glob("offline-run-*"))
        where = runs[-1] if runs else out / "wandb"
        print(f"W&B:        {where} (offline; upload with: wandb sync {where})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
