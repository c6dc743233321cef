"""The golden run: fixed gradient streams in, ``steps()`` and ``events()`` out, bit for bit.

Every clip mode runs on the same 320-step gradient stream (spikes, outliers, a slow
blow-up, absent and all-zero layers, NaN and Inf) with each way of stepping: a fused
optimizer (the clipping coefficient rides in its ``grad_scale``), a non-fused one, a
``GradScaler``, and no optimizer; a few more configurations and the accelerator path
(no host-side branches) run with the non-fused optimizer. What the monitor recorded
is compared with the recording committed under ``tests/golden/``: every float by its
bits, every string exactly. A per-layer table is compared through its hash.

The gradients are integers times a power of two, small enough that every sum of
squares inside a tensor is exact in fp32: a tensor's norm does not depend on the
order in which a CPU's vector units add its elements, so the recording holds on
any x86 or Arm CPU.

A change that alters decisions on purpose records again, in a commit that says what
changed and why::

    python tests/test_golden.py --record
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch

GOLDEN = Path(__file__).parent / "golden"
STEPS = 320
UNIT = 2.0**-10  # gradient values are integers times this

# name: (config overrides, how the optimizer steps)
MODES = {
    "auto": {},
    "norm": {"clip": "norm", "max_norm": 0.4},
    "value": {"clip": "value", "clip_value": 0.1},
    "agc": {"clip": "agc", "clip_factor": 0.05},
    "zscore": {"clip": "zscore"},
    "percentile": {"clip": "percentile", "percentile": 90.0, "window": 64},
    "none": {"clip": "none"},
}
STEPPERS = ("fused", "plain", "scaler", "no_optimizer")
EXTRA = {  # with the plain optimizer
    "auto_ceiling": {"max_norm": 0.5},
    "auto_skip": {"skip_threshold": 8.0},
    "auto_no_ratio": {"max_ratio": None},
    "auto_no_crossing": {"crossing_rate": None},
    "zscore_ceiling": {"clip": "zscore", "max_norm": 0.5},
    "value_zero": {"clip": "value", "clip_value": 0.1, "nonfinite": "zero"},
    "agc_loose": {"clip": "agc", "clip_factor": 1.0, "agc_eps": 0.1},
}


def runs() -> dict[str, tuple[dict, str, bool]]:
    """run name -> (config overrides, stepper, host branches)."""
    out = {}
    for mode, cfg in MODES.items():
        for stepper in STEPPERS:
            out[f"{mode}/{stepper}"] = (cfg, stepper, True)
        out[f"{mode}/plain/accelerator_path"] = (cfg, "plain", False)
    for name, cfg in EXTRA.items():
        out[f"{name}/plain"] = (cfg, "plain", True)
    return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.rnn = nn.GRUCell(8, 4)
        self.head = nn.Linear(4, 3)


def stream() -> list[dict[str, torch.Tensor | None]]:
    """The gradients of every step, as integers times ``UNIT``.

    Per step and module a log-normal amplitude around 16 (integers up to a few
    hundred even in the slow blow-up), then the faults: powers of two scale whole
    layers (exact), outliers set single components.
    """
    torch.manual_seed(0)
    shapes = {n: p.shape for n, p in Net().named_parameters()}
    g = torch.Generator().manual_seed(1234)
    out = []
    for step in range(STEPS):
        growth = 1.07 ** min(max(step - 250, 0), 30) if step < 285 else 1.0
        grads: dict[str, torch.Tensor | None] = {}
        amp: dict[str, float] = {}
        for name, shape in shapes.items():
            module = name.partition(".")[0]
            if module not in amp:
                amp[module] = 16.0 * math.exp(0.2 * torch.randn((), generator=g).item())
            ints = (torch.randn(shape, generator=g) * round(amp[module] * growth)).round()
            grads[name] = ints
        if step == 60:  # one outlier component
            grads["mlp.weight"].view(-1)[5] = 1000.0
        if step == 100:  # one layer's gradient 64 times its size
            grads["attn.weight"] *= 64
            grads["attn.bias"] *= 64
        if step == 140:  # every layer 16 times
            for t in grads.values():
                t *= 16
        if 120 <= step < 125:  # a layer without gradients
            grads["norm.weight"] = grads["norm.bias"] = None
        if step == 180:
            grads["head.weight"].view(-1)[3] = math.nan
        if step == 210:  # an all-zero layer
            grads["embed.weight"].zero_()
            grads["embed.bias"].zero_()
        if step == 230:
            grads["rnn.weight_hh"].view(-1)[7] = math.inf
        if step == 300:  # outliers in two layers at once
            grads["attn.weight"].view(-1)[0] = -900.0
            grads["rnn.weight_ih"].view(-1)[2] = 800.0
        out.append({n: None if t is None else t * UNIT for n, t in grads.items()})
    return out


def run(overrides: dict, stepper: str, host_branches: bool, grads_per_step):
    """Train ``Net`` on the stream; return the monitor's steps, events and history."""
    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    optimizer = scaler = None
    if stepper == "fused":
        optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    elif stepper == "plain":
        optimizer = torch.optim.Adam(params, lr=1e-3, foreach=False)
    elif stepper == "scaler":
        optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN left as is without an optimizer, etc.
        monitor = gradwatch.attach(model, optimizer, scaler=scaler, run_dir=False,
                                   **overrides)
        monitor._host_branches = host_branches  # False: the path accelerators take
        named = dict(model.named_parameters())
        for grads in grads_per_step:
            scale = 1.0
            if scaler is not None:
                scaler.scale(torch.ones(()))  # as a backward of a scaled loss would
                scale = scaler.get_scale()
            for name, g in grads.items():
                named[name].grad = None if g is None else g * scale
            if scaler is not None:
                scaler.unscale_(optimizer)
            monitor.step()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            elif optimizer is not None:
                optimizer.step()
        steps, events, layers = monitor.steps(), monitor.events(), monitor.history()
        monitor.detach()
    return steps, events, layers


