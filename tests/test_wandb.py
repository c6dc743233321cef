"""W&B reporting, tested against real offline runs read back from their .wandb log."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from helpers import GradStream, SyncCounter, mlp
from wandb_reader import wait_for_exit

import gradwatch

wandb = pytest.importorskip("wandb")
from gradwatch.wandb_reporter import WandbReporter  # noqa: E402
pytestmark = pytest.mark.slow  # each test starts a W&B run (a few seconds)


def _train(monitor, model, opt, steps, plan=None, host_run=None, loss_of=None):
    stream = GradStream(model, sigma=0.1)
    for t in range(steps):
        if host_run is not None:
            host_run.log({"host/loss": float(t)})  # the host logs too, advancing _step
        spec = (plan or {}).get(t, {})
        stream.write(**{k: v for k, v in spec.items() if k != "nan"})
        if spec.get("nan"):
            model[0].weight.grad[0, 0] = float("nan")
        monitor.step(loss=loss_of(t) if loss_of is not None else None)
        opt.step()


def _gradwatch_rows(run):
    """The per-step rows (histograms travel in rows of their own)."""
    return [h for h in run.history if "gradwatch/actions/none" in h]


def _logged_keys(run, prefix="gradwatch/"):
    """The keys logged under ``prefix`` (a histogram's parts folded into its key)."""
    keys = set()
    for h in run.history:
        for k in h:
            if k.startswith(prefix):
                hist = "/norm_hist/" in k or "/value_hist/" in k
                keys.add(k.rsplit("/", 1)[0] if hist else k)
    return keys


def _step_metrics(run):
    """``{key: step_metric}`` of every metric declared by its exact name."""
    return {m.name: m.step_metric for m in run.metrics if m.name}


def test_metrics_histograms_config_and_no_lost_rows():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    host = wandb.init(project="gradwatch-tests")
    monitor = gradwatch.attach(
        model, opt, run_dir=False, log_every=10,
        wandb={"hist_every": 25, "value_hist_layers": ["2"]},
    )
    _train(monitor, model, opt, 80, {60: {"diffuse": {"2": 100.0}}}, host_run=host,
           loss_of=lambda t: None if t == 5 else torch.tensor(4.0 / (t + 1)))
    monitor.detach()
    assert wandb.run is host  # reused, not finished by gradwatch
    host.finish()
    run = wait_for_exit(host.settings.sync_file)
    assert run.exited

    rows = _gradwatch_rows(run)
    assert [r["gradwatch/step"] for r in rows] == list(range(80))  # nothing dropped
    assert sum("host/loss" in h for h in run.history) == 80
    steps = monitor.steps()
    hist = monitor.history()
    for r in rows:
        s = r["gradwatch/step"]
        assert r["gradwatch/global_norm"] == pytest.approx(steps.global_norm[s], rel=1e-6)
        assert r["gradwatch/clipped_norm"] == pytest.approx(steps.clipped_norm[s], rel=1e-6)
        for layer in ("0", "2", "4"):
            expected = hist.query("step == @s and layer == @layer").grad_norm.item()
            assert r[f"gradwatch/grad_norm/{layer}"] == pytest.approx(expected, rel=1e-6)
    # The training context: the loss where one was given (none at step 5), the lr.
    assert "gradwatch/loss" not in rows[5]
    assert [r["gradwatch/loss"] for r in rows if r["gradwatch/step"] != 5] == pytest.approx(
        [4.0 / (t + 1) for t in range(80) if t != 5], rel=1e-6)
    assert [r["gradwatch/lr"] for r in rows] == pytest.approx([0.01] * 80, rel=1e-6)
    assert rows[60]["gradwatch/actions/clip_norm"] >= 1
    assert rows[60]["gradwatch/flagged_z/2"] == pytest.approx(
        hist.query("step == 60 and layer == '2'").z.item(), rel=1e-6
    )
    # Our step metric is declared, and every key is bound to it by its exact name.
    declared = {(m.glob_name or m.name, m.step_metric) for m in run.metrics}
    assert ("gradwatch/*", "gradwatch/step") in declared
    bound = _step_metrics(run)
    logged = _logged_keys(run)
    assert "gradwatch/grad_norm/4" in logged and "gradwatch/norm_hist/0" in logged
    assert bound["gradwatch/loss"] == bound["gradwatch/lr"] == "gradwatch/step"
    assert logged - {"gradwatch/step"} <= {k for k, v in bound.items() if v == "gradwatch/step"}
    assert run.config["gradwatch"]["clip"] == "auto"

    # Histograms at steps 0, 25, 50, 75: value counts cover every element of layer 2,
    # norm histograms cover the finite values in the monitor's window.
    hist_rows = [h for h in run.history if "gradwatch/value_hist/2/values" in h]
    assert [h["gradwatch/step"] for h in hist_rows] == [0, 25, 50, 75]
    numel = sum(p.numel() for p in model[2].parameters())
    for h in hist_rows:
        assert sum(h["gradwatch/value_hist/2/values"]) == numel
        bins = h["gradwatch/value_hist/2/bins"]
        assert len(bins) == 65 and bins[0] == pytest.approx(-bins[-1])
    # (the window holds the steps before the histogram's step: none yet at step 0)
    # ... and once more when the run closes, labelled with its last step.
    norm_rows = [h for h in run.history if "gradwatch/norm_hist/0/values" in h]
    assert [h["gradwatch/step"] for h in norm_rows] == [25, 50, 75, 79]
    assert [sum(h["gradwatch/norm_hist/0/values"]) for h in norm_rows] == [25, 50, 75, 80]

    summary = run.summary
    # Norms and z-scores are summarised by their maximum, not their last value.
    layer2 = hist.query("layer == '2'")
    assert summary["gradwatch/global_norm"] == {"max": pytest.approx(steps.global_norm.max())}
    assert summary["gradwatch/clipped_norm"] == {"max": pytest.approx(steps.clipped_norm.max())}
    assert summary["gradwatch/z"] == {"max": pytest.approx(steps.z.max())}
    assert summary["gradwatch/grad_norm/2"] == {"max": pytest.approx(layer2.grad_norm.max())}
    assert summary["gradwatch/flagged_z/2"] == {
        "max": pytest.approx(layer2[layer2.flagged].z.max())}
    assert steps.global_norm.max() > steps.global_norm.iloc[-1]  # not the last value
    assert not isinstance(summary["gradwatch/typical_norm"], dict)  # last value
    assert summary["gradwatch/total_steps"] == 80
    assert summary["gradwatch/events/explosion"] == 1
    assert summary["gradwatch/worst_layer"] == "2"
    assert summary["gradwatch/max_global_norm"] == pytest.approx(steps.global_norm.max(), rel=1e-6)
    assert summary["gradwatch/clip_rate"] == pytest.approx(
        (steps.action != "none").mean(), rel=1e-6
    )


def test_a_short_run_has_histograms_after_warm_up_and_at_the_end():
    # 40 steps, far fewer than hist_every: histograms still reach W&B at the first
    # flush after warm-up (step 25, flushed at 29) and when the run closes (step 39).
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reporter = WandbReporter(hist_every=500, value_hist_layers=["2"],
                             init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, wandb=reporter)
    _train(monitor, model, opt, 40)
    monitor.detach()
    run = wait_for_exit(reporter.run.settings.sync_file)
    norm_rows = [h for h in run.history if "gradwatch/norm_hist/0/values" in h]
    assert [h["gradwatch/step"] for h in norm_rows] == [25, 39]
    assert [sum(h["gradwatch/norm_hist/0/values"]) for h in norm_rows] == [25, 40]
    value_rows = [h for h in run.history if "gradwatch/value_hist/2/values" in h]
    assert [h["gradwatch/step"] for h in value_rows] == [0, 25]  # values: not at close
    # The warm-up histograms travel with the chunk of steps 20-29 (the first flush
    # after warm-up), logged right after step 25's row.
    order = [h.get("gradwatch/step") for h in run.history if "gradwatch/step" in h]
    assert order[25:29] == [24, 25, 25, 26]  # (after 0, 0: the histograms at step 0)


def test_alerts_are_readable_and_rate_limited():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    spikes = {t: {"diffuse": {"2": 100.0}} for t in (40, 45, 50, 55)}
    spikes[60] = {"nan": True}
    spikes[65] = {"nan": True}
    reporter = WandbReporter(hist_every=None, alert_every=3600.0,
                             init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, wandb=reporter)
    _train(monitor, model, opt, 80, spikes)
    monitor.detach()  # gradwatch started this run, so it finishes it
    run = wait_for_exit(reporter.run.settings.sync_file)
    # W&B groups alerts by title: the step is in the text, never in the title.
    assert [a["title"] for a in run.alerts] == [
        "gradwatch: gradient explosion",
        "gradwatch: NaN/Inf gradients",
        "gradwatch: alerts held back",
    ]
    explosion, nonfinite, held = run.alerts
    assert all(len(a["title"]) < 64 for a in run.alerts)
    assert explosion["text"].startswith("Step 40, layer 2, action clip_norm.")
    assert explosion["level"] == "WARN" and nonfinite["level"] == "ERROR"
    assert nonfinite["text"].startswith("Step 60, layer 0, action skip.")
    # What the rate limit held back (explosions at 45, 50, 55; NaN at 65) is told at
    # the end of the run, in one alert and in the summary.
    assert "3 gradient explosion event(s), the last at step 55" in held["text"]
    assert "1 NaN/Inf gradients event(s), the last at step 65" in held["text"]
    assert held["level"] == "ERROR"
    assert run.summary["gradwatch/events/explosion"] == 4
    assert run.summary["gradwatch/alerts_sent"] == 3
    assert run.summary["gradwatch/alerts_held_back"] == 4
    # A non-finite step's row is logged, without breaking the run; its non-finite
    # norms are left out (W&B's max summary would stay NaN for good).
    row = _gradwatch_rows(run)[60]
    assert row["gradwatch/nonfinite"] == 1 and "gradwatch/global_norm" not in row
    finite = monitor.steps().global_norm.dropna()
    assert run.summary["gradwatch/global_norm"] == {"max": pytest.approx(finite.max())}


def test_suppressed_alerts_are_counted_into_the_next_one(monkeypatch):
    import gradwatch.wandb_reporter as wr

    clock = iter(range(0, 10_000, 100))  # each alert check is 100 s later
    monkeypatch.setattr(wr, "_clock", lambda: float(next(clock)))
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    spikes = {t: {"diffuse": {"2": 100.0}} for t in (40, 42, 44, 46, 48)}
    reporter = WandbReporter(hist_every=None, alert_every=250.0,
                             init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, wandb=reporter)
    _train(monitor, model, opt, 60, spikes)
    monitor.detach()
    run = wait_for_exit(reporter.run.settings.sync_file)
    # Checks at t=0, 100, 200, 300, 400 s: alerts at 0 and 300; the two in between
    # are counted into the second one.
    assert [a["text"][:8] for a in run.alerts[:2]] == ["Step 40,", "Step 46,"]
    assert "2 more explosion event(s) since the last alert" in run.alerts[1]["text"]
    # The one at 48 (t=400 s) is held back when the run ends, and told then.
    assert run.alerts[2]["title"] == "gradwatch: alerts held back"
    assert "1 gradient explosion event(s), the last at step 48" in run.alerts[2]["text"]
    assert run.alerts[2]["level"] == "WARN"
    assert run.summary["gradwatch/alerts_held_back"] == 3


def test_failing_wandb_warns_once_and_training_continues(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    host = wandb.init(project="gradwatch-tests")
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10,
                               flush_every=10, wandb={"hist_every": None})
    host.finish()  # W&B goes away under the reporter: every call now raises
    with pytest.warns(UserWarning, match=r"WandbReporter.report failed") as caught:
        _train(monitor, model, opt, 40)
    assert sum("WandbReporter" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.detach()
    from gradwatch.run_record import load_run

    assert len(load_run(tmp_path / "run").steps) == 40  # the local record is unaffected


def _refused_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cause", ["no_api_key", "server_unreachable"])
def test_wandb_that_cannot_start_warns_once_and_training_and_the_record_go_on(
    tmp_path, monkeypatch, cause
):
    # A real wandb.init failure: online mode against a local port nothing listens on,
    # either with no API key (authentication) or with one (the network times out).
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    settings = wandb.Settings(base_url=f"http://127.0.0.1:{_refused_port()}", init_timeout=1,
                              api_key="0" * 40 if cause == "server_unreachable" else None)
    options = {"hist_every": 5, "init_kwargs": {"project": "gradwatch-tests", "mode": "online",
                                                "settings": settings}}
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match=r"gradwatch: W&B could not start") as caught:
        monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10,
                                   flush_every=10, wandb=options)
    [warning] = [w for w in caught if "gradwatch" in str(w.message)]  # one warning
    text = str(warning.message)
    expected = {"no_api_key": "UsageError: No API key", "server_unreachable": "CommError"}
    assert expected[cause] in text and "the run record" in text and "continue" in text
    assert wandb.run is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing more: training steps, then detach
        _train(monitor, model, opt, 30)
        monitor.detach()
    from gradwatch.run_record import load_run

    record = load_run(tmp_path / "run")
    assert list(record.steps.step) == list(range(30))
    assert record.meta["status"] == "finished"


