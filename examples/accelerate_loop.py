"""gradwatch in a hand-written Accelerate loop with gradient accumulation.

An MLP on scikit-learn's handwritten digits (no download); some samples have one
exploded feature. ``GradWatchAccelerate.step()`` runs inside
``if accelerator.sync_gradients:``, once per optimizer step.

Run:  python examples/accelerate_loop.py      (a few seconds on CPU)
      torchrun --nproc_per_node 2 examples/accelerate_loop.py   (two processes, gloo)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gradwatch_accelerate"))
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    from accelerate import Accelerator
    from sklearn.datasets import load_digits

    from gradwatch.integrations.accelerate import GradWatchAccelerate
    from gradwatch.report import export_report

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x[150::200, 5] = 1e4  # outlier components in a few samples
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    watch = GradWatchAccelerate(accelerator, model, optimizer, run_dir=args.out / "run",
                                log_every=20)
    for _ in range(args.epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    watch.step(loss=loss)  # the last micro-batch's loss
                optimizer.step()
                optimizer.zero_grad()
    watch.detach()
    actions = watch.monitor.steps()["action"].value_counts()
    print(f"process {accelerator.process_index}: {len(watch.monitor.steps())} optimizer "
          f"steps; actions: {actions.to_dict()}; {len(watch.monitor.events())} event(s)",
          flush=True)
    if accelerator.is_main_process:  # the only process that recorded the run
        print(f"report: {export_report(args.out / 'run', args.out / 'report.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
