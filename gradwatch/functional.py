"""Pure gradient kernels: per-tensor norms, per-layer reductions and in-place clipping.

Everything here is stateless and runs under ``torch.no_grad``. None of it reads a
tensor's value on the host: decisions arrive as tensors (coefficients, thresholds,
flags) and are applied unconditionally, the way ``torch.nn.utils.clip_grad_norm_``
multiplies by a clamped coefficient instead of branching on it. A Python ``if`` on a
tensor would force a device synchronisation on every step.

Tensors are grouped by (device, dtype) so each group costs one ``torch._foreach_*``
call instead of one kernel launch per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TensorGroup:
    """Positions (into a list of tensors) that share a device and dtype.

    ``index`` holds the same positions as a tensor on the device where per-tensor
    results are gathered, built once so no step pays a host-to-device copy for it.
    """

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    index: Tensor


def group_by_device_and_dtype(
    tensors: Sequence[Tensor], out_device: torch.device
) -> list[TensorGroup]:
    """Group tensor positions by (device, dtype), keeping first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return [
        TensorGroup(dev, dt, tuple(idx), to_device(idx, torch.long, out_device))
        for (dev, dt), idx in groups.items()
    ]


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device`` without blocking the host.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for
    the device; a pinned staging buffer and ``non_blocking=True`` do not.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@torch.no_grad()
def tensor_norms(
    tensors: Sequence[Tensor],
    groups: Sequence[TensorGroup],
    out_device: torch.device,
    *,
    with_max_abs: bool = True,
    refine_overflow: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """L2 norm and max |x| of every tensor, as two fp32 vectors in input order.

    Norms are accumulated in fp32 whatever the tensor dtype: an fp16 gradient whose
    norm exceeds 65504 reads as its true value, not ``inf``. NaN anywhere in a tensor
    makes its norm NaN and an Inf makes it Inf, so non-finite gradients show up in
    the result without a separate pass.

    Args:
        tensors: the gradients.
        groups: their (device, dtype) grouping, from :func:`group_by_device_and_dtype`.
        out_device: device of the returned vectors.
        with_max_abs: also return the max-abs vector (one more read of the tensors).
        refine_overflow: on the CPU, compute a norm that overflowed the fp32 sum of
            squares again in float64 (see :func:`_cpu_refine_overflow_`; it reads a
            flag on the host).

    Returns:
        ``(norms, max_abs)``, each of shape ``(len(tensors),)``; ``max_abs`` is
        ``None`` when not asked for.
    """
    n = len(tensors)
    if len(groups) == 1:  # the common case: one device, one dtype, already in order
        norms, max_abs = _stats(list(tensors), with_max_abs, refine_overflow)
        return _on(norms, out_device), None if max_abs is None else _on(max_abs, out_device)
    norms = torch.empty(n, dtype=torch.float32, device=out_device)
    max_abs = torch.empty(n, dtype=torch.float32, device=out_device) if with_max_abs else None
    for g in groups:
        # One fused call per group; fp32 accumulation keeps fp16/bf16 norms finite.
        group_norms, group_max = _stats([tensors[i] for i in g.indices], with_max_abs,
                                        refine_overflow)
        norms.index_copy_(0, g.index, _on(group_norms, out_device))
        if max_abs is not None:
            max_abs.index_copy_(0, g.index, _on(group_max, out_device))
    return norms, max_abs


# On the CPU, tensors below this many elements (32 KiB in fp32, where a kernel call
# costs about what reading them does) are stacked with others of their shape: the
# temporary copy stays small.
CPU_SMALL = 1 << 13
# At most this many elements are stacked at once (4 MiB in fp32): the temporary copy
# never approaches the size of the gradients themselves.
CPU_STACK = 1 << 20


def _stats(tensors: list[Tensor], with_max_abs: bool,
           refine_overflow: bool = False) -> tuple[Tensor, Tensor | None]:
    """Norms (and max |x|) of same-device, same-dtype tensors, as fp32 vectors."""
    if tensors[0].device.type != "cpu":
        return _norms(tensors), _max_abs(tensors) if with_max_abs else None
    norms, max_abs = _cpu_stats(tensors, with_max_abs)
    if refine_overflow:
        norms = _cpu_refine_overflow_(tensors, norms)
    return norms, max_abs


def _cpu_refine_overflow_(tensors: list[Tensor], norms: Tensor) -> Tensor:
    """Norms that overflowed the fp32 sum of squares, computed again in float64.

    fp32 accumulation overflows once a tensor's norm passes about 1.8e19 (the sum of
    squares passes 3.4e38), although every element is finite (bf16 gradients of 1e30).
    Only those tensors are read again, so a normal step pays one ``isinf().any()``;
    reading that flag is free on the CPU (there is no device to wait for), and only
    the CPU path asks for it. A norm that is still ``inf`` holds an Inf or exceeds
    fp32's range itself (an overflow: see :func:`overflowed`). The accelerator path
    reads no flag (no host sync), so there a norm above 1.8e19 stays ``inf`` and the
    step reads as an overflow (skipped, named as such).
    """
    over = torch.isinf(norms)
    if over.any():  # host read of a CPU tensor: no synchronisation
        for i in over.nonzero().flatten().tolist():
            norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64).float()
    return norms


