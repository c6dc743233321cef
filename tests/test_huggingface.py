"""GradWatchTrainerCallback on a real Hugging Face Trainer and GradWatchAccelerate in an
Accelerate loop (CPU, tiny models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from gradwatch.integrations.huggingface import GradWatchTrainerCallback  # noqa: E402

pytestmark = pytest.mark.slow

SPIKE_STEP = 30
ACCUMULATE = 2


class TinyRegressor(nn.Module):
    def __init__(self, spike_calls=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.spike_calls = set(spike_calls)
        self.calls = 0

    def forward(self, x, labels):
        loss = nn.functional.mse_loss(self.net(x), labels)
        if self.training:
            if self.calls in self.spike_calls:
                loss = loss * 1e4
            self.calls += 1
        return {"loss": loss}


class Data(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x[:, :1] * 0.5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _args(tmp_path, steps, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=ACCUMULATE, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=kwargs.pop("max_grad_norm", 0.0),
        report_to=kwargs.pop("report_to", "none"), save_strategy=kwargs.pop("save", "no"),
        logging_steps=1000, use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kwargs,
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
                       weights_only=True)["stats"]
    corrected = state["mean"][0] / (1 - 0.98 ** state["count"][0].float())
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
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch)["loss"])
            if accelerator.sync_gradients:
                gw.step()
            optimizer.step()
            optimizer.zero_grad()
    events = gw.monitor.events()
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
