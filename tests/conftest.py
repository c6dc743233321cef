"""Makes ``tests/helpers.py`` importable (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_net():
    from helpers import TinyNet

    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """attach() records runs under ./gradwatch_runs by default: keep that out of the tree."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_wandb_run_left_over():
    """A W&B run a test left open would be the active run (``wandb.run``) of the next
    test's reporter, which logs into it: finish it, so every test starts without one."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
