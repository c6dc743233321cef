"""The public reporter contract: what a reporter of one's own receives, and the run
totals and metrics that every built-in reporter shares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import GradStream, mlp

import gradwatch
from gradwatch.config import CLIP_MODES, NORM_MODES
from gradwatch.policies import POLICIES
from gradwatch.reporters import Chunk, ProbeInput, Reporter, RunInfo
from gradwatch.run_record import load_run
from gradwatch.rows import ACTIONS
from gradwatch.totals import RunTotals


class Recording(Reporter):
    """A reporter of one's own, with every optional hook."""

    probe_every = 4

    def __init__(self) -> None:
        self.run: RunInfo | None = None
        self.chunks: list[Chunk] = []
        self.closed: list[str | None] = []
        self.resumed_at: list[int] = []
        self.probed: list[ProbeInput] = []

    def start(self, run: RunInfo) -> None:
        self.run = run

    def report(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    def close(self, error: str | None) -> None:
        self.closed.append(error)

    def resumed(self, step: int) -> None:
        self.resumed_at.append(step)

    def probe(self, inputs: ProbeInput) -> dict[str, torch.Tensor]:
        self.probed.append(inputs)
        return {"max": inputs.layer_max_abs.clone(), "window": inputs.recent_log_norms[:, :3]}


def _spiky_run(monitor, model, steps: int, spike_at: int = 40) -> None:
    stream = GradStream(model)
    for i in range(steps):
        stream.write(diffuse={"2": 50.0} if i == spike_at else None,
                     spike={"0.weight": float("nan")} if i == spike_at + 5 else None)
        monitor.step()


def test_a_reporter_of_ones_own_gets_public_values_only():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recording()
    monitor = gradwatch.attach(model, opt, run_dir=False, reporters=[rec], log_every=10)
    assert rec.run.layer_names == ("0", "2", "4")
    assert rec.run.first_step == 0 and rec.run.config.clip == "auto"
    assert [r["numel"] for r in rec.run.layers] == [16 * 32 + 32, 32 * 32 + 32, 32 * 4 + 4]
    _spiky_run(monitor, model, 60)
    state = monitor.state_dict()
    monitor.load_state_dict(state)
    assert rec.resumed_at == [60]
    monitor.detach()
    assert rec.closed == [None]

    assert [list(c.steps) for c in rec.chunks] == [list(range(k, k + 10)) for k in range(0, 60, 10)]
    steps = monitor.steps()
    metrics = [m for c in rec.chunks for m in c.metrics()]
    assert [m["global_norm"] for m in metrics] == pytest.approx(
        list(steps.global_norm), rel=1e-6, nan_ok=True)
    assert [m["action"] for m in metrics] == list(steps.action.astype(str))
    assert metrics[40]["clipped"] == 1 and metrics[45]["skipped"] == 1
    assert metrics[45]["nonfinite"] == 1 and math.isnan(metrics[45]["global_norm"])
    assert "flagged_z/2" in metrics[40] and metrics[40]["explosion"] == 1
    assert set(k for k in metrics[0] if k.startswith("grad_norm/")) == {
        "grad_norm/0", "grad_norm/2", "grad_norm/4"}
    assert not any(k.startswith("grad_norm/") for k in rec.chunks[0].metrics(layer_norms=False)[0])
    events = [e for c in rec.chunks for e in c.events]
    assert [(e["step"], e["kind"]) for e in events] == list(
        zip(monitor.events().step, monitor.events().kind))

    # Probes: every 4th step, on the pre-clip gradients, back in the chunk's extras.
    assert len(rec.probed) == 15
    assert rec.probed[0].grad_layers == (0, 0, 1, 1, 2, 2)
    extras = {s: v for c in rec.chunks for s, v in c.extras.items()}
    assert sorted(extras) == list(range(0, 60, 4))
    history = monitor.history()
    at_40 = history[history.step == 40].set_index("layer")["max_abs"]
    assert extras[40]["max"] == pytest.approx(at_40.loc[["0", "2", "4"]].to_numpy(), rel=1e-6)
    assert extras[40]["window"].shape == (3, 3)


def test_a_reporter_without_optional_hooks_is_enough():
    class Minimal:
        def __init__(self):
            self.steps = 0

        def start(self, run):
            pass

        def report(self, chunk):
            self.steps += len(chunk.steps)

        def close(self, error):
            pass

    model = mlp()
    minimal = Minimal()
    monitor = gradwatch.attach(model, run_dir=False, reporters=[minimal], log_every=5,
                               nonfinite="zero")
    _spiky_run(monitor, model, 20, spike_at=10)
    monitor.load_state_dict(monitor.state_dict())  # no resumed(): nothing to call
    monitor.detach()
    assert minimal.steps == 20 and monitor.run_dir is None


def test_bad_probe_every_is_refused_naming_the_reporter():
    class Bad(Recording):
        probe_every = 0

    with pytest.raises(ValueError, match=r"Bad.probe_every=0 must be an integer >= 1 or None"):
        gradwatch.attach(mlp(), run_dir=False, reporters=[Bad()])


def test_run_totals_as_the_run_goes_equal_the_totals_of_its_record(tmp_path):
    """One place computes the totals: chunk by chunk (the W&B summary) and from the
    recorded tables (the report) they agree."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recording()
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", reporters=[rec],
                               log_every=10)
    _spiky_run(monitor, model, 80)
    monitor.detach()
    live = RunTotals()
    for c in rec.chunks:
        live.add_rows(c.layout, c.layer_names, c.rows, c.events)
    run = load_run(tmp_path / "run")
    recorded = RunTotals.from_tables(run.steps, run.layers, run.events)
    assert live == recorded
    assert live.steps == 80 and live.actions["skip"] == 1 and live.events["nonfinite"] == 1
    assert live.worst_layer == "2" and live.worst_z > 4
    assert live.max_global_norm == pytest.approx(np.nanmax(run.steps.global_norm), rel=1e-6)
    assert live.clip_rate == pytest.approx(
        run.steps.action.isin(["clip_norm", "clip_value"]).mean())
    assert set(live.actions) == set(ACTIONS)


def test_every_mode_has_one_policy_and_norm_modes_are_the_scaling_ones():
    assert set(POLICIES) == set(CLIP_MODES)
    assert NORM_MODES <= set(CLIP_MODES)
    for mode, cls in POLICIES.items():
        cfg = gradwatch.MonitorConfig(clip=mode, max_norm=1.0 if mode == "norm" else None,
                                      clip_value=1.0 if mode == "value" else None)
        assert cls(cfg).scales_by_norm == (mode in NORM_MODES)
