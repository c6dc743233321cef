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
    assert s["false_alarms"] == 2 and s["true_flags"] == 3
    blowup = faults.score("lr_blowup", {470})
    assert blowup["recall"] == 1.0 and blowup["latency"] == [20]
    # Precision pools every stream's flags: 3 + 1 inside a window, 2 outside.
    entry = {k: [] for k in faults.KINDS}
    entry["loss_spike"].append({"score": s})
    entry["lr_blowup"].append({"score": blowup})
    assert faults.precision(entry) == pytest.approx(4 / 6)


def test_the_blow_up_rows_time_the_flag_from_the_norm_s_own_rise():
    start = faults.KINDS["lr_blowup"][0][0]
    pre = [1.0] * start + [1.0] * 12 + [3.0] * 40 + [float("inf")] * 5
    assert faults.rise_onset(pre, start) == 10  # its 5-step median: 3 of 5 steps raised
    assert faults.rise_onset([1.0] * (start + 60), start) is None
    run = {"pre": pre, "score": faults.score("lr_blowup", {start + 15})}
    table = {"m": {"lr_blowup": [run, run]}}
    assert faults.blowup_rows(table) == ["| m | 10.0 (2) | 15.0 | 5.0 |"]


def test_action_cell_counts_the_actions_at_the_injected_steps():
    actions = ["none"] * faults.STEPS
    actions[200], actions[350] = "skip", "skip"
    assert faults.action_cell("nan", [{"actions": actions}]) == "skip 2, none 1"
    start = faults.KINDS["lr_blowup"][0][0]
    actions[start:start + 10] = ["clip_norm"] * 10
    assert faults.action_cell("lr_blowup", [{"actions": actions}]) == (
        f"clipped {100 * 10 / faults.BLOWUP_LEN:.0f} %")


def test_a_nan_fault_is_skipped_by_gradwatch_and_kills_plain_training(monkeypatch):
    monkeypatch.setattr(faults, "STEPS", 230)
    data = faults.load()
    watched = faults.run(data, ("gradwatch", {}), 0, "nan")
    plain = faults.run(data, ("none", {}), 0, "nan")
    assert 200 in watched["flagged"] and watched["accuracy"] > 0.8
    assert plain["accuracy"] < 0.2  # the NaN reached the weights
    # What each did at the injected step: gradwatch skipped it, plain training not.
    assert watched["actions"][200] == "skip" and plain["actions"][200] == "none"


def test_lm_spike_count_reads_the_loss_curve():
    import lm

    flat = [2.0] * 60
    assert lm.spikes(flat) == []
    bumped = flat[:55] + [2.6] + flat[56:]
    assert lm.spikes(bumped) == [55]  # 0.6 nats above the median of the previous 50
    assert lm.spikes(flat[:55] + [2.4] + flat[56:]) == []  # 0.4: within the gap
    dead = flat[:52] + [2.8, 2.0, float("nan")] + [float("nan")] * 5
    assert lm.spikes(dead) == [52, 54]  # the first non-finite loss ends the count


def test_transformer_that_blows_up_in_its_first_steps_is_held_by_gradwatch():
    # Experiment 4's setting: at SGD lr 0.4 the transformer blows up within its first
    # 25-50 steps, before the statistics are warm; gradwatch's warm-up protection holds it.
    import lm

    data = lm.load_text()
    plain = lm.run(data, ("none", {}), 0, steps=60)
    watched = lm.run(data, ("gradwatch", {}), 0, steps=60)
    assert not all(v < 4.0 for v in plain["losses"][-10:])  # blown up (or NaN)
    assert max(watched["losses"][-10:]) < 3.2
    assert 0 < watched["clipped"] < 0.5


def test_rnn_problems_are_what_they_say():
    import torch

    import rnn

    g = torch.Generator().manual_seed(0)
    x, y = rnn.addition(64, 50, g)
    marked = x[:, :, 1].bool()
    assert (marked.sum(1) == 2).all()
    assert (marked[:, :25].sum(1) == 1).all()  # one marker in each half
    assert torch.allclose((x[:, :, 0] * x[:, :, 1]).sum(1), y)
    x, y = rnn.order(64, 100, g)
    symbol = x.argmax(2)
    relevant = symbol >= 4
    assert (relevant.sum(1) == 2).all()
    pos = relevant.nonzero()[:, 1].view(-1, 2)  # row-major: each row's two, in order
    assert ((pos[:, 0] >= 10) & (pos[:, 0] <= 20)).all()
    assert ((pos[:, 1] >= 50) & (pos[:, 1] <= 60)).all()
    first = symbol.gather(1, pos[:, :1])[:, 0] - 4
    second = symbol.gather(1, pos[:, 1:])[:, 0] - 4
    assert torch.equal(y, 2 * first + second)


