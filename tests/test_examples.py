"""The integration examples run end to end (shortened) and write their reports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLES = [
    ("lightning_fit.py", ["--steps", "60"], "lightning"),
    ("hf_trainer.py", ["--steps", "70"], "transformers"),
    ("accelerate_loop.py", ["--epochs", "1"], "accelerate"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "extra", "needs"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(tmp_path, script, extra, needs):
    pytest.importorskip(needs)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout
    assert (out / "report.html").is_file()
    assert (out / "run" / "meta.json").is_file()