BROKEN_INSTALL_RUN = textwrap.dedent(
    """
    import json, sys, warnings
    sys.path[:0] = [{broken!r}, {tests!r}]  # the broken wandb is found first
    import torch
    import gradwatch
    from helpers import GradStream, mlp
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = gradwatch.attach(model, opt, run_dir={run!r}, log_every=10, wandb=True)
        stream = GradStream(model)
        for _ in range(25):
            stream.write()
            monitor.step()
            opt.step()
        monitor.detach()
    print(json.dumps([str(w.message) for w in caught if "gradwatch" in str(w.message)]))
    """
)


def test_a_wandb_install_that_fails_on_import_warns_and_the_record_goes_on(tmp_path):
    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise ImportError("libwandb_core.so: cannot open shared object file")\n')
    run = tmp_path / "run"
    script = BROKEN_INSTALL_RUN.format(broken=str(tmp_path / "site"), run=str(run),
                                       tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(messages) == 1, messages
    assert "W&B could not start" in messages[0] and "libwandb_core.so" in messages[0]
    from gradwatch.run_record import load_run

    record = load_run(run)
    assert list(record.steps.step) == list(range(25))
    assert record.meta["status"] == "finished"


def test_wandb_not_installed_is_a_configuration_error(monkeypatch):
    # wandb=True asked for W&B explicitly: with no wandb at all, attach stops with the
    # install command (None in sys.modules is how Python marks a module as absent).
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'pip install "gradwatch\[wandb\]"'):
        gradwatch.attach(mlp(), run_dir=False, wandb=True)