def test_rnn_methods_option_runs_only_those_and_says_so(tmp_path):
    import rnn

    out = tmp_path / "rnn.md"
    rnn.main(["--seeds", "1", "--tasks", "order", "--lengths", "50", "--steps", "20",
              "--methods", "norm(0.3)", "gradwatch", "--out", str(out)])
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["norm(0.3)", "gradwatch"]
    assert "--steps 20 --methods 'norm(0.3)' 'gradwatch'`" in text


def test_plot_is_written_where_asked_and_nowhere_with_an_empty_one(tmp_path, monkeypatch):
    # `--plot ''` once wrote `./.png`: Path('') is '.', and savefig('.') appends .png.
    import common
    import digits

    monkeypatch.setattr(digits, "STEPS", 2)
    monkeypatch.setattr(digits, "SPECS", [("none", {})])
    monkeypatch.chdir(tmp_path)
    digits.main(["--seeds", "1", "--out", "d.md", "--plot", ""])
    assert [p.name for p in tmp_path.iterdir()] == ["d.md"]
    assert "![" not in (tmp_path / "d.md").read_text()
    digits.main(["--seeds", "1", "--out", "d.md", "--plot", "some/dir/x.png"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "d.md", "some", "some/dir", "some/dir/x.png"]
    assert (tmp_path / "some/dir/x.png").read_bytes()[:4] == b"\x89PNG"
    assert "](some/dir/x.png)" in (tmp_path / "d.md").read_text()
    # The option every plotting script shares: a PNG next to the scripts unless told.
    parser = common.parser("doc", "lm", seeds=3, plot="PNG")
    assert parser.parse_args(["--plot", ""]).plot is None
    assert parser.parse_args([]).plot == common.HERE / "lm.png"


def test_sensitivity_scores_spikes_alarms_harm_and_level(tmp_path, monkeypatch):
    # A short run of experiment 5 on one scenario: every table row is written, a ×30
    # spike is flagged by both detectors, the level metric reads the typical norm, and
    # a growing norm is flagged.
    import sensitivity

    monkeypatch.setattr(sensitivity, "STEPS", 160)
    monkeypatch.setattr(sensitivity, "SPIKES", [110, 140])
    monkeypatch.setattr(sensitivity, "MAGNITUDES", (30.0,))
    monkeypatch.setattr(sensitivity, "LEVEL_FROM", 75)
    monkeypatch.setattr(sensitivity, "DRIFT_FROM", 100)
    monkeypatch.setattr(sensitivity, "DRIFT_SPAN", 30)
    monkeypatch.setattr(sensitivity, "GROWTHS", (1.10,))
    data = sensitivity.load_data()
    res = sensitivity.run_scenario("mlp_sgd", sensitivity.SCENARIOS["mlp_sgd"], 1, data)
    for method in ("gradwatch", "zclip"):
        assert {110, 140} <= res["spikes"][(method, 30.0)]["flagged"]
    run = res["clean"]["gradwatch"][0]
    assert 1.0 <= sensitivity.level_ratio(run) < 3.0
    page = sensitivity.report({"mlp_sgd": res}, held_out=False)
    assert "| mlp_sgd | gradwatch | 2/2 |" in page
    assert page.count("| mlp_sgd |") == 6  # recall, clean and drift rows, each method
    # The norm growing 10 % a step is flagged within 15 steps.
    assert res["drift"][("gradwatch", "norm", 1.10)]["latency"] <= 15
    assert "## Drift" in page
    # The figure reads the recall table back from the page.
    recalls = sensitivity.read_recalls(page)
    assert set(recalls) == {("mlp_sgd", "gradwatch"), ("mlp_sgd", "zclip")}
    assert recalls[("mlp_sgd", "gradwatch")] == [1.0]
    sensitivity.plot(recalls, tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
