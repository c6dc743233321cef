"""Test helpers: small models and synthetic gradient streams with known spikes."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class TinyNet(nn.Module):
    """Nested modules, so layer names and grouping have something to work on."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b.norm(h + torch.tanh(b.mlp(torch.relu(b.attn(h)))))
        return self.head(h)


def mlp(sizes=(16, 32, 32, 4)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class GradStream:
    """Writes synthetic gradients into a model, step by step, deterministically.

    Every parameter gets ``scale * noise * N(0, 1)`` where ``noise`` is a per-step,
    per-module log-normal factor (``sigma`` in log space), so log norms fluctuate
    like real minibatch gradients. ``diffuse`` and ``spike`` inject anomalies.
    """

    def __init__(self, model: nn.Module, seed: int = 0, sigma: float = 0.15) -> None:
        self.model = model
        self.seed = seed
        self.sigma = sigma
        self.step = 0

    def write(
        self,
        *,
        diffuse: dict[str, float] | None = None,
        spike: dict[str, float] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Set ``.grad`` of every parameter for the next step.

        Args:
            diffuse: module name -> factor multiplying all its gradients.
            spike: parameter name -> value written into one component (index 0).
        """
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
        factors: dict[str, float] = {}
        for name, p in self.model.named_parameters():
            module = name.rpartition(".")[0]
            if module not in factors:
                factors[module] = math.exp(self.sigma * torch.randn((), generator=g).item())
            grad = torch.randn(p.shape, generator=g) * 0.01 * factors[module]
            if diffuse and module in diffuse:
                grad *= diffuse[module]
            if spike and name in spike:
                grad.view(-1)[0] = spike[name]
            p.grad = grad.to(dtype or p.dtype)
        self.step += 1


aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            # Boolean-mask indexing needs the mask's true count on the host.
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self.syncs.append(f"{func} with a boolean mask")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and (
                dst is not None and torch.device(dst).type == "cpu"
            ):
                self.syncs.append(f"{func} device->host")
        return func(*args, **(kwargs or {}))


def assert_record_decides_as(run, monitor) -> None:
    """The run record ``run`` (``load_run``) holds the decisions, thresholds, norms and
    events of ``monitor``, a run never interrupted: statistics carried over, not a
    second warm-up."""
    import pytest

    a = monitor.steps()
    assert list(run.steps.action) == list(a.action)
    assert run.steps.threshold.values == pytest.approx(a.threshold.values, rel=1e-5,
                                                       nan_ok=True)
    assert run.steps.global_norm.values == pytest.approx(a.global_norm.values, rel=1e-5)
    assert list(run.events.step) == list(monitor.events().step)
