"""Running under ``torch.distributed``: which gradients are shards, and how to combine
per-layer statistics across ranks.

* **DDP** (and any data parallelism that leaves full, already averaged gradients on
  every rank): every rank sees the same gradients and so computes the same statistics
  and decisions. Nothing is communicated.
* **FSDP2** (``fully_shard``) and **FSDP1** (``use_orig_params=True``): a rank holds a
  shard of each gradient (a ``DTensor`` with ``Shard`` placement, or a flat view that
  can be empty). Per-layer sums of squares, element counts, maxima and presence flags
  are computed on the local shards and combined with two small all-reduces per step
  (one ``SUM`` of ``2L`` values, one ``MAX`` of ``2L`` values, launched together), plus
  one ``SUM`` of ``L`` post-clip sums when a layer is value-clipped (on accelerators
  in ``auto`` and ``value`` modes at every step: the decision is not read there).
  Whole (replicated) tensors in a sharded model count once, from the group's rank 0.
  No gradient is ever gathered and no collective is issued per tensor. Every rank
  then holds the same numbers and makes the same decision; a NaN on one rank makes
  the reduced sum NaN everywhere, so every rank skips.

``torch.distributed`` is imported only when it is initialised; a single-process run
never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Module-name components that wrappers insert and that are not part of the model's own
# structure (FSDP1, activation checkpointing, torch.compile).
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper.

    Its gradients are the wrapped module's, and its parameter names then match a
    single-process run's (no ``module.`` prefix), so state moves between the two.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def clean_name(name: str) -> str:
    """A parameter name without the components wrappers insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local(t: Tensor) -> Tensor:
    """The local part of a ``DTensor`` (the tensor itself otherwise).

    In-place ops on the result act on the gradient's own storage.
    """
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t


def shard_layout(
    model: nn.Module, params: tuple[nn.Parameter, ...]
) -> tuple[Any, tuple[bool, ...]]:
    """The process group across which ``model``'s gradients are sharded (``None`` when
    every rank holds whole gradients: single process, DDP, FSDP1 ``NO_SHARD``), and
    which of ``params`` are shards. The others (``Replicate`` DTensors, plain tensors
    beside FSDP2 modules) are whole on every rank of the group.

    Raises:
        ValueError: a layout gradwatch cannot reduce on its own (FSDP1 without
            ``use_orig_params=True``, DTensors sharded over several mesh dimensions or
            over different groups); the message says to pass ``process_group=``.
    """
    none = (None, (False,) * len(params))
    if not is_initialized():
        return none
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.tensor import DTensor, Shard

    groups = []
    sharded = [False] * len(params)
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if len(dims) > 1:
                raise ValueError(
                    f"a parameter is a DTensor sharded over {len(dims)} mesh dimensions "
                    f"({p.placements}); gradwatch cannot tell which ranks hold disjoint "
                    "parts of it: pass process_group= (the group over which every gradient "
                    "element lives on exactly one rank) to gradwatch.attach"
                )
            if dims:
                groups.append(p.device_mesh.get_group(dims[0]))
                sharded[i] = True
    index = {id(p): i for i, p in enumerate(params)}
    for module in model.modules():
        if isinstance(module, FSDP) and module.sharding_strategy != ShardingStrategy.NO_SHARD:
            if not module._use_orig_params:
                raise ValueError(
                    "model is wrapped in FullyShardedDataParallel with "
                    "use_orig_params=False: its parameters are flat buffers without "
                    "layer names; wrap it with FullyShardedDataParallel(..., "
                    "use_orig_params=True) to monitor it"
                )
            groups.append(module.process_group)
            for q in module.parameters():
                if id(q) in index:
                    sharded[index[id(q)]] = True
    if not groups:
        return none
    first = groups[0]
    if any(g is not first for g in groups[1:]):
        raise ValueError(
            "the model's gradients are sharded over different process groups; pass "
            "process_group= (the group over which every gradient element lives on "
            "exactly one rank) to gradwatch.attach"
        )
    return first, tuple(sharded)


