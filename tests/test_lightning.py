"""GradWatchCallback on a real Lightning Trainer (CPU, tiny model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402
from gradwatch.run_record import load_run  # noqa: E402
from helpers import assert_record_decides_as  # noqa: E402
from wandb_reader import wait_for_exit  # noqa: E402

pytestmark = pytest.mark.slow

SPIKE_STEP = 30  # optimizer step (= monitor step) whose gradients are blown up
ACCUMULATE = 2


class Tiny(pl.LightningModule):
    def __init__(self, spike_batches=(), bad_batches=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spike_batches = set(spike_batches)
        self.bad_batches = set(bad_batches)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if batch_idx in self.spike_batches:
            loss = loss * 1e4
        if batch_idx in self.bad_batches:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n_batches, spike_batches=()):
    """``spike_batches``: batches whose labels are corrupted (off by 100): a spike that
    travels with the data, unlike a batch_idx or a counter kept in the module."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 8, 8, generator=g)
    y = x[:, :1] * 0.5 + 0.1 * torch.randn(n_batches * 8, 1, generator=g)
    for b in spike_batches:
        y[b * 8 : (b + 1) * 8] += 100.0
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class ParamDelta(pl.Callback):
    """Records how far the parameters moved at each optimizer step."""

    def __init__(self):
        self.before = None
        self.moves = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None:
            after = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
            self.moves[trainer.global_step - 1] = (after - self.before).norm().item()
            self.before = None


def _trainer(tmp_path, callbacks, steps, **kwargs):
    return pl.Trainer(
        max_steps=steps, callbacks=callbacks,
        accumulate_grad_batches=kwargs.pop("accumulate_grad_batches", ACCUMULATE),
        logger=kwargs.pop("logger", False), enable_checkpointing=kwargs.pop("ckpt", False),
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", devices=1, **kwargs,
    )


def test_spike_detected_at_the_right_step_and_clipped(tmp_path):
    spike_batch = SPIKE_STEP * ACCUMULATE + 1  # the second micro-batch of step 30
    module = Tiny(spike_batches={spike_batch})
    gw = GradWatchCallback(run_dir=tmp_path / "run", log_every=10)
    delta = ParamDelta()
    _trainer(tmp_path, [gw, delta], 50).fit(module, _data(100))
    events = gw.monitor.events()
    assert list(events.step) == [SPIKE_STEP]
    assert events.kind.iloc[0] == "explosion" and events.action.iloc[0] == "clip_norm"
    steps = gw.monitor.steps().set_index("step")
    assert len(steps) == 50  # one monitor step per optimizer step, not per micro-batch
    clipped = steps.loc[SPIKE_STEP, "clipped_norm"]
    assert clipped <= steps.loc[SPIKE_STEP, "threshold"] * 1.0001
    # SGD: the parameters moved by lr * the clipped norm, not by lr * the spike.
    assert delta.moves[SPIKE_STEP] == pytest.approx(0.05 * clipped, rel=1e-3)
    assert steps.loc[SPIKE_STEP, "global_norm"] > 100 * clipped
    # The update ratio is measured around Lightning's optimizer step (with its
    # closure), once per logging interval.
    hist = gw.monitor.history()
    assert sorted(set(hist[hist.update_ratio > 0].step)) == [0, 10, 20, 30, 40]


