"""GradWatchTrainerCallback on a real Hugging Face Trainer and GradWatchAccelerate in an
Accelerate loop (CPU, tiny models)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from gradwatch.integrations.huggingface import GradWatchTrainerCallback  # noqa: E402
from helpers import assert_record_decides_as  # noqa: E402

pytestmark = pytest.mark.slow

SPIKE_STEP = 30
ACCUMULATE = 2


class TinyRegressor(nn.Module):
    def __init__(self, spike_calls=(), inf_calls=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spike_calls = set(spike_calls)
        self.inf_calls = set(inf_calls)
        self.calls = 0

    def forward(self, x, labels):
        loss = nn.functional.mse_loss(self.net(x), labels)
        if self.training:
            if self.calls in self.spike_calls:
                loss = loss * 1e4
            if self.calls in self.inf_calls:
                loss = loss * float("inf")
            self.calls += 1
        return {"loss": loss}


class Data(torch.utils.data.Dataset):
    """``spikes``: indices of samples with corrupted labels (off by 100). The spike travels
    with the data, so a resumed run meets it where the uninterrupted run did; a counter
    of forward calls would restart at 0 in the resumed process."""

    def __init__(self, n, spikes=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x[:, :1] * 0.5
        for i in spikes:
            self.y[i] += 100.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _args(tmp_path, steps, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=ACCUMULATE, learning_rate=0.05, optim="sgd",
        lr_scheduler_type=kwargs.pop("lr_scheduler_type", "constant"), max_grad_norm=kwargs.pop("max_grad_norm", 0.0),
        report_to=kwargs.pop("report_to", "none"), save_strategy=kwargs.pop("save", "no"),
        logging_steps=kwargs.pop("logging_steps", 1000), use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kwargs,
    )


def test_spike_detected_at_the_right_optimizer_step_and_clipped(tmp_path):
    # Forward call 2*30+1 is the second micro-batch of optimizer step 30.
    model = TinyRegressor(spike_calls={SPIKE_STEP * ACCUMULATE + 1})
    gw = GradWatchTrainerCallback(run_dir=tmp_path / "run", log_every=10)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 50),
                                   train_dataset=Data(800), callbacks=[gw])
    before = {}

    class Watch(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            before[state.global_step] = torch.cat([p.detach().flatten().clone()
                                                  for p in model.parameters()])

        def on_optimizer_step(self, args, state, control, **kw):
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
            before[state.global_step] = (after - before[state.global_step]).norm().item()

    trainer.add_callback(Watch())
    trainer.train()
    events = gw.monitor.events()
    assert list(events.step) == [SPIKE_STEP]
    assert events.action.iloc[0] == "clip_norm"
    steps = gw.monitor.steps().set_index("step")
    assert len(steps) == 50
    clipped = steps.loc[SPIKE_STEP, "clipped_norm"]
    assert before[SPIKE_STEP] == pytest.approx(0.05 * clipped, rel=1e-3)
    assert steps.loc[SPIKE_STEP, "global_norm"] > 100 * clipped
    # The update ratio is measured around the Trainer's optimizer step.
    hist = gw.monitor.history()
    assert sorted(set(hist[hist.update_ratio > 0].step)) == [0, 10, 20, 30, 40]


def test_lr_follows_the_trainers_schedule_and_the_loss_is_not_recorded(tmp_path):
    """The Trainer shows its callbacks no per-step loss (only log_history, every
    logging_steps, read on the host): the loss is NaN; the lr is the scheduler's."""
    gw = GradWatchTrainerCallback(run_dir=False)
    trainer = transformers.Trainer(
        model=TinyRegressor(), args=_args(tmp_path, 10, lr_scheduler_type="linear"),
        train_dataset=Data(800), callbacks=[gw])
    trainer.train()
    steps = gw.monitor.steps()
    assert steps["loss"].isna().all()
    assert steps["lr"].tolist() == pytest.approx([0.05 * (10 - k) / 10 for k in range(10)],
                                                 rel=1e-6)


