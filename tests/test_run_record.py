"""The durable run record: what is on disk equals what the monitor saw, at any moment."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pandas as pd
import pytest
import torch
from helpers import GradStream, mlp

import gradwatch
from gradwatch import run_record
from gradwatch.run_record import RunDirError, load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(monitor, model, opt, steps, start=0):
    stream = GradStream(model)
    stream.step = start
    for t in range(start, start + steps):
        stream.write(diffuse={"2": 100.0} if t == 70 else None)
        if t == 90:
            model[0].weight.grad[0, 0] = float("nan")
        monitor.step()
        opt.step()


def test_record_equals_monitor_tables(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10, flush_every=40)
    _train(monitor, model, opt, 130)
    monitor.detach()
    run = load_run(tmp_path / "run")
    assert run.meta["status"] == "finished" and run.meta["last_step"] == 129
    pd.testing.assert_frame_equal(run.steps, monitor.steps(), check_dtype=False,
                                  check_categorical=False)
    pd.testing.assert_frame_equal(run.layers, monitor.history(), check_dtype=False,
                                  check_categorical=False)
    pd.testing.assert_frame_equal(run.events, monitor.events(), check_dtype=False)
    assert set(run.events.kind) == {"explosion", "nonfinite"}


def test_meta_written_before_the_first_step(tmp_path):
    model = mlp()
    monitor = gradwatch.attach(model, run_dir=tmp_path / "run", clip="zscore")
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["status"] == "running" and meta["config"]["clip"] == "zscore"
    assert [rec["layer"] for rec in meta["layers"]] == ["0", "2", "4"]
    assert meta["layers"][0]["numel"] == 16 * 32 + 32
    run = load_run(tmp_path / "run")  # readable with no step recorded yet
    assert len(run.steps) == 0 and len(run.events) == 0
    assert monitor.run_dir == str(tmp_path / "run")


def test_parts_are_flushed_as_the_run_goes(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10, flush_every=50)
    _train(monitor, model, opt, 125)
    run = load_run(tmp_path / "run")  # while the run is still going
    assert list(run.steps.step) == list(range(100))
    assert run.meta["status"] == "running"


def test_default_run_dir_is_new_each_time():
    first = gradwatch.attach(mlp())
    second = gradwatch.attach(mlp())
    assert first.run_dir != second.run_dir
    assert os.path.basename(os.path.dirname(first.run_dir)) == "gradwatch_runs"
    assert os.path.isabs(first.run_dir)
    assert gradwatch.attach(mlp(), run_dir=False).run_dir is None


def _claim_default_dirs(barrier, queue, calls):
    barrier.wait()  # all processes start claiming together
    queue.put([str(run_record.default_run_dir()) for _ in range(calls)])


def test_default_run_dirs_of_concurrent_processes_are_distinct(monkeypatch):
    # The clock is frozen, so every process asks for the same name at the same time:
    # only an atomic claim (mkdir failing on an existing directory) keeps them apart.
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20260101-000000"
                        if fmt == "%Y%m%d-%H%M%S" else real(fmt, *args))
    ctx = multiprocessing.get_context("fork")  # the children inherit the frozen clock
    n_procs, calls = 6, 4
    barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_claim_default_dirs, args=(barrier, queue, calls))
             for _ in range(n_procs)]
    for proc in procs:
        proc.start()
    paths = [path for _ in procs for path in queue.get(timeout=60)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(set(paths)) == n_procs * calls
    assert all(os.path.isdir(path) and not os.listdir(path) for path in paths)
    assert {os.path.basename(path) for path in paths} == {
        "run-20260101-000000", *(f"run-20260101-000000-{n}" for n in range(2, 25))}


CONCURRENT_RUN = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {tests!r})
    import gradwatch
    from helpers import GradStream, mlp
    real = time.strftime
    time.strftime = lambda fmt, *a: "20260101-000000" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a)
    from gradwatch.run_record import RunRecorder
    start = RunRecorder.start
    def slow_start(self, run):  # a slow disk: the others choose a directory meanwhile
        time.sleep(0.3)
        start(self, run)
    RunRecorder.start = slow_start
    torch.manual_seed({seed})
    model = mlp()
    open({go!r} + ".ready{seed}", "w").close()
    while not os.path.exists({go!r}):  # start together
        time.sleep(0.001)
    monitor = gradwatch.attach(model, log_every=5, flush_every=5)
    stream = GradStream(model, seed={seed})
    for _ in range(20):
        stream.write()
        monitor.step()
    monitor.detach()
    print(monitor.run_dir, float(monitor.steps().global_norm.sum()))
    """
)


