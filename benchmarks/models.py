"""Reference models for the benchmarks, built from code (no download).

* ``mlp``: ~5M parameters in 16 tensors (8 linear layers).
* ``gpt``: a GPT-style decoder, ~7M parameters in ~50 tensors.
* ``many_small``: 280 small tensors (70 blocks of linear + LayerNorm), where the cost
  per tensor, not per byte, dominates.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Sequential):
    def __init__(self, width: int = 832, depth: int = 8, inputs: int = 784, classes: int = 10):
        widths = [inputs] + [width] * (depth - 1) + [classes]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers[:-1])


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 8192, d: int = 256, layers: int = 4, heads: int = 4,
                 context: int = 128) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 / math.sqrt(1 if p.shape[0] != vocab else 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ManySmall(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 70) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def make(name: str, device: torch.device, seed: int = 0):
    """``(model, batch, loss_fn)`` for a reference model; the batch is fixed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = MLP()
        x, y = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
        loss_fn = nn.functional.cross_entropy
    elif name == "gpt":
        model = GPT()
        tokens = torch.randint(0, 8192, (4, 65), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def loss_fn(logits, target):
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               target.reshape(-1))
    elif name == "many_small":
        model = ManySmall()
        x, y = torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g)
        loss_fn = nn.functional.cross_entropy
    else:
        raise ValueError(f"unknown model {name!r}: mlp, gpt or many_small")
    return model.to(device), (x.to(device), y.to(device)), loss_fn


def describe(model: nn.Module) -> str:
    params = list(model.parameters())
    return f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors"
