"""Multi-process training scenarios for tests/test_distributed.py (gloo, CPU).

``spawn(world, scenario, tmp_path)`` starts ``world`` processes that join one gloo
group and run ``scenario(rank, world, tmp_path)``; each returns a dict of plain values
and tensors, saved to ``tmp_path/rank{r}.pt`` and returned to the test in rank order.
``train(...)`` is the one training loop every scenario (and the single-process
reference) runs, so the only difference between them is how the model is wrapped.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gradwatch

GLOBAL_BATCH = 16
SPIKES = {18: 1e3, 27: 1e3}  # optimizer step -> loss factor (every rank)
OUTLIER_STEP = 23  # one gradient element made huge: a concentrated anomaly
NAN_STEP = 31  # NaN on rank 1 only (single process: the whole batch's gradient)
STEPS = 36
CONFIG = dict(warmup_steps=5, log_every=8, clip="auto")


def make_model() -> nn.Module:
    # The last layer has one output row: under FSDP2's Shard(0) across two ranks, rank
    # 1 holds an empty shard of its weight and bias.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=g)
    y = torch.sin(x[:, :1]) + 0.1 * x[:, 1:2]
    return x, y


def poke_outlier(model: nn.Module, rank: int) -> None:
    """Add a large value to element (0, 0) of the second layer's weight gradient, which
    an FSDP2 shard on rank 0 holds (and every rank holds under DDP)."""
    grad = list(model.parameters())[2].grad
    if hasattr(grad, "to_local"):
        if rank == 0:
            grad.to_local()[0, 0] += 40.0
    else:
        grad[0, 0] += 40.0


def _count_all_reduces() -> list[int]:
    """Count calls to torch.distributed.all_reduce (the monitor's only collective)."""
    calls = [0]
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def train(model: nn.Module, rank: int, world: int, *, steps: int = STEPS, start: int = 0,
          monitor: gradwatch.GradMonitor | None = None, nan_rank: int | None = 1,
          params_full=None, count_collectives: bool = False, outlier: bool = True,
          nan_via: str = "grad", fused: bool = False, host_branches: bool = True,
          **attach: Any) -> dict[str, Any]:
    """SGD on this rank's slice of each global batch; the monitor steps every step.

    ``nan_rank``: the rank whose gradients get a NaN at NAN_STEP (``None``: none).
    ``nan_via="grad"`` writes it into that rank's local gradient or shard after
    backward; ``"input"`` into the last sample of the global batch, which is that
    rank's (so DDP's average carries it to every rank). In a single process (world 1)
    it goes into the same place of the whole batch or gradient.
    """
    if monitor is None:
        if fused:  # skip and clipping coefficient ride in found_inf / grad_scale
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        monitor = gradwatch.attach(model, optimizer, **{**CONFIG, "run_dir": False, **attach})
    # False: the accelerator path (no decision read on the host) on these CPU tensors.
    monitor._host_branches = host_branches
    optimizer = monitor.optimizer
    calls = _count_all_reduces() if count_collectives else None
    per_step_calls = []
    moved = {}
    for step in range(start, start + steps):
        x, y = batch(step)
        nan_here = step == NAN_STEP and nan_rank is not None and (rank == nan_rank or world == 1)
        if nan_here and nan_via == "input":
            x[-1, 0] = float("nan")
        lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
        loss = nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]) * SPIKES.get(step, 1.0)
        optimizer.zero_grad()
        loss.backward()
        if step == OUTLIER_STEP and outlier:
            poke_outlier(model, rank)
        if nan_here and nan_via == "grad":
            grad = next(model.parameters()).grad
            gradwatch.distributed.local(grad).view(-1)[0] = float("nan")
        before = [gradwatch.distributed.local(p).detach().clone() for p in model.parameters()]
        if calls is not None:
            calls[0] = 0
        monitor.step()
        if calls is not None:
            per_step_calls.append(calls[0])
        optimizer.step()
        moved[step] = sum(
            (gradwatch.distributed.local(p).detach() - b).abs().sum().item()
            for p, b in zip(model.parameters(), before)
        )
    out = {
        "steps": monitor.steps(),
        "layers": monitor.history(),
        "events": monitor.events(),
        "moved": moved,
        "collectives": per_step_calls,
        "state": monitor.state_dict(),
        "run_dir": monitor.run_dir,
        "layer_numel": [r["numel"] for r in monitor.layers.describe()],
    }
    if params_full is not None:
        out["params"] = params_full(model)
    monitor.detach()
    return out