def test_init_options_wandb_rejects_are_a_configuration_error():
    with pytest.raises(TypeError, match=r"projcet"):
        gradwatch.attach(mlp(), run_dir=False, wandb={"init_kwargs": {"projcet": "x"}})
    with pytest.raises(ValueError, match=r"mode"):
        gradwatch.attach(mlp(), run_dir=False, wandb={"init_kwargs": {"mode": "bogus"}})
    assert wandb.run is None


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"bins=1000 must be an integer in \[2, 512\]"):
        WandbReporter(bins=1000)
    with pytest.raises(ValueError, match=r"hist_every=0 must be an integer >= 1 or None"):
        WandbReporter(hist_every=0)
    reporter = WandbReporter(value_hist_layers=["nope"],
                             init_kwargs={"project": "gradwatch-tests"})
    with pytest.raises(ValueError, match=r"no layer named 'nope'"):
        gradwatch.attach(mlp(), run_dir=False, reporters=[reporter])
    assert wandb.run is None  # checked before any run was started


def test_np_histogram_is_valid_for_wandb():
    # The probe's output converts to wandb.Histogram without NaN/Inf complaints even
    # when a layer's window is empty or its gradients are non-finite.
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    reporter = WandbReporter(hist_every=1, value_hist_layers=["0"],
                             init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=5, wandb=reporter)
    _train(monitor, model, opt, 10, {0: {"nan": True}, 3: {"nan": True}})
    monitor.detach()
    run = wait_for_exit(reporter.run.settings.sync_file)
    values = [h["gradwatch/value_hist/0/values"] for h in run.history
              if "gradwatch/value_hist/0/values" in h]
    numel = sum(p.numel() for p in model[0].parameters())
    assert len(values) >= 8 and all(np.isfinite(v).all() for v in values)
    assert all(sum(v) <= numel for v in values)


