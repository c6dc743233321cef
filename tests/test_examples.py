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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
MULTI_PROCESS = [
    ("lightning_fit.py", [sys.executable], ["--steps", "40", "--devices", "2"], "lightning"),
    ("hf_trainer.py", TORCHRUN, ["--steps", "30"], "transformers"),
    ("accelerate_loop.py", TORCHRUN, ["--epochs", "1"], "accelerate"),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("script", "launch", "extra", "needs"), MULTI_PROCESS,
                         ids=[e[0] for e in MULTI_PROCESS])
def test_integration_example_with_two_processes_reports_from_the_main_one(
        tmp_path, script, launch, extra, needs):
    import re

    pytest.importorskip(needs)
    out = tmp_path / "out"
    proc = subprocess.run(
        [*launch, os.path.join(ROOT, "examples", script), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two processes trained and decided alike ...
    summaries = dict(re.findall(r"process (\d): (.*?event\(s\))", proc.stdout))
    assert sorted(summaries) == ["0", "1"] and summaries["0"] == summaries["1"]
    # ... and one of them recorded, logged to W&B and wrote the report.
    assert proc.stdout.count("report:") == 1
    assert len(list(tmp_path.rglob("meta.json"))) == 1
    assert (out / "report.html").is_file()
    wandb_runs = list(tmp_path.rglob("offline-run-*"))
    assert len(wandb_runs) == (0 if script == "accelerate_loop.py" else 1)
