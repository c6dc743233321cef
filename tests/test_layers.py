"""What a layer is: modules owning parameters by default, or parameters, or groups."""

from __future__ import annotations

import pytest
import torch
from helpers import GradStream, TinyNet
from torch import nn

import gradwatch


def _names(model, **options):
    return list(gradwatch.attach(model, **options).layers.names)


def test_default_layers_are_modules_that_own_parameters(tiny_net):
    assert _names(tiny_net) == [
        "embed", "blocks.0.attn", "blocks.0.mlp", "blocks.0.norm",
        "blocks.1.attn", "blocks.1.mlp", "blocks.1.norm", "head",
    ]


def test_parameter_granularity(tiny_net):
    names = _names(tiny_net, granularity="parameter")
    assert names == [n for n, _ in tiny_net.named_parameters()]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"group_depth": 1}, ["embed", "blocks", "head"]),
        ({"group_depth": 2}, ["embed", "blocks.0", "blocks.1", "head"]),
        ({"group_prefixes": ("blocks",)}, ["embed", "blocks", "head"]),
        ({"group_prefixes": ["blocks.1", "blocks"]}, ["embed", "blocks", "blocks.1", "head"]),
        ({"group_pattern": r"blocks\.\d+"}, ["embed", "blocks.0", "blocks.1", "head"]),
        ({"group_pattern": r"blocks\.\d+\.(\w+)"}, ["embed", "attn", "mlp", "norm", "head"]),
    ],
)
def test_grouping(tiny_net, options, expected):
    assert _names(tiny_net, **options) == expected


def test_grouped_layer_norm_combines_its_parameters(tiny_net):
    monitor = gradwatch.attach(tiny_net, clip="none", group_depth=1)
    GradStream(tiny_net).write()
    monitor.step()
    blocks = [p.grad for n, p in tiny_net.named_parameters() if n.startswith("blocks.")]
    expected = torch.nn.utils.get_total_norm(blocks).item()
    row = monitor.history().query("layer == 'blocks'")
    assert row.grad_norm.item() == pytest.approx(expected, rel=1e-5)


class WithRootParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.tied = self.used  # shared module: counted once

    def forward(self, x):
        return self.used(self.frozen(x) * self.scale)


def test_frozen_unused_tied_and_root_parameters():
    model = WithRootParam()
    monitor = gradwatch.attach(model, clip="auto")
    assert list(monitor.layers.names) == ["(root)", "frozen", "used", "unused"]
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 3)).sum().backward()
        result = monitor.step()
    assert not result.nonfinite
    hist = monitor.history()
    assert set(hist.layer) == {"(root)", "used"}  # no rows for layers without gradients
    # Unfreezing later is picked up.
    model.frozen.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 3)).sum().backward()
    monitor.step()
    assert "frozen" in set(monitor.history().query("step == 3").layer)


def test_layer_without_gradient_at_some_steps_keeps_its_statistics():
    torch.manual_seed(0)
    model = TinyNet()
    monitor = gradwatch.attach(model, clip="none")
    stream = GradStream(model)
    for t in range(60):
        stream.write()
        if t % 2:
            model.head.weight.grad = None
            model.head.bias.grad = None
        monitor.step()
    hist = monitor.history()
    head = hist[hist.layer == "head"]
    assert sorted(head.step) == list(range(0, 60, 2))
    assert head.z.abs().max() < 4