def _cpu_stats(tensors: list[Tensor], with_max_abs: bool) -> tuple[Tensor, Tensor | None]:
    """The CPU route. A CPU kernel call costs microseconds whatever its size, and a
    model's small tensors come in few shapes (a block's biases and norms, repeated per
    block), so small tensors of one shape are stacked (a copy of a few kilobytes each)
    and reduced along one dimension: a handful of calls instead of three per tensor.
    Each large tensor is read once for its norm and once for its min and max together
    (``aminmax``; ``_foreach_norm(inf)`` is several times slower on the CPU).
    """
    big: list[int] = []
    by_shape: dict[torch.Size, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() >= CPU_SMALL:
            big.append(i)
        else:
            by_shape.setdefault(t.shape, []).append(i)
    chunks = []
    for idx in by_shape.values():
        per = max(1, CPU_STACK // max(1, tensors[idx[0]].numel()))
        chunks += [idx[k : k + per] for k in range(0, len(idx), per)]
    if not chunks:
        return _norms(tensors), _cpu_max_abs(tensors) if with_max_abs else None
    order: list[int] = []
    norms_parts: list[Tensor] = []
    max_parts: list[Tensor] = []
    if big:
        bt = [tensors[i] for i in big]
        order += big
        norms_parts.append(_norms(bt))
        if with_max_abs:
            max_parts.append(_cpu_max_abs(bt))
    for idx in chunks:
        block = torch.stack([tensors[i] for i in idx]).reshape(len(idx), -1)
        if block.dtype != torch.float64:
            block = block.float()
        order += idx
        norms_parts.append(torch.linalg.vector_norm(block, dim=1).float())
        if with_max_abs:
            # (amax and amin along a dimension: aminmax along one is several times slower)
            max_parts.append(torch.maximum(block.amax(1), -block.amin(1)).float())
    index = torch.tensor(order)
    norms = torch.empty(len(tensors), dtype=torch.float32)
    norms[index] = torch.cat(norms_parts)
    max_abs = None
    if with_max_abs:
        max_abs = torch.empty(len(tensors), dtype=torch.float32)
        max_abs[index] = torch.cat(max_parts)
    return norms, max_abs


def _cpu_max_abs(tensors: Sequence[Tensor]) -> Tensor:
    """max |x| per tensor from one ``aminmax`` read each (NaN propagates)."""
    pairs = [torch.aminmax(t) for t in tensors]
    hi = torch.stack([p.max for p in pairs]).float()
    lo = torch.stack([p.min for p in pairs]).float()
    return torch.maximum(hi, -lo)


def layer_sum_of_squares(norms: Tensor, layer_index: Tensor, num_layers: int) -> Tensor:
    """Sum the squared tensor norms of each layer (``index_add``: no host sync)."""
    out = torch.zeros(num_layers, dtype=torch.float32, device=norms.device)
    return out.index_add_(0, layer_index, norms.square())


# Norms below this are combined as they are (a multiply and a divide by exactly 1.0,
# so normal steps keep their bits); from it on they are divided by the largest first,
# so their squares cannot overflow fp32 (2**50 squared is 2**100, far below 2**128).
_SCALE_FROM = 2.0**50


def layer_and_global_norms(
    norms: Tensor, layer_index: Tensor, num_layers: int
) -> tuple[Tensor, Tensor]:
    """Per-layer and global L2 norms from per-tensor norms, without fp32 overflow.

    Squaring norms above about 1.8e19 would overflow fp32 although each is finite;
    they are scaled by ``1 / max`` before squaring and scaled back after the square
    root. A NaN or ``inf`` norm stays NaN or ``inf`` (the scale is then 1 or keeps
    ``inf`` infinite). No host read.

    Returns:
        ``(layer_norm, global_norm)``: a ``(num_layers,)`` vector and a 0-dim tensor.
    """
    scale = _overflow_scale(norms)
    sumsq = layer_sum_of_squares(norms * scale, layer_index, num_layers)
    return sumsq.sqrt() / scale, sumsq.sum().sqrt() / scale


def global_norm_of(norms: Tensor) -> Tensor:
    """The L2 norm of a vector of norms (layers to model), without fp32 overflow."""
    scale = _overflow_scale(norms)
    return (norms * scale).square().sum().sqrt() / scale


def _overflow_scale(norms: Tensor) -> Tensor:
    """1.0 unless the largest finite norm reaches ``_SCALE_FROM``; then 2**50 over it.
    NaN and ``inf`` norms are left out of the maximum: they stay NaN and ``inf``
    whatever the scale, and the other layers keep their values."""
    if norms.numel() == 0:  # metadata: no sync
        return torch.ones((), dtype=norms.dtype, device=norms.device)
    top = torch.nan_to_num(norms, nan=0.0, posinf=0.0).amax()
    # _SCALE_FROM / max(top, _SCALE_FROM): exactly 1.0 below it; above, 2**50 / top,
    # which scales like 1 / top, but by a power of two more, so no scaled norm is
    # pushed into fp32's subnormals. (Three ops, no comparison or select.)
    return top.clamp_min(_SCALE_FROM).reciprocal() * _SCALE_FROM


def overflowed(global_norm: Tensor, layer_max: Tensor) -> Tensor:
    """Whether a step's norm is ``inf`` although every element is finite (0-dim bool):
    finite gradients whose norm exceeds fp32's range (3.4e38), as opposed to Inf or
    NaN elements (an Inf element makes max |g| ``inf``, a NaN makes the norm NaN)."""
    return torch.isinf(global_norm) & torch.isfinite(layer_max).all()


def layer_max(values: Tensor, layer_index: Tensor, num_layers: int) -> Tensor:
    """Per-layer maximum of non-negative per-tensor values (NaN propagates)."""
    out = torch.zeros(num_layers, dtype=torch.float32, device=values.device)
    return out.scatter_reduce_(0, layer_index, values, reduce="amax", include_self=True)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """Accumulate norms in fp32 for 16/32-bit floats; float64 in its own precision."""
    return None if dtype == torch.float64 else torch.float32


def _norms(tensors: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm(list(tensors), 2, dtype=_acc_dtype(tensors[0].dtype))
    return torch.stack(norms).float()


def _max_abs(tensors: Sequence[Tensor]) -> Tensor:
    """max |x| of each accelerator tensor as an fp32 vector (NaN if it holds a NaN):
    one fused ``_foreach_norm(inf)`` call. (On the CPU that kernel runs several times
    slower than a plain reduction: see :func:`_cpu_stats`.)"""
    dtype = _acc_dtype(tensors[0].dtype)
    return torch.stack(torch._foreach_norm(list(tensors), float("inf"), dtype=dtype)).float()


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


@torch.no_grad()
def scale_(tensors: Sequence[Tensor], groups: Sequence[TensorGroup], coef: Tensor) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``coef``.

    Used for norm clipping: the coefficient is already clamped to at most 1, so
    multiplying always (even by exactly 1.0) avoids reading its value on the host.
    """
    for g in groups:
        ts = [tensors[i] for i in g.indices]
        # The coefficient stays fp32 (as in clip_grads_with_norm_): cast to fp16 a small
        # one would underflow to 0 and wipe the gradients.
        torch._foreach_mul_(ts, _on(coef, g.device))


@torch.no_grad()
def clamp_(
    tensors: Sequence[Tensor], groups: Sequence[TensorGroup], thresholds: Tensor
) -> None:
    """Clamp tensor ``i`` in place to ``[-thresholds[i], thresholds[i]]``.

    An infinite threshold leaves a tensor unchanged. Thresholds are 0-dim device
    tensors, so no value crosses to the host.
    """
    for g in groups:
        ts = [tensors[i] for i in g.indices]
        index = g.index if len(groups) > 1 else None
        # A bound beyond the gradient dtype's range (fp16: 65504) casts to inf, which
        # is right: no value of that dtype can exceed it. inf bounds leave +-inf and NaN
        # gradients as they are.
        bounds = thresholds if index is None else thresholds.index_select(0, index)
        hi = _on(bounds, g.device).to(g.dtype)
        torch._foreach_clamp_max_(ts, list(hi.unbind()))
        torch._foreach_clamp_min_(ts, list((-hi).unbind()))


@torch.no_grad()
def zero_where_(tensors: Sequence[Tensor], flag: Tensor) -> None:
    """Set every tensor to zero where the 0-dim bool ``flag`` is true (NaN-safe)."""
    for t in tensors:
        # masked_fill_ with a 0-dim mask broadcasts; multiplying by 0 would keep NaN.
        t.masked_fill_(_on(flag, t.device), 0)


def unitwise_norm(x: Tensor) -> Tensor:
    """Norm of each output unit (dim 0) of a weight; whole-tensor norm for 0/1-D."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=torch.float32)
    return torch.linalg.vector_norm(
        x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=torch.float32
    )


@torch.no_grad()
def agc_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    clip_factor: float,
    eps: float,
    out_device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021), in place.

    Each unit's gradient norm is capped at ``clip_factor * max(||w_unit||, eps)``,
    as in timm's ``adaptive_clip_grad``.

    Returns:
        ``(post_norms, clipped)``: the fp32 L2 norm of every gradient after clipping,
        and a 0-dim bool tensor, true when any unit was clipped.
    """
    post = torch.empty(len(grads), dtype=torch.float32, device=out_device)
    clipped = torch.zeros((), dtype=torch.bool, device=out_device)
    for i, (p, g) in enumerate(zip(params, grads)):
        w_norm = unitwise_norm(p.detach()).clamp_min(eps)
        g_norm = unitwise_norm(g)
        max_norm = w_norm * clip_factor
        coef = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
        clipped = clipped | _on((g_norm > max_norm).any(), out_device)
        g.mul_(coef.to(g.dtype))
        post[i] = _on(torch.linalg.vector_norm(g, dtype=torch.float32), out_device)
    return post, clipped