# ---------------------------------------------------------------------- scenarios
def ddp(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    main = train(model, rank, world, count_collectives=True, nan_via="input",
                 params_full=lambda m: [p.detach().clone() for p in m.parameters()])
    # Resume: 20 steps, rank 0 saves the state, every rank loads it and goes on.
    resumed = DDP(make_model())
    first = train(resumed, rank, world, steps=20, nan_via="input")
    path = os.path.join(tmp, "state.pt")
    if rank == 0:
        torch.save(first["state"], path)
    dist.barrier()
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.02)
    monitor = gradwatch.attach(resumed, optimizer, **{**CONFIG, "run_dir": False})
    monitor.load_state_dict(torch.load(path, weights_only=True))
    second = train(resumed, rank, world, steps=STEPS - 20, start=20, monitor=monitor,
                   nan_via="input")
    monitor = gradwatch.attach(resumed, optimizer, run_dir=False)
    # Inside no_sync() the gradients are local: stepping the monitor there is refused.
    with resumed.no_sync():
        nn.functional.mse_loss(resumed(batch(0)[0]), batch(0)[1]).backward()
        try:
            monitor.step()
        except RuntimeError as err:
            no_sync_error = str(err)
    return {"main": main, "resumed": second, "no_sync_error": no_sync_error}


def reporting(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Default attach() arguments on every rank: only rank 0 writes anything."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.chdir(tmp)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    model = DDP(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    monitor = gradwatch.attach(model, optimizer, wandb=True, log_every=5)
    out = train(model, rank, world, steps=10, monitor=monitor, nan_rank=None)
    if rank == 0:
        import wandb

        wandb.finish()
    return {"run_dir": out["run_dir"], "steps": len(out["steps"])}


def fsdp2(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    empty = [p.to_local().numel() == 0 for p in model.parameters()]
    out = train(model, rank, world, count_collectives=True,
                params_full=lambda m: [p.full_tensor().detach().clone()
                                       for p in m.parameters()])
    out["empty_shards"] = empty
    try:
        gradwatch.attach(model, None, clip="agc", run_dir=False)
    except ValueError as err:
        out["agc_error"] = str(err)
    out["norm_mode"] = train(fully_shard(make_model()), rank, world, steps=12,
                             count_collectives=True, clip="norm", max_norm=1.0)["collectives"]
    device_path = make_model()
    fully_shard(device_path)
    out["device_path"] = train(device_path, rank, world, count_collectives=True,
                               host_branches=False)
    return out


def fsdp2_fused(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return train(model, rank, world, fused=True,
                 params_full=lambda m: [p.full_tensor().detach().clone()
                                        for p in m.parameters()])


def hsdp(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """FSDP2 on a 2-D (replicate, shard) mesh, both ways round: sharded across the two
    ranks (1 x 2), and replicated across them (2 x 1: whole, averaged gradients)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for shape in ((1, world), (world, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        out[shape] = train(model, rank, world, count_collectives=True, outlier=False,
                           nan_rank=None, params_full=lambda m: [
                               p.full_tensor().detach().clone() for p in m.parameters()])
    return out


def fsdp1(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from torch.distributed.fsdp import ShardingStrategy

    def full(m):
        with FSDP.summon_full_params(m):
            return [p.detach().clone() for p in m.parameters()]

    model = FSDP(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    out = train(model, rank, world, nan_rank=None, outlier=False, params_full=full,
                count_collectives=True)
    # NO_SHARD: whole, averaged gradients on every rank, like DDP: nothing to reduce.
    model = FSDP(make_model(), use_orig_params=True, device_id=torch.device("cpu"),
                 sharding_strategy=ShardingStrategy.NO_SHARD)
    out["no_shard"] = train(model, rank, world, nan_rank=None, outlier=False,
                            params_full=full, count_collectives=True)
    # A one-element parameter: rank 1's flat shard is all padding (no elements at all).
    # Attaching takes part in the same collectives on every rank (no hang).
    tiny = FSDP(nn.Linear(1, 1, bias=False), use_orig_params=True,
                device_id=torch.device("cpu"))
    monitor = gradwatch.attach(tiny, None, run_dir=False)
    tiny(torch.ones(2, 1)).sum().backward()
    out["tiny_norm"] = monitor.step().global_norm
    out["tiny_numel"] = monitor.layers.describe()[0]["numel"]
    return out


def replicated(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """DTensor parameters, one Shard(0) and one Replicate(), on one mesh: the replicated
    gradient is whole on every rank and must count once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    w_grad, b_grad = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    module = nn.Linear(3, 4)
    module.weight = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
    module.bias = nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()]))
    module.weight.grad = distribute_tensor(w_grad, mesh, [Shard(0)])
    module.bias.grad = distribute_tensor(b_grad, mesh, [Replicate()])
    monitor = gradwatch.attach(module, None, run_dir=False, granularity="parameter")
    result = monitor.step()
    layers = monitor.history().set_index("layer")
    return {"global": result.global_norm, "weight": float(layers.loc["weight", "grad_norm"]),
            "bias": float(layers.loc["bias", "grad_norm"]),
            "true": [float(w_grad.norm()), float(b_grad.norm()),
                     float(torch.cat([w_grad.flatten(), b_grad]).norm())],
            "numel": [r["numel"] for r in monitor.layers.describe()]}


# ---------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, name: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A short timeout: a collective that one rank never joins fails the test quickly.
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[name](rank, world, tmp)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, scenario: str, tmp: str) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, _free_port(), scenario, str(tmp)), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