def test_trainer_clipping_is_refused_with_the_fix(tmp_path):
    trainer = transformers.Trainer(model=TinyRegressor(), args=_args(tmp_path, 3, max_grad_norm=1.0),
                                   train_dataset=Data(64),
                                   callbacks=[GradWatchTrainerCallback(run_dir=False)])
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0\): the Trainer clips before"):
        trainer.train()


def test_resume_from_checkpoint_restores_the_statistics(tmp_path):
    def run(steps, resume=None):
        gw = GradWatchTrainerCallback(run_dir=False, warmup_steps=5)
        trainer = transformers.Trainer(
            model=TinyRegressor(spike_calls={21, 61}),
            args=_args(tmp_path, steps, save="steps", save_steps=20),
            train_dataset=Data(800), callbacks=[gw])
        trainer.train(resume_from_checkpoint=resume)
        return gw.monitor

    first = run(20)
    assert (tmp_path / "out" / "checkpoint-20" / "gradwatch_state.pt").is_file()
    saved = first.steps()
    second = run(40, resume=str(tmp_path / "out" / "checkpoint-20"))
    steps = second.steps()
    assert steps.step.iloc[0] == 20  # the count continues
    assert 10 in set(second.events().step)  # the first half's events came along
    state = torch.load(tmp_path / "out" / "checkpoint-20" / "gradwatch_state.pt",
                       weights_only=True)["detector"]["stats"]
    corrected = state["mean"][0] / state["mean_weight"][0]  # bias-corrected level
    assert steps.typical_norm.iloc[0] == pytest.approx(float(corrected.exp()), rel=1e-5)
    assert len(saved) == 20