def test_histogram_steps_stay_sync_free():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    reporter = WandbReporter(hist_every=1, value_hist_layers=["0", "4"],
                             init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=10, wandb=reporter)
    monitor._host_branches = False  # the accelerator path (see test_nosync.py)
    stream = GradStream(model)
    for t in range(30):
        stream.write()
        with SyncCounter() as counter:
            monitor.step()  # a histogram probe runs at every one of these steps
        if (t + 1) % 10:
            assert counter.syncs == [], f"step {t}: {counter.syncs}"
        opt.step()
    monitor.detach()
    run = wait_for_exit(reporter.run.settings.sync_file)
    assert sum("gradwatch/value_hist/4/values" in h for h in run.history) == 30


def test_a_drift_is_alerted_and_logged():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    reporter = WandbReporter(hist_every=None, init_kwargs={"project": "gradwatch-tests"})
    monitor = gradwatch.attach(model, opt, run_dir=False, log_every=20, wandb=reporter)
    plan = {t: {"diffuse": dict.fromkeys(("0", "2", "4"), 1.06 ** (t - 99))}
            for t in range(100, 140)}
    _train(monitor, model, opt, 140, plan)
    step = int(monitor.events().query("kind == 'drift'").step.iloc[0])
    monitor.detach()
    run = wait_for_exit(reporter.run.settings.sync_file)
    drift = [a for a in run.alerts if "gradient norm rising" in a["title"]]
    assert len(drift) == 1 and drift[0]["text"].startswith(f"Step {step},")
    assert "rising x1." in drift[0]["text"] and "since step" in drift[0]["text"]
    assert sum(h.get("gradwatch/drift", 0) for h in _gradwatch_rows(run)) == 1
    assert run.summary["gradwatch/events/drift"] == 1