@pytest.mark.slow
def test_runs_attached_in_the_same_second_keep_their_own_records(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_RUN.format(
                tests=os.path.join(ROOT, "tests"), seed=seed, go=str(go))],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    runs = [out.split() for out, _ in outputs]
    assert len({run_dir for run_dir, _ in runs}) == 3
    for run_dir, norm_sum in runs:
        run = load_run(run_dir)
        assert list(run.steps.step) == list(range(20)) and len(run.meta["sessions"]) == 1
        assert float(run.steps.global_norm.sum()) == pytest.approx(float(norm_sum))


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


class _Keep:
    def __init__(self):
        self.chunks = []

    def start(self, run):
        pass

    def report(self, chunk):
        self.chunks.append(chunk)

    def close(self, error):
        pass


def test_fresh_run_into_the_directory_of_another_run_is_refused(tmp_path):
    run = tmp_path / "run"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gradwatch.attach(model, opt, run_dir=run, log_every=10, flush_every=20)
    _train(first, model, opt, 40)
    first.detach()
    before = _snapshot(run)

    keep = _Keep()
    second = gradwatch.attach(model, opt, run_dir=run, reporters=[keep], log_every=10,
                              flush_every=20)
    assert _snapshot(run) == before  # nothing written before the run says it resumes
    refused = (rf"{re.escape(str(run))} already holds the record of another run, and this "
               r"run did not resume it \(no monitor.load_state_dict before its first "
               r"step\).*record into a new directory \(run_dir=<a new path>\) or let "
               r"gradwatch make one \(run_dir=True\)")
    with pytest.raises(RunDirError, match=refused):  # at its first records
        _train(second, model, opt, 30)
    second.detach()
    assert _snapshot(run) == before  # the other run's record is untouched
    assert list(load_run(run).steps.step) == list(range(40))
    # The error came with the first records (log_every=10), before any was written.
    assert second.steps().step.max() == 9


def test_the_directory_of_a_run_is_written_once_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gradwatch.attach(model, opt, run_dir=run, log_every=10, flush_every=10)
    _train(first, model, opt, 30)
    state = first.state_dict()
    first.detach()
    before = _snapshot(run)
    second = gradwatch.attach(model, opt, run_dir=run, log_every=10, flush_every=10)
    assert _snapshot(run) == before
    second.load_state_dict(state)  # now known: a resume; it goes on recording here
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "running" and len(meta["sessions"]) == 2
    assert meta["sessions"][-1]["first_step"] == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(second, model, opt, 20, start=30)
        second.detach()
    assert list(load_run(run).steps.step) == list(range(50))


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import gradwatch
    from helpers import GradStream, mlp
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir={run!r}, log_every=10, flush_every=30)
    stream = GradStream(model)
    for t in range(10_000):
        stream.write()
        monitor.step()
        opt.step()
        if t == 137:
            print("killing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.slow
def test_sigkill_leaves_every_flushed_part_readable(tmp_path):
    run = tmp_path / "run"
    script = KILLED_RUN.format(tests=os.path.join(ROOT, "tests"), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    data = load_run(run)
    # Parts of 30 steps: 120 steps were on disk when the process died at step 137.
    assert list(data.steps.step) == list(range(120))
    assert data.meta["status"] == "running"
    assert not list(run.rglob("*.tmp"))


def test_resumed_session_replaces_rerecorded_steps(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = dict(run_dir=tmp_path / "run", log_every=10, flush_every=20)
    first = gradwatch.attach(model, opt, **options)
    _train(first, model, opt, 50)
    state = first.state_dict()  # checkpoint at step 50 ...
    _train(first, model, opt, 30, start=50)  # ... the run goes on to 80 and crashes:
    assert load_run(tmp_path / "run").steps.step.max() == 79  # its parts are on disk
    first._gate.remove()  # (the crashed process's monitor is gone)

    second = gradwatch.attach(model, opt, **options)
    second.load_state_dict(state)
    _train(second, model, opt, 60, start=50)
    second.detach()
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(110))
    assert len(run.meta["sessions"]) == 2
    resumed = second.steps().set_index("step")
    on_disk = run.steps.set_index("step").loc[50:]
    pd.testing.assert_series_equal(on_disk.global_norm, resumed.global_norm)


def test_record_into_directory_of_another_model_is_refused(tmp_path):
    gradwatch.attach(mlp(), run_dir=tmp_path / "run").detach()
    with pytest.raises(RunDirError, match="holds the record of a model with other layers"):
        gradwatch.attach(mlp((16, 8, 8, 8, 4)), run_dir=tmp_path / "run")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing", r"no such run directory"),
        ("no_meta", r"not a gradwatch run directory \(no meta.json\)"),
        ("foreign", r"not a gradwatch run \(format is not 'gradwatch-run'\)"),
        ("bad_json", r"meta.json: truncated or not JSON"),
        ("truncated_part", r"part-.*\.parquet: truncated or not a Parquet file"),
        ("newer", r"run format version 99 is newer than this gradwatch reads"),
    ],
)
def test_bad_run_directories_give_one_line_errors(tmp_path, damage, match):
    run = tmp_path / "run"
    model = mlp()
    monitor = gradwatch.attach(model, run_dir=run, log_every=5, flush_every=5)
    _train(monitor, model, torch.optim.SGD(model.parameters(), lr=0.01), 10)
    monitor.detach()
    meta = run / "meta.json"
    if damage == "missing":
        run = tmp_path / "elsewhere"
    elif damage == "no_meta":
        meta.unlink()
    elif damage == "foreign":
        meta.write_text(json.dumps({"name": "something else"}))
    elif damage == "bad_json":
        meta.write_text(meta.read_text()[:20])
    elif damage == "truncated_part":
        part = sorted((run / "layers").glob("*.parquet"))[0]
        with open(part, "r+b") as f:
            f.truncate(10)
    elif damage == "newer":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
    with pytest.raises(RunDirError, match=match) as info:
        load_run(run)
    assert "\n" not in str(info.value)