class ShardReducer:
    """Combines per-layer statistics of local gradient shards across a process group.

    Collectives are launched asynchronously and waited on without reading any value,
    so on an accelerator the host never blocks (``wait`` orders the device stream).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world_size = torch.distributed.get_world_size(group)

    def sum_and_max(self, sums: Tensor, maxes: Tensor) -> tuple[Tensor, Tensor]:
        """All-reduce ``sums`` with ``SUM`` and ``maxes`` with ``MAX`` (in place)."""
        dist = torch.distributed
        work = [
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group, async_op=True),
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
        ]
        for w in work:
            w.wait()
        return sums, maxes

    def sum(self, sums: Tensor) -> Tensor:
        """All-reduce ``sums`` with ``SUM`` (in place)."""
        dist = torch.distributed
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group, async_op=True).wait()
        return sums

    def total(self, counts: list[int], device: torch.device) -> list[int]:
        """Sums over the group of this rank's ``counts`` (at construction only)."""
        t = torch.tensor(counts, dtype=torch.float64, device=device)
        return [int(v) for v in self.sum(t).tolist()]


@dataclass(frozen=True)
class ShardSetup:
    """How a monitor combines per-layer values of sharded gradients.

    Attributes:
        reducer: the collectives over the sharding group.
        sum_weight: per parameter, 1.0 if its sums count on this rank, 0.0 for a whole
            (replicated) gradient on all but the group's rank 0; ``None``: all count.
        param_numel: per parameter, the whole parameter's element count where it
            differs from what this rank sees (FSDP1's flat shards); ``None``: as seen.
    """

    reducer: ShardReducer
    sum_weight: tuple[float, ...] | None
    param_numel: tuple[int, ...] | None


def shard_setup(model: nn.Module, params: tuple[nn.Parameter, ...], process_group: Any,
                device: torch.device, clip: str) -> ShardSetup | None:
    """The sharded-reduction set-up for ``model``, or ``None`` when no communication is
    needed (single process, DDP, or a group of one).

    Args:
        model: the (unwrapped) model.
        params: its monitored parameters.
        process_group: ``"auto"`` to find FSDP's group (:func:`shard_layout`), a group
            over which every gradient element lives on exactly one rank, or ``None``.
        device: where the per-layer values live.
        clip: the clipping mode (``"agc"`` needs whole parameters and is refused).

    Raises:
        ValueError: ``clip="agc"`` with sharded gradients, or a layout that
            :func:`shard_layout` cannot reduce on its own.
    """
    if process_group == "auto":
        group, sharded = shard_layout(model, params)
    else:  # the caller's contract: every gradient element lives on one rank of it
        group, sharded = process_group, (True,) * len(params)
    if group is None or torch.distributed.get_world_size(group) == 1:
        return None
    if clip == "agc":
        raise ValueError(
            "clip='agc' is not supported with sharded gradients (FSDP): its unit-wise "
            "norms need whole parameters; use clip='auto', 'norm' or 'value'"
        )
    reducer = ShardReducer(group)
    sum_weight = None
    if not all(sharded):
        # A whole (replicated) gradient is on every rank of the group: its sums
        # count once, from the group's rank 0.
        lead = torch.distributed.get_rank(group) == 0
        sum_weight = tuple(1.0 if s or lead else 0.0 for s in sharded)
    # FSDP1 exposes each parameter as this rank's flat slice: the whole parameter's
    # size is the sum over the group (DTensors report their global size). Which
    # parameters these are is the same on every rank, so all take part or none.
    from torch.distributed.tensor import DTensor

    flat = [s and not isinstance(p, DTensor) for p, s in zip(params, sharded)]
    numel = None
    if any(flat):
        total = reducer.total([p.numel() if f else 0 for p, f in zip(params, flat)], device)
        numel = tuple(t if f else p.numel() for p, f, t in zip(params, flat, total))
    return ShardSetup(reducer, sum_weight, numel)
