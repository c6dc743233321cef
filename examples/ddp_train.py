"""gradwatch under DistributedDataParallel (or FSDP2 with ``--fsdp``).

An MLP learns scikit-learn's handwritten digits (no download); a few samples carry one
exploded feature. Every rank runs the same code: ``gradwatch.attach`` finds out how
the gradients are laid out (DDP: already averaged, nothing to communicate; FSDP2:
shards, combined with two small all-reduces per step), every rank makes the same
decision, and only rank 0 keeps the run record, logs to W&B (offline unless you set
``WANDB_MODE``) and writes the report.

Run on CPU (gloo):   torchrun --nproc_per_node 2 examples/ddp_train.py
On GPUs (nccl):      torchrun --nproc_per_node 8 examples/ddp_train.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradwatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--out", type=Path, default=Path("gradwatch_ddp"))
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    device = device or torch.device("cpu")

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x[150::200, 5] = 300.0  # outlier components in a few samples
    y = torch.tensor(digits.target)
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32 // world, sampler=sampler)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10)).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wandb = False if args.no_wandb else {
        "init_kwargs": {"project": "gradwatch-ddp", "config": {"world_size": world}}}
    # The same call on every rank; rank 0 alone records and reports. max_norm is a
    # fixed ceiling for the first steps, before the statistics have warmed up.
    monitor = gradwatch.attach(model, optimizer, run_dir=args.out / "run", wandb=wandb,
                               max_norm=20.0, log_every=20)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad()
            loss.backward()
            monitor.step(loss=loss)  # identical decision on every rank; no host sync
            optimizer.step()
    monitor.detach()

    steps = monitor.steps()
    summary = (f"rank {rank}/{world}: {len(steps)} steps, actions "
               f"{steps['action'].value_counts().to_dict()}, "
               f"{len(monitor.events())} event(s)")
    print(summary, flush=True)
    if rank == 0:
        from gradwatch.report import export_report

        print(f"report: {export_report(args.out / 'run', args.out / 'report.html')}",
              flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