class Exploding:
    def start(self, run):
        pass

    def report(self, chunk):
        raise OSError("disk full")

    def close(self, error):
        raise OSError("disk full")


def test_failing_reporter_warns_once_and_training_continues(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", reporters=[Exploding()],
                               log_every=5, flush_every=5)
    with pytest.warns(UserWarning, match=r"Exploding.report failed \(OSError: disk full\)") as rec:
        _train(monitor, model, opt, 30)
    assert sum("Exploding" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.detach()  # close fails again: already warned, stays quiet
    assert len(load_run(tmp_path / "run").steps) == 30  # the record is unaffected


GC_RUN = textwrap.dedent(
    """
    import gc, sys, torch
    sys.path.insert(0, {tests!r})
    import gradwatch
    from helpers import GradStream, mlp

    def train():  # the monitor goes out of scope without detach()
        model = mlp()
        monitor = gradwatch.attach(model, run_dir={run!r}, log_every=10, flush_every=100)
        stream = GradStream(model)
        for _ in range(255):
            stream.write()
            monitor.step()

    train()
    gc.collect()
    if {crash!r}:
        raise ValueError("the training loop failed")
    """
)


@pytest.mark.parametrize("crash", [False, True])
def test_monitor_dropped_without_detach_is_flushed_at_exit(tmp_path, crash):
    # The exit hook flushes every step, after an uncaught exception too, and meta.json
    # says which way the program ended.
    from gradwatch.report import render_html, summary_text

    run = tmp_path / "run"
    script = GC_RUN.format(tests=os.path.join(ROOT, "tests"), run=str(run), crash=crash)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == (1 if crash else 0), proc.stderr
    data = load_run(run)
    assert list(data.steps.step) == list(range(255))
    if crash:
        assert "ValueError: the training loop failed" in proc.stderr  # still printed
        assert data.meta["status"] == "crashed" and data.meta["error"] == "ValueError"
        assert "status       crashed (ValueError)" in summary_text(data)
        assert "ended with an uncaught ValueError" in render_html(data)
    else:
        assert data.meta["status"] == "finished" and "error" not in data.meta


def test_resume_drops_what_the_abandoned_run_recorded_after_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = dict(run_dir=tmp_path / "run", log_every=10, flush_every=10)
    first = gradwatch.attach(model, opt, **options)
    _train(first, model, opt, 50)
    state = first.state_dict()
    stream = GradStream(model)
    stream.step = 50
    for t in range(50, 80):  # NaN at 60 and 61, then the process dies at 80
        stream.write()
        if t in (60, 61):
            model[0].weight.grad[0, 0] = float("nan")
        first.step()
    first._gate.remove()
    assert {60, 61} <= set(load_run(tmp_path / "run").events.step)

    second = gradwatch.attach(model, opt, **options)
    second.load_state_dict(state)
    _train(second, model, opt, 15, start=50)  # resumed, healthy; steps 50-59 on disk
    run = load_run(tmp_path / "run")
    # Nothing of the abandoned session from step 50 on, even where the resumed one
    # has not written its own records yet.
    assert list(run.steps.step) == list(range(60))
    assert 60 not in set(run.events.step) and 61 not in set(run.events.step)
    assert run.meta["sessions"][-1]["first_step"] == 50


def test_failed_write_is_retried(tmp_path, monkeypatch):
    import pandas as pd

    real = pd.DataFrame.to_parquet
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", flaky)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10, flush_every=10)
    with pytest.warns(UserWarning, match="No space left on device"):
        _train(monitor, model, opt, 40)
    monitor.detach()
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(40))
    assert sorted(set(run.layers.step)) == list(range(40))


