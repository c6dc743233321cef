"""The benchmark suite runs (timings themselves are not asserted: see benchmarks/)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import grad_pass  # noqa: E402
import models  # noqa: E402
import step_bench  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["mlp", "gpt", "many_small"])
def test_reference_models_have_the_advertised_size(name):
    model, (x, y), loss_fn = models.make(name, torch.device("cpu"))
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    expected = {"mlp": (4e6, 6e6, 16, 16), "gpt": (6e6, 8e6, 45, 60),
                "many_small": (1e5, 1e6, 200, 400)}[name]
    assert expected[0] <= numel <= expected[1] and expected[2] <= len(params) <= expected[3]
    loss_fn(model(x), y).backward()


def test_every_variant_trains_and_the_table_has_every_ratio(tmp_path, monkeypatch):
    pytest.importorskip("zclip")
    pytest.importorskip("autoclip")
    pytest.importorskip("wandb")
    monkeypatch.setenv("GRADWATCH_BENCH_DIR", str(tmp_path))
    res = step_bench.bench("many_small", step_bench.VARIANTS, torch.device("cpu"), rounds=1,
                           steps=1, warmup=2)
    import wandb

    wandb.finish()
    assert list(res) == step_bench.VARIANTS
    for row in res.values():
        assert row["median_ms"] > 0 and {"vs_bare", "vs_clip", "vs_zclip"} <= set(row)


def test_isolated_pass_sweep_reports_floor_and_state():
    rows = grad_pass.sweep([(20, 20_000)], torch.device("cpu"), bw=1e10, reps=2)
    (row,) = rows
    assert row["tensors"] == 20 and row["params"] == 20_000
    assert row["floor_ms"] == pytest.approx(1e3 * 4 * 20_000 / 1e10)
    for key in ("clip_grad_norm_ms", "none_ms", "norm_ms", "auto_ms", "state_kib"):
        assert row[key] > 0


def test_report_scale_records_and_times_report_and_summary(tmp_path, capsys):
    import report_scale

    assert report_scale.main(["--steps", "300", "--layers", "12", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recorded 300 steps x 12 layers" in out
    lines = [line for line in out.splitlines() if line.startswith("gradwatch ")]
    assert [line.split()[1] for line in lines] == ["report", "summary"]
    assert all(line.endswith("exit 0") for line in lines)
    html = (tmp_path / "r.html").read_text()
    assert 'id="heatmap"' in html and "nonfinite" in html  # the planted NaN
