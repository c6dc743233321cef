"""``gradwatch compare RUN_A RUN_B``: two runs side by side in one self-contained page."""

from __future__ import annotations

import re
import subprocess
import sys

import torch
from helpers import GradStream, mlp

import gradwatch


def _record(run_dir, lr, steps=60, spike=None):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = gradwatch.attach(model, opt, run_dir=run_dir, log_every=10)
    stream = GradStream(model)
    for t in range(steps):
        stream.write(diffuse={"2": 50.0} if t == spike else None)
        monitor.step(loss=torch.tensor(2.0 / (t + 1)))
        opt.step()
    monitor.detach()
    return monitor


def test_compare_writes_both_runs_side_by_side(tmp_path):
    a = _record(tmp_path / "baseline", 0.01)
    b = _record(tmp_path / "with-spike", 0.01, steps=80, spike=40)
    out = tmp_path / "cmp.html"
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "compare",
                           str(tmp_path / "baseline"), str(tmp_path / "with-spike"),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    page = out.read_text()
    assert "<title>gradwatch compare: baseline vs with-spike</title>" in page
    assert "<script" not in page and "http" not in page
    cells = dict(re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", page))
    assert re.findall(r"<td>(\d+)</td>", cells["steps"]) == ["60", "80"]
    events = [len(a.events().query("kind == 'explosion'")),
              len(b.events().query("kind == 'explosion'"))]
    assert re.findall(r"<td>(\d+)</td>", cells["explosion events"]) == list(map(str, events))
    assert events[1] >= 1
    for section in ("global-norm", "loss", "clip-rate"):
        assert f'id="{section}"' in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3


def test_compare_of_a_missing_run_is_one_line(tmp_path):
    _record(tmp_path / "a", 0.01, steps=30)
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "compare", str(tmp_path / "a"),
                           str(tmp_path / "nope"), "-o", str(tmp_path / "c.html")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (f"gradwatch compare: error: {tmp_path / 'nope'}: no such run "
                           "directory (--debug shows the traceback)\n")
    assert not (tmp_path / "c.html").exists()