def test_a_disk_that_stays_full_bounds_the_backlog_with_one_warning(tmp_path, monkeypatch):
    import warnings

    import pandas as pd

    real = pd.DataFrame.to_parquet
    full = {"on": False}

    def disk(self, *args, **kwargs):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10,
                               flush_every=20)
    recorder = next(r for r in monitor._reporters.reporters
                    if isinstance(r, run_record.RunRecorder))
    limit = recorder.BACKLOG_PARTS * 20
    stream = GradStream(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(400):
            full["on"] = 40 <= t < 340  # the disk is full for 300 steps
            stream.write()
            monitor.step()
            opt.step()
            assert recorder._buffered <= limit + 10  # one hand-over beyond the limit
        monitor.detach()
    dropped = [w for w in caught if "oldest are dropped" in str(w.message)]
    assert len(dropped) == 1
    run = load_run(tmp_path / "run")
    kept = list(run.steps.step)
    assert kept[:40] == list(range(40)) and kept[-60:] == list(range(340, 400))
    lost = 400 - len(kept)
    assert lost > 0 and run.meta["dropped_steps"] == lost
    assert sorted(set(run.layers.step)) == kept


def test_failing_probe_is_switched_off_and_training_continues(tmp_path):
    class Probing:
        probe_every = 2

        def start(self, run):
            pass

        def report(self, chunk):
            pass

        def close(self, error):
            pass

        def probe(self, inputs):
            raise RuntimeError("histc is not deterministic")

    model = mlp()
    monitor = gradwatch.attach(model, run_dir=False, reporters=[Probing()])
    stream = GradStream(model)
    with pytest.warns(UserWarning, match="device probe failed .*switched off"):
        for _ in range(6):
            stream.write()
            monitor.step()
    assert len(monitor.steps()) == 6


def test_reporter_that_cannot_start_leaves_no_half_made_run(tmp_path):
    class Broken:
        def start(self, run):
            raise ValueError("bad option")

    opt_model = mlp()
    opt = torch.optim.SGD(opt_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="bad option"):
        gradwatch.attach(opt_model, opt, run_dir=tmp_path / "run", reporters=[Broken()])
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["status"] == "finished"
    assert "step" not in opt.__dict__


FOREIGN_SESSION = "9" * 20  # sorts after the run's own session: merged in, were it read


def _plant(run, kind):
    """A file (or directory) named like a part that the recorder did not write."""
    name = f"part-{FOREIGN_SESSION}-000000000020.parquet"
    real = pd.read_parquet(sorted((run / "steps").glob("part-*.parquet"))[0])
    target = run / ("layers" if kind == "unknown_layer" else "steps") / name
    if kind == "foreign":
        pd.DataFrame({"val_loss": [0.5, 0.4]}).to_parquet(target)
    elif kind == "missing_lr":  # of the newer columns, one only: no writer did that
        real.assign(step=real.step + 20).drop(columns=["lr"]).to_parquet(target)
    elif kind == "extra_column":
        real.assign(step=real.step + 20, note="x").to_parquet(target)
    elif kind == "nan_step":
        real.assign(step=real.step.astype(float).where(real.step > 0)).to_parquet(target)
    elif kind == "text_norm":
        real.assign(step=real.step + 20, global_norm="big").to_parquet(target)
    elif kind == "unknown_layer":
        layers = pd.read_parquet(sorted((run / "layers").glob("part-*.parquet"))[0])
        layers.assign(layer=layers.layer.astype(str).replace("2", "head")).to_parquet(target)
        real.assign(step=real.step + 20).to_parquet(run / "steps" / name)
    elif kind == "directory":
        target.mkdir()
    return target


PLANTED = [
    ("foreign", r"not a gradwatch steps part \(lacks 'step', 'global_norm', 'clipped_norm', "
                r"'threshold', 'action' and \d+ more; has unexpected 'val_loss'\)"),
    ("missing_lr", r"not a gradwatch steps part \(lacks 'lr'\)"),
    ("extra_column", r"not a gradwatch steps part \(has unexpected 'note'\)"),
    ("nan_step", r"not a gradwatch steps part \(column 'step' is float64, not integers\)"),
    ("text_norm", r"not a gradwatch steps part \(column 'global_norm' is \w+, not numbers\)"),
    ("unknown_layer", r"not a gradwatch layers part \(column 'layer' holds 'head', not one of "
                      r"this run's\)"),
    ("directory", r"not a gradwatch part \(not a file\)"),
]


@pytest.fixture
def recorded(tmp_path):
    run = tmp_path / "run"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=run, log_every=10, flush_every=10)
    _train(monitor, model, opt, 20)
    monitor.detach()
    return run


