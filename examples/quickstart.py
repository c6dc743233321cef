"""Quickstart: the classic gradient-clipping experiment, with and without gradwatch.

An MLP learns scikit-learn's bundled handwritten digits (no download) with SGD at a
learning rate that is too high for the raw 0-16 pixel inputs. Each seed is trained
twice on exactly the same batches: once plainly, once with ``gradwatch.attach`` in its
default ``auto`` mode. The script prints both outcomes and what the monitor caught.

Each monitored run is recorded to ``<out>/runs/seed<N>`` and logged to an offline W&B
run (``WANDB_MODE=offline`` unless you set it; ``--no-wandb`` to skip), and the
diagnostic report of the busiest run is written to ``<out>/report.html``.

Run:  python examples/quickstart.py            (about 30 s on 2 CPU cores)
      python examples/quickstart.py --seeds 1 --steps 300
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

import gradwatch

SPIKE_LOSS = 5.0  # a cross-entropy above this on 10 classes means training blew up


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)  # pixel values 0..16, not normalized
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def train(data, *, seed: int, steps: int, lr: float, monitor: bool,
          run_dir: Path | None = None, use_wandb: bool = False) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gw = None
    if monitor:
        wandb = {"init_kwargs": {"project": "gradwatch-quickstart", "name": f"seed{seed}",
                                 "config": {"lr": lr, "seed": seed}}} if use_wandb else False
        gw = gradwatch.attach(model, optimizer, run_dir=run_dir or False, wandb=wandb)
    batches = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (32,), generator=batches)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        if gw is not None:
            gw.step(loss=loss)  # measure, detect, clip in place: no host sync on this step
        optimizer.step()
        losses.append(loss.detach())
    losses_host = torch.stack(losses).tolist()  # one transfer, after training
    if gw is not None:
        gw.detach()  # flush the record to disk, finish the W&B run
    with torch.no_grad():
        logits = model(x_test)
        test_loss = nn.functional.cross_entropy(logits, y_test).item()
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
    spikes = [i for i, v in enumerate(losses_host) if not math.isfinite(v) or v > SPIKE_LOSS]
    return {
        "test_loss": test_loss,
        "accuracy": accuracy,
        "diverged": not math.isfinite(test_loss) or accuracy < 0.2,
        "spikes": spikes,
        "monitor": gw,
    }


def describe(run: dict) -> str:
    spikes = run["spikes"]
    blew = f"loss spiked above {SPIKE_LOSS:g} at {len(spikes)} steps (first {spikes[0]})" if spikes else "no loss spike"
    state = "DIVERGED" if run["diverged"] else "trained"
    return f"{state:8s} test loss {run['test_loss']:7.3f}  accuracy {run['accuracy']:6.1%}  {blew}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="number of seeds (default 4)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (too high)")
    parser.add_argument("--out", type=Path, default=Path("gradwatch_quickstart"),
                        help="where run records and the report go (default gradwatch_quickstart)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # works with no account
    os.environ.setdefault("WANDB_SILENT", "true")
    use_wandb = not args.no_wandb and importlib.util.find_spec("wandb") is not None

    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_data()
    start = time.perf_counter()
    print(f"MLP on handwritten digits, SGD(lr={args.lr}, momentum=0.9), {args.steps} steps, "
          "raw 0-16 pixel inputs\n")
    acc_plain, acc_gw, div_plain, div_gw = [], [], 0, 0
    busiest = None  # the gradwatch run with the most events, shown at the end
    for seed in range(args.seeds):
        plain = train(data, seed=seed, steps=args.steps, lr=args.lr, monitor=False)
        watched = train(data, seed=seed, steps=args.steps, lr=args.lr, monitor=True,
                        run_dir=args.out / "runs" / f"seed{seed}", use_wandb=use_wandb)
        acc_plain.append(plain["accuracy"])
        acc_gw.append(watched["accuracy"])
        div_plain += plain["diverged"]
        div_gw += watched["diverged"]
        actions = watched["monitor"].steps()["action"].value_counts()
        print(f"seed {seed}")
        print(f"  no clipping      {describe(plain)}")
        print(f"  gradwatch auto   {describe(watched)}")
        print(f"                   clipped {actions.get('clip_norm', 0)} steps by norm, "
              f"{actions.get('clip_value', 0)} by value, skipped {actions.get('skip', 0)}")
        monitor = watched["monitor"]
        activity = (len(monitor.events()), int((monitor.steps()["action"] != "none").sum()))
        if busiest is None or activity > busiest[1]:
            busiest = (seed, activity, monitor)
    n = args.seeds
    print(f"\nmean accuracy: no clipping {sum(acc_plain) / n:.1%} ({div_plain}/{n} diverged), "
          f"gradwatch auto {sum(acc_gw) / n:.1%} ({div_gw}/{n} diverged)")

    seed, _, monitor = busiest
    events = monitor.events()
    print(f"\nEvents of the gradwatch run with seed {seed} ({len(events)}; an explosion is "
          f"a z-score above {monitor.config.z_threshold:g}, raised where the run's norms are "
          "heavy-tailed; a drift, a sustained rise):")
    for ev in events.itertuples():
        print(f"  step {ev.step:4d} {ev.kind:11s} {ev.action:10s} layer {ev.layer}: {ev.reason}")
    steps = monitor.steps()
    clipped = steps[steps["action"] != "none"]
    cap = monitor.config.max_ratio
    print(f"Steps it clipped ({len(clipped)}; a norm more than {monitor.config.clip_z:g} "
          f"standard deviations above its running log-mean for the model"
          + (f" or more than {cap:g}x its typical norm" if cap else "")
          + f", {monitor.layer_clip_z:.2f} deviations for a layer, is scaled back to that "
          "boundary; while the model norm crosses it often, its threshold comes down towards "
          "the typical norm):")
    for row in clipped.head(10).itertuples():
        print(f"  step {row.step:4d} {row.action:10s} norm {row.global_norm:8.3g} -> "
              f"{row.clipped_norm:8.3g} (typical {row.typical_norm:.3g}, z={row.z:+.1f})")
    from gradwatch.report import export_report

    report = export_report(monitor.run_dir, args.out / "report.html")
    print(f"\nRun records: {args.out / 'runs'}  (one per seed; read them with "
          "gradwatch.report.load_run)")
    print(f"Report of seed {seed}: {report}  (rebuild it with: gradwatch report "
          f"{monitor.run_dir} -o report.html)")
    if use_wandb:
        print(f"W&B: offline runs in ./wandb (upload with: wandb sync wandb/offline-run-*)")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
