"""The main job: the quickstart trains, records, logs to an offline W&B run and writes
a report, and the CLI rebuilds that report from the run directory."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_records_and_reports(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--seeds", "2",
         "--steps", "300", "--out", str(tmp_path / "qs")],
        capture_output=True, text=True, timeout=600, check=True, cwd=tmp_path, env=env,
    )
    text = out.stdout
    assert "no clipping" in text and "gradwatch auto" in text and "mean accuracy" in text
    assert "Events of the gradwatch run with seed" in text
    report = tmp_path / "qs" / "report.html"
    html = report.read_text()
    assert "Advice" in html and "Global gradient norm" in html
    runs = sorted(p.name for p in (tmp_path / "qs" / "runs").iterdir())
    assert runs == ["seed0", "seed1"]
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))) == 2

    rebuilt = tmp_path / "again.html"
    seed_dir = next(line.split("gradwatch report ")[1].split(" -o")[0]
                    for line in text.splitlines() if "gradwatch report " in line)
    subprocess.run([sys.executable, "-m", "gradwatch", "report", seed_dir, "-o", str(rebuilt)],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    assert rebuilt.read_text() == html


@pytest.mark.slow
def test_demo_catches_the_injected_faults_logs_and_reports(tmp_path):
    from wandb_reader import find_run_file, wait_for_exit

    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--steps", "250", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = {line.split()[2]: line for line in text.splitlines()
             if line.startswith("  step ") and ("caught at step" in line or "MISSED" in line)}
    # The sudden faults are caught at the step they happen, with the fitting action.
    assert "(+0)" in lines["loss_spike"] and "clip_norm" in lines["loss_spike"]
    assert "(+0)" in lines["outlier"] and "clip_value" in lines["outlier"]
    assert "(+0)" in lines["nan"] and "nonfinite" in lines["nan"] and "skip" in lines["nan"]
    assert "no clipping     DIVERGED" in text  # the NaN reaches the plain model
    assert "gradwatch auto  trained" in text
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Advice" in html and "nonfinite" in html
    # The loss rides along with every step: the report draws it below the norm.
    from gradwatch.report import load_run

    steps = load_run(tmp_path / "d" / "run").steps
    assert steps.loss.isna().sum() == 1  # the NaN input's step; every other is recorded
    assert steps.lr.notna().all()
    assert 'id="loss"' in html
    # The offline W&B run holds the monitor's metrics and the NaN's alert.
    run = wait_for_exit(find_run_file(str(tmp_path / "d" / "wandb")))
    assert any("gradwatch/global_norm" in row for row in run.history)
    assert any("NaN/Inf gradients" in a["title"] for a in run.alerts)

    # Run again into the same folder, as a newcomer does: the demo replaces its record.
    again = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--steps", "250", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert again.returncode == 0, again.stderr
    assert "replacing the record of the previous demo" in again.stdout
    assert load_run(tmp_path / "d" / "run").steps.step.max() == steps.step.max()


def test_demo_refuses_too_few_steps(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--steps", "50",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "steps=50 is too short" in out.stderr
