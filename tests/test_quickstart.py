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
