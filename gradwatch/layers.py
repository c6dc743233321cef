"""Which parameters make up which "layer", and the per-step plan for reading them.

A layer is, by default, a module that directly owns parameters, named by its
qualified name (``encoder.layers.3.attn``). ``granularity="parameter"`` makes every
parameter its own layer; ``group_depth``, ``group_prefixes`` and ``group_pattern``
merge layers so a model with thousands of tensors yields a readable set.

Every parameter of the model is included, frozen ones too: a frozen parameter has no
gradient and is simply absent from the steps where that is so, and a parameter that
is unfrozen later is monitored from then on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import MonitorConfig
from .distributed import clean_name
from .functional import TensorGroup, group_by_device_and_dtype, to_device

ROOT_LAYER = "(root)"


@dataclass(frozen=True)
class LayerTable:
    """The model's layers and the parameters that belong to each.

    Attributes:
        names: layer names, in the order their first parameter appears.
        param_names: qualified names of all parameters.
        params: the parameters, aligned with ``param_names``.
        param_layer: the layer index of each parameter.
        param_numel: element count of each whole parameter (under sharding, of the
            full parameter, not of this rank's shard).
    """

    names: tuple[str, ...]
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    param_layer: tuple[int, ...]
    param_numel: tuple[int, ...]

    @classmethod
    def from_model(cls, model: nn.Module, config: MonitorConfig) -> LayerTable:
        """Build the table of ``model``'s layers as ``config`` asks.

        Names are the model's own: components that wrappers insert (FSDP1's
        ``_fsdp_wrapped_module``, activation checkpointing, ``torch.compile``) are
        dropped, so a wrapped model has the same layers as the plain one.
        """
        named = [(clean_name(n), p) for n, p in model.named_parameters()]
        if not named:
            raise ValueError(
                f"model={type(model).__name__} has no parameters: there are no gradients "
                "to monitor; attach gradwatch to the module you train"
            )
        layer_of = _layer_namer(config)
        names: dict[str, int] = {}
        param_layer = []
        for pname, _ in named:
            lname = layer_of(pname)
            param_layer.append(names.setdefault(lname, len(names)))
        return cls(
            names=tuple(names),
            param_names=tuple(n for n, _ in named),
            params=tuple(p for _, p in named),
            param_layer=tuple(param_layer),
            param_numel=tuple(p.numel() for _, p in named),
        )

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def describe(self) -> list[dict[str, Any]]:
        """One record per layer: name, parameter names, element count, shapes."""
        out = [
            {"layer": n, "index": i, "params": [], "numel": 0, "shapes": []}
            for i, n in enumerate(self.names)
        ]
        for pname, p, li, numel in zip(
            self.param_names, self.params, self.param_layer, self.param_numel
        ):
            rec = out[li]
            rec["params"].append(pname)
            rec["numel"] += numel
            rec["shapes"].append(list(p.shape))
        return out


def _module_of(param_name: str) -> str:
    module, _, _ = param_name.rpartition(".")
    return module or ROOT_LAYER


def _layer_namer(config: MonitorConfig):
    if config.granularity == "parameter":
        return lambda name: name
    if config.group_depth is not None:
        depth = config.group_depth

        def by_depth(name: str) -> str:
            module = _module_of(name)
            if module == ROOT_LAYER:
                return module
            return ".".join(module.split(".")[:depth])

        return by_depth
    if config.group_prefixes is not None:
        prefixes = sorted(config.group_prefixes, key=len, reverse=True)

        def by_prefix(name: str) -> str:
            for prefix in prefixes:
                if name == prefix or name.startswith(prefix + "."):
                    return prefix
            return _module_of(name)

        return by_prefix
    if config.group_pattern is not None:
        pattern = re.compile(config.group_pattern)

        def by_pattern(name: str) -> str:
            m = pattern.match(name)
            if m is None:
                return _module_of(name)
            return (m.group(1) if pattern.groups else m.group(0)) or _module_of(name)

        return by_pattern
    return _module_of


@dataclass(frozen=True)
class GradPlan:
    """How to read the gradients present at a step, built once per presence pattern.

    Attributes:
        positions: indices (into the layer table's params) that have a gradient.
        groups: (device, dtype) groups over those positions.
        layer_index: layer of each present gradient, on the statistics device.
        layer_present: which layers have at least one gradient, on that device.
        layer_numel: elements of the present gradients per layer, fp32, on that device
            (local elements when gradients are sharded).
        sum_weight: per present gradient, 1 if its sums count on this rank, else 0
            (``None``: all count).
    """

    positions: tuple[int, ...]
    groups: list[TensorGroup]
    layer_index: Tensor
    layer_present: Tensor
    layer_numel: Tensor
    sum_weight: Tensor | None = None

    @classmethod
    def build(
        cls,
        table: LayerTable,
        positions: tuple[int, ...],
        grads: list[Tensor],
        device: torch.device,
        weights: tuple[float, ...] | None = None,
        numels: list[int] | None = None,
    ) -> GradPlan:
        """``grads``: the gradients at ``positions`` (their local shards when sharded);
        ``weights``: per parameter, whether its sums count on this rank (0 for a
        replicated gradient on all but one rank of a sharded group); ``numels``: the
        element count of each gradient where it is not ``g.numel()`` (a sparse
        gradient read through its values counts the parameter's elements)."""
        layer_ids = [table.param_layer[i] for i in positions]
        if numels is None:
            numels = [g.numel() for g in grads]
        numel = [0] * table.num_layers
        for i, k, li in zip(positions, numels, layer_ids):
            numel[li] += k * (1 if weights is None else int(weights[i]))
        return cls(
            positions=positions,
            groups=group_by_device_and_dtype(grads, device),
            layer_index=to_device(layer_ids, torch.long, device),
            layer_present=to_device([n > 0 for n in numel], torch.bool, device),
            layer_numel=to_device(numel, torch.float32, device),
            sum_weight=None if weights is None
            else to_device([weights[i] for i in positions], torch.float32, device),
        )

    def matches(self, grads: list[Tensor]) -> bool:
        """Whether the gradients still have the devices and dtypes the plan grouped."""
        return all(
            grads[i].dtype == g.dtype and grads[i].device == g.device
            for g in self.groups
            for i in (g.indices[0], g.indices[-1])
        )