@pytest.mark.parametrize(("kind", "match"), PLANTED, ids=[k for k, _ in PLANTED])
def test_load_run_refuses_files_named_like_parts(recorded, kind, match):
    planted = _plant(recorded, kind)
    with pytest.raises(RunDirError, match=re.escape(str(planted)) + ": " + match) as info:
        load_run(recorded)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kind", "match"), PLANTED, ids=[k for k, _ in PLANTED])
def test_cli_refuses_files_named_like_parts(recorded, tmp_path, capsys, kind, match):
    from gradwatch.cli import main

    planted = _plant(recorded, kind)
    out = tmp_path / "report.html"
    for command, args in (("summary", []), ("report", ["-o", str(out)])):
        assert main([command, str(recorded), *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert re.fullmatch(rf"gradwatch {command}: error: {re.escape(str(planted))}: "
                            rf"{match} \(--debug shows the traceback\)\n",
                            captured.err), captured.err
    assert not out.exists()


def test_cli_summary_of_a_healthy_run_still_works(recorded, capsys):
    from gradwatch.cli import main

    assert main(["summary", str(recorded)]) == 0
    assert "steps" in capsys.readouterr().out


def test_loss_and_lr_round_trip_through_the_record(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=5, flush_every=5)
    stream = GradStream(model)
    for t in range(12):
        stream.write()
        monitor.step(loss=None if t == 7 else torch.tensor(1.0 / (t + 1)))
        opt.step()
        sched.step()
    monitor.detach()
    run = load_run(tmp_path / "run")
    pd.testing.assert_frame_equal(run.steps, monitor.steps(), check_dtype=False,
                                  check_categorical=False)
    want_loss = [float(torch.tensor(1.0 / (t + 1))) for t in range(12)]
    want_loss[7] = float("nan")
    assert run.steps["loss"].tolist() == pytest.approx(want_loss, rel=1e-6, nan_ok=True)
    assert run.steps["lr"].tolist() == pytest.approx([0.1 * 0.5 ** (t // 4) for t in range(12)],
                                                     rel=1e-6)


def test_a_record_from_before_loss_and_lr_loads_with_nan_there(recorded):
    """Runs recorded before the training context was kept lack exactly the ``loss`` and
    ``lr`` columns: they load, NaN there, and so does their report."""
    from gradwatch.report import export_report

    for part in (recorded / "steps").glob("part-*.parquet"):
        pd.read_parquet(part).drop(columns=["loss", "lr"]).to_parquet(part, index=False)
    run = load_run(recorded)
    assert list(run.steps.columns) == run_record._columns("steps")
    assert len(run.steps) == 20
    assert run.steps["loss"].isna().all() and run.steps["lr"].isna().all()
    html = export_report(recorded, recorded / "report.html").read_text()
    assert 'id="loss"' not in html


def test_parts_with_and_without_loss_and_lr_load_together(recorded):
    """A run recorded in part before the change (resumed after it): NaN where the
    older part did not record them."""
    first = sorted((recorded / "steps").glob("part-*.parquet"))[0]
    old = pd.read_parquet(first)
    old.drop(columns=["loss", "lr"]).to_parquet(first, index=False)
    run = load_run(recorded)
    steps_in_old = set(old["step"])
    old_rows = run.steps["step"].isin(steps_in_old)
    assert run.steps.loc[old_rows, "lr"].isna().all()
    new_lr = run.steps.loc[~old_rows, "lr"].tolist()
    assert new_lr and new_lr == pytest.approx([0.01] * len(new_lr), rel=1e-6)
