"""gradwatch in a PyTorch Lightning Trainer: one callback, W&B offline, a report.

A small MLP learns scikit-learn's bundled handwritten digits (no download) with
gradient accumulation; a few corrupted batches (one feature multiplied by 1e4) make
the gradients explode. GradWatchCallback detects and clips them.

Run:  python examples/lightning_fit.py          (under a minute on CPU)
      python examples/lightning_fit.py --devices 2   (DDP, two CPU processes)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("gradwatch_lightning"))
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP if > 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger
    from sklearn.datasets import load_digits

    from gradwatch.integrations.lightning import GradWatchCallback
    from gradwatch.report import export_report

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    corrupt = set(range(150, 1797, 200))  # every 200th sample has one exploded feature

    class Digits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def training_step(self, batch, batch_idx):
            xb, yb, idx = batch
            bad = torch.isin(idx, torch.tensor(sorted(corrupt)))
            xb = torch.where(bad[:, None] & (torch.arange(64) == 5), xb * 1e4, xb)
            loss = nn.functional.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=16, shuffle=True)
    logger = WandbLogger(project="gradwatch-examples", save_dir=str(args.out))
    watch = GradWatchCallback(run_dir=args.out / "run", log_every=20)
    trainer = pl.Trainer(max_steps=args.steps, accumulate_grad_batches=2, callbacks=[watch],
                         logger=logger, gradient_clip_val=None, accelerator="cpu",
                         devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.out)
    trainer.fit(Digits(), data)

    events = watch.monitor.events()
    actions = watch.monitor.steps()["action"].value_counts().to_dict()
    print(f"process {trainer.global_rank}: actions {actions}; {len(events)} event(s)",
          flush=True)
    if not trainer.is_global_zero:
        return 0  # rank 0 alone recorded the run
    for ev in events.itertuples():
        print(f"  step {ev.step:4d} {ev.kind:10s} {ev.action:10s} layer {ev.layer}: {ev.reason[:120]}")
    report = export_report(args.out / "run", args.out / "report.html")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
