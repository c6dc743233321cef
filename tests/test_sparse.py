"""Sparse gradients (nn.Embedding(sparse=True), SparseAdam) are measured and clipped as
their dense equivalents are."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch

VOCAB, DIM, STEPS, SPIKE, BAD = 50, 6, 40, 30, 35


class Tagger(nn.Module):
    """An embedding table and a dense head (gradients of both layouts in one model)."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM, sparse=sparse)
        self.head = nn.Linear(DIM, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx))


def _backward(model: Tagger, step: int, *, spike: float = 0.0, nan: bool = False) -> None:
    """The same loss for every twin: repeated indices (duplicates the sparse gradient
    must sum), an optional spike on one embedding element, an optional NaN."""
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, VOCAB // 2, (16,), generator=g)
    idx[1] = idx[0]
    target = torch.randn(16, 3, generator=g)
    emb = model.embed(idx)
    loss = ((model.head(emb) - target) ** 2).mean()
    if spike:
        loss = loss + spike * emb[0, 0]
    if nan:
        loss = loss + math.nan * emb[2, 1]
    loss.backward()


def _dense(p: nn.Parameter) -> torch.Tensor:
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


CONFIGS = {
    "auto": {},
    "norm": {"clip": "norm", "max_norm": 0.05},
    "value": {"clip": "value", "clip_value": 0.004},
    "agc": {"clip": "agc", "clip_factor": 0.01},
    "zero": {"clip": "value", "clip_value": 0.004, "nonfinite": "zero"},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_sparse_gradients_match_the_dense_twin(config):
    twins = {sparse: Tagger(sparse) for sparse in (False, True)}
    # lr=0: the optimizer is there so non-finite steps are skipped; weights stay equal.
    monitors = {
        sparse: gradwatch.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), run_dir=False,
                                 warmup_steps=10, **config)
        for sparse, m in twins.items()
    }
    for step in range(STEPS):
        results = {}
        for sparse, model in twins.items():
            model.zero_grad(set_to_none=True)
            _backward(model, step, spike=50.0 if step == SPIKE else 0.0, nan=step == BAD)
            results[sparse] = monitors[sparse].step()
        dense, sparse = results[False], results[True]
        assert twins[True].embed.weight.grad.is_sparse
        assert sparse.action == dense.action, step
        assert sparse.nonfinite == dense.nonfinite == (step == BAD)
        if step == BAD and config.get("nonfinite") == "zero":
            assert not _dense(twins[True].embed.weight).any()
        if step != BAD:
            assert sparse.global_norm == pytest.approx(dense.global_norm, rel=1e-5)
            assert sparse.clipped_norm == pytest.approx(dense.clipped_norm, rel=1e-5)
        for p, q in zip(twins[True].parameters(), twins[False].parameters()):
            torch.testing.assert_close(_dense(p), q.grad, rtol=1e-5, atol=1e-8, equal_nan=True)
    actions = set(monitors[True].steps().action)
    assert actions & {"clip_norm", "clip_value"}, actions
    hist = {s: monitors[s].history() for s in (False, True)}
    for col in ("grad_norm", "max_abs", "concentration", "clipped_norm"):
        torch.testing.assert_close(
            torch.tensor(hist[True][col].to_numpy()), torch.tensor(hist[False][col].to_numpy()),
            rtol=1e-5, atol=1e-8, equal_nan=True,
        )
    assert monitors[True].steps().action[BAD] == "skip"


def test_sparse_adam_trains_through_attach_and_a_spike_is_clipped():
    model = Tagger(sparse=True)
    sparse_opt = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    head_opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        monitor = gradwatch.attach(model, sparse_opt, run_dir=False, warmup_steps=10)
    before = model.embed.weight.detach().clone()
    for step in range(STEPS):
        sparse_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        _backward(model, step, spike=1e4 if step == SPIKE else 0.0, nan=step == BAD)
        result = monitor.step()
        sparse_opt.step()
        if result.action != "skip":  # the head's optimizer follows the monitor's decision
            head_opt.step()
        assert model.embed.weight.grad.is_sparse
    steps = monitor.steps()
    assert steps.action[SPIKE] != "none"
    assert steps.clipped_norm[SPIKE] < steps.global_norm[SPIKE] / 10
    assert steps.action[BAD] == "skip" and steps.nonfinite[BAD]
    assert sum(steps.nonfinite) == 1
    assert torch.isfinite(model.embed.weight).all() and torch.isfinite(model.head.weight).all()
    assert not torch.equal(model.embed.weight, before)
