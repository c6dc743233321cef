"""Multi-process training scenarios for tests/test_distributed.py (gloo, CPU).

``spawn(world, scenario, tmp_path)`` starts ``world`` processes that join one gloo
group and run ``scenario(rank, world, tmp_path)``; each returns a dict of plain values
and tensors, saved to ``tmp_path/rank{r}.pt`` and returned to the test in rank order.
Each rank's output goes to ``tmp_path/rank{r}.log``; when a rank fails, the error
quotes every rank's exit status and log.
``train(...)`` is the one training loop every scenario (and the single-process
reference) runs, so the only difference between them is how the model is wrapped.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import subprocess
import sys
import time
import uuid
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


def abort_on_rank_1(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 1 dies as a C++ abort would kill it, while rank 0 waits in a collective:
    how the spawner reports a failed rank."""
    if rank == 1:
        os.abort()
    dist.barrier()
    return {}


# ---------------------------------------------------------------------- spawning
# Each rank is a fresh interpreter (a subprocess), so what it prints, a C++ abort's
# message and a faulthandler traceback included, lands in its own log, and the parent
# reports every rank's exit status and log when one fails (rather than only
# "process 0 terminated with signal SIGABRT").
#
# The ranks meet through a FileStore in the scenario's own directory: no TCP port is
# picked, released and bound again by rank 0: that is a race with every other process
# on the machine (two sessions given one port: one fails at init with EADDRINUSE, and
# its rank 1 may first reach the other session's store). gloo's own listeners bind
# port 0 and keep it; their addresses pass through this private store only.
#
# The timeout (rendezvous and each collective) is generous: on a loaded 2-core machine
# one rank can lag the other by tens of seconds. A rank that dies is noticed by the
# parent at once, which stops the others; the timeout only bounds a hang.
TIMEOUT = datetime.timedelta(minutes=5)
DEADLINE_S = 1200  # a whole scenario, as a last resort
LOG_TAIL_LINES = 80


class WorkerFailed(RuntimeError):
    """A rank exited with an error or a signal, or the scenario ran past DEADLINE_S."""


def _entry(rank: int, world: int, name: str, tmp: str, store: str) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's hang dump
    torch.set_num_threads(1)  # two ranks on two cores, beside whatever else runs
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        result = globals()[name](rank, world, tmp)
        path = os.path.join(tmp, f"rank{rank}.pt")
        torch.save(result, path + ".partial")
        os.replace(path + ".partial", path)  # the parent never reads half a file
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: {name} done", flush=True)


def _status(code: int | None) -> str:
    if code is None:
        return "still running (stopped)"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _stop(procs: list[subprocess.Popen]) -> list[int | None]:
    """Dump the Python stacks of ranks still running, then end them; their exit codes
    as they were before (``None``: was still running)."""
    codes = [p.poll() for p in procs]
    for p, c in zip(procs, codes):
        if c is None:
            p.send_signal(signal.SIGUSR1)
    time.sleep(2)
    for p, c in zip(procs, codes):
        if c is None:
            p.kill()
            p.wait()
    return codes


def spawn(world: int, scenario: str, tmp: str) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks; their results in rank order.

    Raises:
        WorkerFailed: a rank failed (or the scenario hung): every rank's exit status
            and the end of its log (``tmp/rank{r}.log``).
    """
    tmp = str(tmp)
    store = os.path.join(tmp, f"rendezvous-{uuid.uuid4().hex}")
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(os.path.dirname(os.path.abspath(gradwatch.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(
               [here, package, *filter(None, [os.environ.get("PYTHONPATH")])])}
    logs = [os.path.join(tmp, f"rank{r}.log") for r in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        code = (f"import dist_workers; "
                f"dist_workers._entry({rank}, {world}, {scenario!r}, {tmp!r}, {store!r})")
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", code], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                if failed:  # let the others fail on their own: their errors are evidence
                    grace = time.monotonic() + 10
                    while time.monotonic() < grace and any(p.poll() is None for p in procs):
                        time.sleep(0.2)
                codes = _stop(procs)
                what = "failed" if failed else f"ran past {DEADLINE_S} s"
                report = "\n\n".join(
                    f"--- rank {r}: {_status(c)}; end of {logs[r]}:\n{_tail(logs[r])}"
                    for r, c in enumerate(codes))
                raise WorkerFailed(f"scenario {scenario!r} on {world} ranks {what}:\n\n"
                                   f"{report}")
            time.sleep(0.2)
    finally:
        for p in procs:  # an interrupted test leaves no rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