def test_accelerate_loop_with_accumulation(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from gradwatch.integrations.accelerate import GradWatchAccelerate

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = TinyRegressor(spike_calls={SPIKE_STEP * ACCUMULATE + 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(Data(800), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    gw = GradWatchAccelerate(accelerator, model, optimizer, run_dir=False)
    given = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch)["loss"]
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                gw.step(loss=loss)
                given.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
    events = gw.monitor.events()
    assert list(gw.monitor.steps().loss) == pytest.approx(torch.stack(given).tolist())
    assert list(events.step) == [SPIKE_STEP] and events.action.iloc[0] == "clip_norm"
    assert len(gw.monitor.steps()) == 50
    with pytest.raises(RuntimeError, match="inside `if accelerator.sync_gradients:`"):
        with accelerator.accumulate(model):
            gw.step()


def test_metrics_reach_the_trainers_wandb_run(tmp_path):
    import wandb
    from wandb_reader import wait_for_exit

    model = TinyRegressor(spike_calls={SPIKE_STEP * ACCUMULATE + 1})
    gw = GradWatchTrainerCallback(run_dir=False, log_every=10)
    seen = {}

    class Grab(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["run"] = wandb.run

    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, 50, report_to="wandb", run_name="gw-hf"),
        train_dataset=Data(800), callbacks=[gw, Grab()])
    trainer.train()
    run_obj = seen["run"]
    assert gw.monitor._reporters.reporters[-1].run is run_obj  # the Trainer's own run
    path = run_obj.settings.sync_file
    wandb.finish()
    run = wait_for_exit(path)
    rows = [h for h in run.history if "gradwatch/global_norm" in h]
    assert [r["gradwatch/step"] for r in rows] == list(range(50))
    assert rows[SPIKE_STEP]["gradwatch/global_norm"] == pytest.approx(
        gw.monitor.steps().global_norm[SPIKE_STEP], rel=1e-6)


# ------------------------------------------------------------ AMP (fp16 GradScaler) on CPU
OVERFLOW_STEP = 20  # optimizer step whose loss is made inf (its second micro-batch)
INIT_SCALE = 2.0**10


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps the mixed-precision mode in a process-wide singleton that a later
    ``Accelerator()`` inherits (or refuses to change): start and leave a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _fp16_on_cpu(accelerator):
    """Give a CPU ``Accelerator(mixed_precision="fp16")`` the GradScaler it has on a GPU.

    On CPU Accelerate creates no scaler and leaves ``native_amp`` off
    (``Accelerator.__init__``), and without ``native_amp`` its ``unscale_gradients`` (what
    the Trainer's norm read and GradWatchAccelerate call) does nothing. Installed before
    ``prepare()``, the scaler wraps the optimizer (``AcceleratedOptimizer(scaler=...)``:
    ``scaler.step`` skips an inf step, ``scaler.update`` halves the scale) and
    ``accelerator.backward`` scales the loss with it; ``native_amp`` turns on that unscale
    and fp16 autocast, as on a GPU.
    """
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    accelerator.native_amp = True
    return accelerator.scaler


def _flat(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _assert_overflow_left_to_the_scaler(monitor, steps, true_norm, moved, scale_after, skipped):
    events = monitor.events()
    assert events[["step", "kind", "action"]].values.tolist() == [
        [OVERFLOW_STEP, "amp_overflow", "skip"]
    ]
    table = monitor.steps().set_index("step")
    assert list(table.index) == list(range(steps))  # training went on to the end
    assert list(table.index[table.nonfinite]) == [OVERFLOW_STEP]
    # The monitor measured the unscaled gradients (not loss scale x gradients).
    finite = table.index != OVERFLOW_STEP
    assert table.global_norm.values[finite] == pytest.approx(
        np.asarray(true_norm)[finite], rel=1e-5)
    # The scaler, not gradwatch, skipped exactly that step: parameters untouched there,
    # the scale halved once, every other step applied.
    assert skipped == [s == OVERFLOW_STEP for s in range(steps)]
    assert moved[OVERFLOW_STEP] == 0.0
    assert all(m > 0 for s, m in enumerate(moved) if s != OVERFLOW_STEP)
    assert scale_after == [INIT_SCALE] * OVERFLOW_STEP + [INIT_SCALE / 2] * (steps - OVERFLOW_STEP)
    # Later steps are ordinary: finite, not skipped, thresholds not poisoned by the inf.
    later = table.loc[OVERFLOW_STEP + 1 :]
    assert np.isfinite(later.global_norm).all() and np.isfinite(later.threshold).all()
    assert not (later.action == "skip").any()


def test_trainer_fp16_overflow_is_amp_overflow_left_to_the_scaler(tmp_path, fresh_accelerate_state):
    from torch.amp.grad_scaler import OptState

    steps = 30
    model = TinyRegressor(inf_calls={OVERFLOW_STEP * ACCUMULATE + 1})
    gw = GradWatchTrainerCallback(run_dir=False, warmup_steps=5)
    seen = {"stage": [], "norm": [], "moved": [], "scale": [], "skipped": []}

    class Watch(transformers.TrainerCallback):  # listed before gw: sees what gw measures
        def on_pre_optimizer_step(self, args, state, control, **kw):
            inner = trainer.optimizer.optimizer
            seen["stage"].append(scaler._per_optimizer_states[id(inner)]["stage"])
            grads = [p.grad for p in model.parameters()]
            seen["norm"].append(torch.nn.utils.get_total_norm(grads).item())
            self.before = _flat(model)

        def on_optimizer_step(self, args, state, control, **kw):
            seen["moved"].append((_flat(model) - self.before).norm().item())
            seen["scale"].append(scaler.get_scale())
            seen["skipped"].append(trainer.accelerator.optimizer_step_was_skipped)

    trainer = transformers.Trainer(model=model, args=_args(tmp_path, steps, fp16=True),
                                   train_dataset=Data(800), callbacks=[Watch(), gw])
    scaler = _fp16_on_cpu(trainer.accelerator)  # after the Trainer made its Accelerator
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()  # a second unscale_ before scaler.update() would raise here
    assert trainer.optimizer.scaler is scaler and gw.monitor.scaler is scaler
    assert not [w for w in caught if "gradwatch" in str(w.message)]
    # The Trainer's own norm read unscaled the gradients before the hook, so the norm the
    # hook sees is the true one.
    assert seen["stage"] == [OptState.UNSCALED] * steps
    _assert_overflow_left_to_the_scaler(gw.monitor, steps, seen["norm"], seen["moved"],
                                        seen["scale"], seen["skipped"])


def test_accelerate_fp16_overflow_is_amp_overflow_left_to_the_scaler(fresh_accelerate_state):
    accelerate = pytest.importorskip("accelerate")
    from gradwatch.integrations.accelerate import GradWatchAccelerate

    steps = 30
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="fp16",
                                         gradient_accumulation_steps=ACCUMULATE)
    scaler = _fp16_on_cpu(accelerator)
    model = TinyRegressor(inf_calls={OVERFLOW_STEP * ACCUMULATE + 1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(Data(steps * ACCUMULATE * 8), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert optimizer.scaler is scaler
    gw = GradWatchAccelerate(accelerator, model, optimizer, run_dir=False, warmup_steps=5)
    assert gw.monitor.scaler is scaler
    true_norm, moved, scale_after, skipped = [], [], [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch)["loss"])
                if accelerator.sync_gradients:
                    # What gw must measure: the (still scaled) gradients over the scale.
                    scaled = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
                    true_norm.append(scaled.item() / scaler.get_scale())
                    before = _flat(model)
                    gw.step()  # unscales; scaler.step below must not unscale again
                optimizer.step()
                if accelerator.sync_gradients:
                    moved.append((_flat(model) - before).norm().item())
                    scale_after.append(scaler.get_scale())
                    skipped.append(optimizer.step_was_skipped)
                optimizer.zero_grad()
    assert not [w for w in caught if "gradwatch" in str(w.message)]
    _assert_overflow_left_to_the_scaler(gw.monitor, steps, true_norm, moved, scale_after, skipped)


# ------------------------------------------------- resume: the same decisions after it
CKPT_STEP = 20
RESUME_STEPS = 40
RESUME_SPIKES = (10, 26, 33)  # optimizer steps whose second micro-batch has bad labels


def _rows_of_step(step, batch=8):
    """Sample indices of the second micro-batch of optimizer `step`, in sequential order."""
    start = (step * ACCUMULATE + 1) * batch
    return range(start, start + batch)


def _spiky_data():
    return Data(RESUME_STEPS * ACCUMULATE * 8,
                spikes=[i for s in RESUME_SPIKES for i in _rows_of_step(s)])


def _assert_same_decisions(full, resumed, first, last):
    """Every step from `first` on: same action, threshold and norm; the same events,
    those restored with the state included. Returns the events as (step, kind)."""
    a, b = full.steps(), resumed.steps()
    a, b = a[a.step >= first], b[b.step >= first]
    assert list(a.step) == list(b.step) == list(range(first, last))
    assert list(b.action) == list(a.action)
    assert b.threshold.values == pytest.approx(a.threshold.values, rel=1e-5, nan_ok=True)
    assert b.global_norm.values == pytest.approx(a.global_norm.values, rel=1e-5)
    columns = ["step", "kind", "action"]
    events = full.events()[columns].values.tolist()
    assert resumed.events()[columns].values.tolist() == events  # the restored ones too
    return [(step, kind) for step, kind, _ in events]


def test_resume_from_checkpoint_gives_the_same_decisions(tmp_path):
    data = _spiky_data()

    class StopAtCheckpoint(transformers.TrainerCallback):  # the job is killed there
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == CKPT_STEP:
                control.should_training_stop = True

    def run(folder, stop=False, resume=None, resume_from=None):
        gw = GradWatchTrainerCallback(run_dir=False, warmup_steps=5, resume_from=resume_from)
        args = _args(folder, RESUME_STEPS, save="steps", save_steps=CKPT_STEP,
                     train_sampling_strategy="sequential")
        trainer = transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=data,
                                       callbacks=[gw, StopAtCheckpoint()] if stop else [gw])
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == (CKPT_STEP if stop else RESUME_STEPS)
        return gw.monitor

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop=True)
    checkpoint = tmp_path / "cut" / "out" / f"checkpoint-{CKPT_STEP}"
    assert (checkpoint / "gradwatch_state.pt").is_file()
    resumed = run(tmp_path / "cut", resume=str(checkpoint))
    events = _assert_same_decisions(full, resumed, CKPT_STEP, RESUME_STEPS)
    assert events == [(s, "explosion") for s in RESUME_SPIKES]

    # A checkpoint moved elsewhere (another output_dir): the Trainer does not tell
    # callbacks where it resumed from, so a fresh start is announced with the fix ...
    moved = tmp_path / "moved" / "ckpt"
    shutil.copytree(checkpoint, moved)
    with pytest.warns(UserWarning, match=r"no gradwatch_state.pt in .*resume_from=<that "):
        fresh = run(tmp_path / "elsewhere", resume=str(moved))
    assert fresh.steps().step.iloc[0] == 0
    # ... and resume_from= restores it, with the same decisions.
    resumed = run(tmp_path / "elsewhere2", resume=str(moved), resume_from=moved)
    events = _assert_same_decisions(full, resumed, CKPT_STEP, RESUME_STEPS)
    assert events == [(s, "explosion") for s in RESUME_SPIKES]


def test_accelerate_resume_gives_the_same_decisions(tmp_path, fresh_accelerate_state):
    accelerate = pytest.importorskip("accelerate")
    from gradwatch.integrations.accelerate import GradWatchAccelerate

    data = _spiky_data()
    folder = str(tmp_path / "state")

    def run(stop_at=None, resume=False):
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
        model = TinyRegressor()
        # Momentum: optimizer state that has to come back too.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        gw = GradWatchAccelerate(accelerator, model, optimizer, run_dir=False, warmup_steps=5)
        accelerator.register_for_checkpointing(gw)  # its state_dict travels with save_state
        if resume:
            accelerator.load_state(folder)
            loader = accelerator.skip_first_batches(loader, CKPT_STEP * ACCUMULATE)
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch)["loss"])
                if accelerator.sync_gradients:
                    gw.step()
                optimizer.step()
                optimizer.zero_grad()
            if gw.monitor.num_steps == stop_at:
                accelerator.save_state(folder)
                break
        return gw.monitor

    full = run()
    run(stop_at=CKPT_STEP)
    resumed = run(resume=True)
    events = _assert_same_decisions(full, resumed, CKPT_STEP, RESUME_STEPS)
    assert events == [(s, "explosion") for s in RESUME_SPIKES]


