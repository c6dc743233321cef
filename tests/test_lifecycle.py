"""A monitor's life in its process: forked children never flush or close its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gradwatch.run_record import load_run

TESTS = os.path.dirname(os.path.abspath(__file__))

# The parent trains 25 steps (parts of 10 on disk, 5 steps pending), forks a child that
# ends through the interpreter's normal exit (its atexit hooks run), waits for it, looks
# at its own record, then trains 15 more steps and detaches.
FORKED_RUN = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)  # no OpenMP pool across the fork
    import gradwatch
    from helpers import GradStream, mlp

    def look():
        with open(os.path.join({run!r}, "meta.json")) as f:
            meta = json.load(f)
        return {{"status": meta["status"], "last_step": meta["last_step"],
                 "parts": sorted(os.listdir(os.path.join({run!r}, "steps")))}}

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir={run!r}, log_every=5, flush_every=10)
    stream = GradStream(model)

    def train(steps):
        for _ in range(steps):
            stream.write()
            monitor.step()
            opt.step()

    train(25)
    before = look()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        {child}
    _, status = os.waitpid(pid, 0)
    after = look()
    train(15)
    monitor.detach()
    print(json.dumps({{"child_exit": os.waitstatus_to_exitcode(status),
                      "before": before, "after": after}}))
    """
)

CHILD_ENDS = {
    "sys.exit": "sys.exit(0)",
    "uncaught exception": "raise RuntimeError('the child fails')",
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.parametrize("end", list(CHILD_ENDS))
def test_a_forked_child_that_exits_leaves_the_parents_record_alone(tmp_path, end):
    run = tmp_path / "run"
    script = FORKED_RUN.format(tests=TESTS, run=str(run), child=CHILD_ENDS[end])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["child_exit"] == (0 if end == "sys.exit" else 1)
    # The child neither flushed the parent's pending steps nor closed its record.
    assert seen["before"]["status"] == "running"
    assert seen["after"] == seen["before"], seen
    # The parent then went on and closed its record itself: whole and finished.
    record = load_run(run)
    assert list(record.steps.step) == list(range(40))
    assert record.meta["status"] == "finished"
    assert "error" not in record.meta
    assert len(record.meta["sessions"]) == 1