class LossKeeping(Tiny):
    """Keeps every training_step loss, to compare with what the monitor recorded."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().float().item())
        return loss


@pytest.mark.parametrize("accumulate", [1, ACCUMULATE])
def test_the_loss_of_each_step_is_the_mean_of_its_training_step_losses(tmp_path, accumulate):
    module = LossKeeping()
    gw = GradWatchCallback(run_dir=tmp_path / "run", log_every=10)
    _trainer(tmp_path, [gw], 12, accumulate_grad_batches=accumulate).fit(module, _data(100))
    steps = gw.monitor.steps()
    per_step = torch.tensor(module.losses).reshape(12, accumulate).mean(dim=1)
    assert steps["loss"].tolist() == pytest.approx(per_step.tolist(), rel=1e-5)
    assert steps["lr"].tolist() == pytest.approx([0.05] * 12, rel=1e-6)
    run = load_run(tmp_path / "run")
    assert run.steps["loss"].tolist() == steps["loss"].tolist()


def test_trainer_clipping_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"gradient_clip_val=1.0\) clips after GradWatchCallback"):
        _trainer(tmp_path, [GradWatchCallback(run_dir=False)], 5,
                 gradient_clip_val=1.0).fit(Tiny(), _data(10))


def test_resume_from_checkpoint_restores_the_statistics(tmp_path):
    # 40 batches = 20 optimizer steps an epoch; checkpoint after step 20 (the end of epoch
    # 0), written at that step: an epoch-end checkpoint with max_steps resumes one step
    # late (see LIGHTNING_EPOCH_END_RESUME below).
    spikes = {21, 31}  # steps 10 and 15 of every epoch
    options = dict(run_dir=False, warmup_steps=5)
    full = GradWatchCallback(**options)
    _trainer(tmp_path / "a", [full], 40).fit(Tiny(spikes), _data(40))

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20,
                                           save_top_k=-1)
    first = GradWatchCallback(**options)
    _trainer(tmp_path / "b", [first, ckpt_cb], 20, ckpt=True).fit(Tiny(spikes), _data(40))
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    second = GradWatchCallback(**options)
    _trainer(tmp_path / "b", [second], 40).fit(Tiny(spikes), _data(40), ckpt_path=ckpt)

    a = full.monitor.steps().set_index("step")
    b = second.monitor.steps().set_index("step")
    assert list(b.index) == list(range(20, 40))  # the step count continues
    # The statistics at the first resumed step are exactly those of the uninterrupted
    # run; the events of the first half came along.
    assert b.loc[20, "threshold"] == a.loc[20, "threshold"]
    assert b.loc[20, "typical_norm"] == a.loc[20, "typical_norm"]
    events = second.monitor.events()
    assert {10, 15} <= set(events.step)
    assert list(events.query("step >= 20 and kind == 'explosion'").step) == [30, 35]  # epoch 1's


CKPT_STEP = 20  # = the end of epoch 0: 40 batches of 2 micro-batches per step
LIGHTNING_EPOCH_END_RESUME = (
    "Lightning 2.6: with max_steps set, restarting is "
    "forced and a checkpoint written in on_train_epoch_end restores as 'restarted on epoch "
    "end'; with no validation loop to wait for, the epoch loop is not done, so the resumed "
    "run trains one extra optimizer step on a single micro-batch (batch_idx 40: the first "
    "batch of a fresh iterator) before epoch 1, and every later batch lands one step late "
    "(spikes at 31/36 instead of 30/35). Not a gradwatch bug: the data differ."
)


@pytest.mark.parametrize(
    "checkpoint, by_epochs",
    [
        pytest.param(dict(every_n_train_steps=CKPT_STEP), False, id="step-checkpoint"),
        pytest.param(dict(every_n_epochs=1, save_on_train_epoch_end=True), True,
                     id="epoch-end-checkpoint-max_epochs"),
        pytest.param(dict(every_n_epochs=1, save_on_train_epoch_end=True), False,
                     id="epoch-end-checkpoint-max_steps",
                     marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                             reason=LIGHTNING_EPOCH_END_RESUME)),
    ],
)
def test_resume_from_checkpoint_gives_the_same_decisions(tmp_path, checkpoint, by_epochs):
    # The spikes are in the data (batches 21 and 31 of every epoch: steps 10 and 15, then
    # 30 and 35), not in a counter of the module, which a checkpoint does not restore.
    def data():
        return _data(2 * CKPT_STEP, spike_batches={21, 31})

    def limit(steps):  # counted by Lightning in epochs or in optimizer steps
        return dict(steps=-1, max_epochs=steps // CKPT_STEP) if by_epochs else dict(steps=steps)

    options = dict(run_dir=False, warmup_steps=5)
    full = GradWatchCallback(**options)
    _trainer(tmp_path / "full", [full], **limit(2 * CKPT_STEP)).fit(Tiny(), data())

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, **checkpoint)
    first = GradWatchCallback(**options)
    _trainer(tmp_path / "cut", [first, saver], ckpt=True, **limit(CKPT_STEP)).fit(Tiny(), data())
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = GradWatchCallback(**options)
    _trainer(tmp_path / "cut", [resumed], **limit(2 * CKPT_STEP)).fit(Tiny(), data(),
                                                                       ckpt_path=ckpt)

    a, b = full.monitor.steps(), resumed.monitor.steps()
    a, b = a[a.step >= CKPT_STEP], b[b.step >= CKPT_STEP]
    assert list(a.step) == list(b.step) == list(range(CKPT_STEP, 2 * CKPT_STEP))
    assert list(b.action) == list(a.action)
    assert b.threshold.values == pytest.approx(a.threshold.values, rel=1e-5, nan_ok=True)
    assert b.global_norm.values == pytest.approx(a.global_norm.values, rel=1e-5)
    columns = ["step", "kind", "action"]
    events = full.monitor.events()[columns].values.tolist()
    assert resumed.monitor.events()[columns].values.tolist() == events  # restored ones too
    assert [(s, k) for s, k, _ in events] == [(10, "explosion"), (15, "explosion"),
                                              (30, "explosion"), (35, "explosion")]


def test_grad_scaler_overflow_is_amp_overflow(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    gw = GradWatchCallback(run_dir=False)
    module = Tiny(bad_batches={41})  # optimizer step 20
    _trainer(tmp_path, [gw], 30, plugins=[plugin]).fit(module, _data(100))
    events = gw.monitor.events()
    assert "amp_overflow" in set(events.kind) and "explosion" not in set(events.kind)
    assert 20 in set(events.query("kind == 'amp_overflow'").step)
    # The loss recorded is unscaled: the loss scale (65536 at first) is divided out.
    loss = gw.monitor.steps()["loss"]
    assert 0 < loss.iloc[0] < 100 and loss.drop(index=20).notna().all()


def test_metrics_reach_the_wandb_logger_run(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="gradwatch-tests", save_dir=str(tmp_path), offline=True)
    gw = GradWatchCallback(run_dir=False, log_every=10)
    module = Tiny(spike_batches={SPIKE_STEP * ACCUMULATE + 1})
    _trainer(tmp_path, [gw], 50, logger=logger).fit(module, _data(100))
    run_file = logger.experiment.settings.sync_file
    logger.experiment.finish()
    run = wait_for_exit(run_file)
    rows = [h for h in run.history if "gradwatch/global_norm" in h]
    assert [r["gradwatch/step"] for r in rows] == list(range(50))
    steps = gw.monitor.steps()
    assert rows[SPIKE_STEP]["gradwatch/global_norm"] == pytest.approx(
        steps.global_norm[SPIKE_STEP], rel=1e-6)
    (alert,) = run.alerts
    assert alert["title"].startswith("gradwatch: gradient explosion")
    assert f"step {SPIKE_STEP}," in f"{alert['title']}, {alert['text']}".lower()


def test_metrics_reach_a_csv_logger(tmp_path):
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    gw = GradWatchCallback(run_dir=False, log_every=10)
    _trainer(tmp_path, [gw], 30, logger=logger).fit(Tiny(), _data(100))
    logged = pd.read_csv(logger.log_dir + "/metrics.csv")
    rows = logged.dropna(subset=["gradwatch/global_norm"]).set_index("step")
    steps = gw.monitor.steps().set_index("step")
    assert list(rows.index) == list(range(30))
    assert rows["gradwatch/global_norm"].values == pytest.approx(steps.global_norm.values, rel=1e-6)
    assert "gradwatch/grad_norm/net.0" in rows.columns
    assert rows["gradwatch/loss"].values == pytest.approx(steps.loss.values, rel=1e-6)
    assert rows["gradwatch/lr"].values == pytest.approx([0.05] * 30, rel=1e-6)
    # The same key scheme as W&B and TensorBoard: cumulative counts of each action.
    counts = (steps.action == "none").cumsum()
    assert rows["gradwatch/actions/none"].values == pytest.approx(counts.values)
    assert rows["gradwatch/actions/skip"].max() == 0


class TinyLBFGS(Tiny):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_is_watched_at_every_closure_evaluation(tmp_path):
    # Lightning calls on_before_optimizer_step after each of LBFGS's closure
    # evaluations; gradwatch, refused as LBFGS's gate, measures each of them.
    callback = GradWatchCallback(run_dir=False, nonfinite="zero")
    evaluations = []

    class Count(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            evaluations.append(trainer.global_step)

    trainer = pl.Trainer(max_steps=5, callbacks=[callback, Count()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu", devices=1)
    with pytest.warns(UserWarning, match="LBFGS evaluates its closure several times"):
        trainer.fit(TinyLBFGS(), _data(20))
    assert trainer.global_step == 5
    steps = callback.monitor.steps()
    assert len(steps) == len(evaluations) > 5  # every evaluation, several a step
    assert steps.global_norm.notna().all()


# ------------------------------------------------------------ lifecycle: fits that end
FIT_STEPS = 10  # optimizer steps in an epoch of _data(2 * FIT_STEPS)


def test_a_second_fit_continues_the_run(tmp_path):
    # Two fits of the same module with the same callback meet the same batches, in the
    # same order, as one fit of their steps together (an epoch is FIT_STEPS steps and
    # SGD keeps no state): the second continues the first's statistics and record.
    def data():
        return _data(2 * FIT_STEPS, spike_batches={15})  # step 7 of every epoch

    options = dict(log_every=4, warmup_steps=5)
    full = GradWatchCallback(run_dir=tmp_path / "full", **options)
    _trainer(tmp_path / "a", [full], 2 * FIT_STEPS + 2).fit(Tiny(), data())

    gw = GradWatchCallback(run_dir=tmp_path / "run", **options)
    module = Tiny()
    _trainer(tmp_path / "b", [gw], FIT_STEPS).fit(module, data())
    first = gw.monitor
    assert load_run(tmp_path / "run").meta["status"] == "finished"
    _trainer(tmp_path / "c", [gw], FIT_STEPS + 2).fit(module, data())

    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(2 * FIT_STEPS + 2))
    assert run.meta["status"] == "finished" and "error" not in run.meta
    assert [s["first_step"] for s in run.meta["sessions"]] == [0, FIT_STEPS]
    assert gw.monitor is not first and gw.monitor.num_steps == 2 * FIT_STEPS + 2
    assert list(gw.monitor.steps().step) == list(range(FIT_STEPS, 2 * FIT_STEPS + 2))
    # The statistics went on from the first fit: the same thresholds and decisions as
    # the uninterrupted fit, not a second warm-up.
    assert_record_decides_as(run, full.monitor)
    assert list(run.events.step) == [7, 17]


FAIL_STEP = 7  # the optimizer step whose first training_step raises


class Failing(Tiny):
    def training_step(self, batch, batch_idx):
        if batch_idx == FAIL_STEP * ACCUMULATE:
            raise FloatingPointError("the loss diverged")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_raises_is_recorded_as_crashed(tmp_path):
    # Caught, as in a notebook: no interpreter exit closes the record.
    gw = GradWatchCallback(run_dir=tmp_path / "run", log_every=4)
    with pytest.raises(FloatingPointError, match="the loss diverged"):
        _trainer(tmp_path, [gw], 50).fit(Failing(), _data(100))
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(FAIL_STEP))  # the buffered rows too
    assert run.meta["status"] == "crashed" and run.meta["error"] == "FloatingPointError"

    # Fixed and fitted again with the same callback: the run goes on from there.
    _trainer(tmp_path, [gw], 5).fit(Tiny(), _data(100))
    run = load_run(tmp_path / "run")
    assert list(run.steps.step) == list(range(FAIL_STEP + 5))
    assert run.meta["status"] == "finished" and "error" not in run.meta