# ------------------------------------------------------------ lifecycle: train() again
FIT_STEPS = 10  # optimizer steps in an epoch of _fit_data()


def _fit_data():
    # Bad labels in the second micro-batch of step 7 of every epoch.
    return Data(FIT_STEPS * ACCUMULATE * 8, spikes=_rows_of_step(7))


def test_a_second_train_continues_the_run(tmp_path):
    from gradwatch.run_record import load_run

    def trainer(folder, steps, gw, model=None):
        args = _args(folder, steps, train_sampling_strategy="sequential")
        return transformers.Trainer(model=model or TinyRegressor(), args=args,
                                    train_dataset=_fit_data(), callbacks=[gw])

    options = dict(log_every=4, warmup_steps=5)
    full = GradWatchTrainerCallback(run_dir=tmp_path / "full", **options)
    trainer(tmp_path / "a", 2 * FIT_STEPS, full).train()

    # train() twice on the same Trainer: the same batches in the same order as one
    # train() of both (an epoch is FIT_STEPS steps, SGD keeps no state).
    gw = GradWatchTrainerCallback(run_dir=tmp_path / "run", **options)
    same = trainer(tmp_path / "b", FIT_STEPS, gw)
    same.train()
    first = gw.monitor
    assert load_run(tmp_path / "run").meta["status"] == "finished"
    same.train()

    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(2 * FIT_STEPS))
    assert run.meta["status"] == "finished" and "error" not in run.meta
    assert [s["first_step"] for s in run.meta["sessions"]] == [0, FIT_STEPS]
    assert gw.monitor is not first and gw.monitor.num_steps == 2 * FIT_STEPS
    # The statistics went on from the first train(): no second warm-up.
    assert_record_decides_as(run, full.monitor)
    assert list(run.events.step) == [7, 17]

    # A second Trainer with the same callback (and model) goes on the same way.
    trainer(tmp_path / "c", 3, gw, model=same.model).train()
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(2 * FIT_STEPS + 3))
    assert run.meta["status"] == "finished"