def _canonical(frame):
    """Columns as comparable arrays: floats by their bits (one NaN), the rest as text."""
    out = {}
    for col in frame.columns:
        values = frame[col].to_numpy()
        if values.dtype.kind == "f":
            v = values.astype(np.float64)
            v = np.where(np.isnan(v), np.nan, v)
            out[col] = v.view(np.uint64)
        elif values.dtype.kind in "biu":
            out[col] = values.astype(np.int64)
        else:
            out[col] = values.astype(str)
    return out


def layers_digest(layers) -> str:
    h = hashlib.sha256()
    for col, values in _canonical(layers).items():
        h.update(col.encode())
        h.update(values.tobytes() if values.dtype != object and values.dtype.kind != "U"
                 else "\x00".join(values).encode())
    return h.hexdigest()


def collect():
    """Every run's tables, stacked with a ``run`` column; the history as digests."""
    import pandas as pd

    grads = stream()
    steps, events, digests = [], [], []
    for name, (cfg, stepper, host) in runs().items():
        s, e, lay = run(cfg, stepper, host, grads)
        s = s.assign(action=s["action"].astype(str))
        steps.append(s.assign(run=name))
        events.append(e.assign(run=name))
        # The update ratio measures the weights, whose fp32 sums depend on the order
        # a CPU's vector units add them: not a decision, and tested on its own
        # (test_update_ratio.py); left out of the digest.
        lay = lay.drop(columns=["update_ratio"], errors="ignore")
        digests.append({"run": name, "layers_sha256": layers_digest(lay)})
    return (pd.concat(steps, ignore_index=True), pd.concat(events, ignore_index=True),
            pd.DataFrame(digests))


def record() -> None:
    GOLDEN.mkdir(exist_ok=True)
    steps, events, digests = collect()
    steps.to_parquet(GOLDEN / "steps.parquet", index=False)
    events.to_parquet(GOLDEN / "events.parquet", index=False)
    digests.to_csv(GOLDEN / "layers_sha256.csv", index=False)
    print(f"recorded {steps['run'].nunique()} runs, {len(steps)} steps, {len(events)} events")


def _assert_same(table: str, got, want) -> None:
    # Columns added after the recording (the training context: loss, lr) are not in it;
    # every recorded column must still be there, bit for bit.
    from gradwatch.rows import LATER_STEP_FIELDS

    newer = [c for c in got.columns if c not in want.columns]
    assert set(newer) <= set(LATER_STEP_FIELDS), f"{table}: unrecorded columns {newer}"
    got = got[[c for c in got.columns if c not in newer]]
    assert list(got.columns) == list(want.columns), f"{table}: columns differ"
    assert len(got) == len(want), f"{table}: {len(got)} rows, the recording has {len(want)}"
    g, w = _canonical(got), _canonical(want)
    for col in want.columns:
        bad = np.flatnonzero(g[col] != w[col])
        if len(bad):
            i = bad[0]
            raise AssertionError(
                f"{table}.{col} differs in {len(bad)} row(s); first: run "
                f"{want['run'].iloc[i]!r} step {want['step'].iloc[i]}: got "
                f"{got[col].iloc[i]!r}, recorded {want[col].iloc[i]!r}"
            )


@pytest.mark.slow
def test_golden_run_is_unchanged():
    import pandas as pd

    steps, events, digests = collect()
    _assert_same("steps", steps, pd.read_parquet(GOLDEN / "steps.parquet"))
    _assert_same("events", events, pd.read_parquet(GOLDEN / "events.parquet"))
    want = pd.read_csv(GOLDEN / "layers_sha256.csv")
    changed = [r for r, a, b in zip(want["run"], digests["layers_sha256"],
                                    want["layers_sha256"]) if a != b]
    assert list(digests["run"]) == list(want["run"])
    assert not changed, f"history() differs for {changed}"


def test_stream_norms_are_exact():
    """The premise of a CPU-independent recording: every partial sum of squares of a
    tensor is exact in fp32 (integers, after a common power of two, whose squares sum
    below 2**24), so no summation order changes a norm."""
    for grads in stream():
        for t in grads.values():
            if t is None or not torch.isfinite(t).all() or not t.any():
                continue
            ints = (t.double() / UNIT).abs()
            assert torch.equal(ints, ints.round())
            nonzero = ints[ints > 0].long()
            shift = 0
            while bool((nonzero % (2 ** (shift + 1)) == 0).all()):
                shift += 1
            assert (nonzero.double() / 2**shift).square().sum() < 2**24


def test_golden_covers_every_decision():
    """The recording holds every action and event kind, so it can catch a change to any."""
    import pandas as pd

    steps = pd.read_parquet(GOLDEN / "steps.parquet")
    events = pd.read_parquet(GOLDEN / "events.parquet")
    assert set(steps["action"]) == {"none", "clip_norm", "clip_value", "skip"}
    assert set(events["kind"]) == {"explosion", "drift", "nonfinite", "amp_overflow"}
    assert set(steps["run"].str.split("/").str[0]) >= set(MODES)
    assert steps.groupby("run").size().eq(STEPS).all()


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
