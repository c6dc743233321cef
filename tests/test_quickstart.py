"""The main job: the quickstart example runs end to end and reports both outcomes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_and_reports():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--seeds", "2",
         "--steps", "300"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    text = out.stdout
    assert "no clipping" in text and "gradwatch auto" in text
    assert "mean accuracy" in text
    assert "Events of the gradwatch run with seed" in text
