"""The efficacy experiments run, and their scoring counts what it says."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                                "efficacy"))

import faults  # noqa: E402

pytestmark = pytest.mark.slow


def test_score_counts_hits_latency_and_false_alarms():
    s = faults.score("loss_spike", {200, 202, 352, 499, 600})
    # 200 (latency 0) and 350 (352: latency 2) are hit; 500 is not (499 is before it);
    # 202 lies in 200's window; 499 and 600 are false alarms.
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["latency"] == [0, 2]
    assert s["false_alarms"] == 2
    blowup = faults.score("lr_blowup", {470})
    assert blowup["recall"] == 1.0 and blowup["latency"] == [20]


def test_a_nan_fault_is_skipped_by_gradwatch_and_kills_plain_training(monkeypatch):
    monkeypatch.setattr(faults, "STEPS", 230)
    data = faults.load()
    watched = faults.run(data, ("gradwatch", {}), 0, "nan")
    plain = faults.run(data, ("none", {}), 0, "nan")
    assert 200 in watched["flagged"] and watched["accuracy"] > 0.8
    assert plain["accuracy"] < 0.2  # the NaN reached the weights
