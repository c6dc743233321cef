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


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("wrap", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_ddp_example_under_torchrun(tmp_path, wrap):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         os.path.join(ROOT, "examples", "ddp_train.py"), "--epochs", "2", "--out", str(out),
         *wrap],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Both ranks made the same decisions; rank 0 alone wrote the record and report.
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2
    assert lines[0].replace("rank 0/2", "") == lines[1].replace("rank 1/2", "")
    assert (out / "report.html").is_file() and (out / "run" / "meta.json").is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