class Failing(TinyRegressor):
    def forward(self, x, labels):
        if self.training and self.calls == self.fail_call:
            self.calls += 1
            raise FloatingPointError("the loss diverged")
        return super().forward(x, labels)


def test_a_train_after_one_that_raised_continues_the_run(tmp_path):
    from gradwatch.run_record import load_run

    model = Failing()
    model.fail_call = 7 * ACCUMULATE  # the first micro-batch of optimizer step 7
    gw = GradWatchTrainerCallback(run_dir=tmp_path / "run", log_every=4)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, 20),
                                   train_dataset=Data(800), callbacks=[gw])
    with pytest.raises(FloatingPointError, match="the loss diverged"):
        trainer.train()  # caught, as in a notebook
    # The Trainer has no exception hook for callbacks: the record says running.
    assert load_run(tmp_path / "run").meta["status"] == "running"
    trainer.train()
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(7 + 20))
    assert run.meta["status"] == "finished"


def test_report_to_tensorboard_writes_beside_the_trainers_own_scalars(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(out):
        gw = GradWatchTrainerCallback(run_dir=tmp_path / out / "run", log_every=10)
        args = _args(tmp_path / out, 20, report_to="tensorboard", logging_steps=5)
        trainer = transformers.Trainer(model=TinyRegressor(), args=args,
                                       train_dataset=Data(400), callbacks=[gw])
        trainer.train()
        assert not (tmp_path / out / "run" / "tensorboard").exists()  # beside the Trainer's
        return gw.monitor.steps()

    def scalars(folder):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        return acc

    # By default beside the Trainer's own run: <output_dir>/runs/gradwatch.
    steps = train("a")
    runs = tmp_path / "a" / "out" / "runs"
    (theirs,) = [p for p in runs.iterdir() if p.name != "gradwatch"]
    assert "train/loss" in scalars(theirs).Tags()["scalars"]
    norms = {e.step: e.value for e in scalars(runs / "gradwatch").Scalars("gradwatch/global_norm")}
    assert sorted(norms) == list(steps.step) == list(range(20))
    assert [norms[s] for s in range(20)] == pytest.approx(list(steps.global_norm), rel=1e-6)
    # With the Trainer's directory set, in that very directory.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    train("b")
    tags = scalars(tmp_path / "tb").Tags()["scalars"]
    assert "train/loss" in tags and "gradwatch/global_norm" in tags


def test_report_to_mlflow_logs_into_the_trainers_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    gw = GradWatchTrainerCallback(run_dir=False, log_every=10)
    trainer = transformers.Trainer(model=TinyRegressor(),
                                   args=_args(tmp_path, 20, report_to="mlflow", logging_steps=5),
                                   train_dataset=Data(400), callbacks=[gw])
    trainer.train()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert "train_loss" in run.data.metrics or "loss" in run.data.metrics  # the Trainer's
    norms = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                 "gradwatch/global_norm")}
    steps = gw.monitor.steps()
    assert sorted(norms) == list(range(20))
    assert [norms[s] for s in range(20)] == pytest.approx(list(steps.global_norm), rel=1e-6)
