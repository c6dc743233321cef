"""W&B runs shared with a framework's logger: Lightning's ``WandbLogger`` and the Hugging
Face Trainer (``report_to="wandb"``). Both declare ``define_metric("*", step_metric=<their
step>)``, a glob that matches gradwatch's keys as well as gradwatch's own
``gradwatch/*``; each gradwatch key must still be charted against ``gradwatch/step``.
Real offline runs, read back from their ``.wandb`` log."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wandb_reader import wait_for_exit

wandb = pytest.importorskip("wandb")

pytestmark = pytest.mark.slow  # each test trains with a framework and a W&B run

STEPS = 40  # optimizer steps: warm-up ends at 25, the last step is 39
LOG_EVERY = 10


def _logged_keys(run):
    """Every gradwatch key in the history (a histogram's parts folded into its key)."""
    keys = set()
    for h in run.history:
        for k in h:
            if k.startswith("gradwatch/"):
                hist = "/norm_hist/" in k or "/value_hist/" in k
                keys.add(k.rsplit("/", 1)[0] if hist else k)
    return keys - {"gradwatch/step"}


def _assert_on_gradwatch_step(run, framework_step):
    # The framework did declare its glob: the tie this test is about exists.
    globs = {(m.glob_name, m.step_metric) for m in run.metrics if m.glob_name}
    assert ("*", framework_step) in globs
    # Every gradwatch key is bound to gradwatch/step by its exact name ...
    bound = {m.name: m.step_metric for m in run.metrics if m.name}
    keys = _logged_keys(run)
    assert {"gradwatch/global_norm", "gradwatch/z", "gradwatch/norm_hist/net.0"} <= keys
    unbound = {k: bound.get(k) for k in keys if bound.get(k) != "gradwatch/step"}
    assert not unbound
    # ... and W&B honours it over the framework's "*": it syncs the framework's step
    # into rows of keys bound to it, and into none of gradwatch's rows.
    ours = [h for h in run.history if any(k.startswith("gradwatch/") for k in h)]
    bad = [sorted(h) for h in ours if framework_step in h]
    assert ours and not bad, [[k for k in b if "/_type" not in k and "/bins" not in k] for b in bad]
    assert any(framework_step in h for h in run.history)  # the framework logged too
    # The monitor's steps, consecutive, each logged once.
    rows = [h for h in ours if "gradwatch/actions/none" in h]
    assert [r["gradwatch/step"] for r in rows] == list(range(STEPS))
    # Norm histograms at the end of warm-up (the first flush after it) and at the end.
    hist = [h["gradwatch/step"] for h in ours if "gradwatch/norm_hist/net.0/values" in h]
    assert hist == [25, STEPS - 1]
    assert run.summary["gradwatch/global_norm"]["max"] > 0


def test_lightning_wandb_logger_run_charts_gradwatch_on_its_own_step(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.integrations.lightning import GradWatchCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)  # the host logs at every step too
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 8, generator=g)
    data = DataLoader(TensorDataset(x, x[:, :1] * 0.5), batch_size=8)
    logger = WandbLogger(project="gradwatch-tests", save_dir=str(tmp_path), offline=True)
    gw = GradWatchCallback(run_dir=False, log_every=LOG_EVERY)  # wandb="auto"
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[gw], logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", devices=1,
    )
    trainer.fit(Tiny(), data)
    assert gw.monitor._reporters.reporters[-1].run is logger.experiment
    path = logger.experiment.settings.sync_file
    logger.experiment.finish()
    _assert_on_gradwatch_step(wait_for_exit(path), "trainer/global_step")


def test_hf_trainer_wandb_run_charts_gradwatch_on_its_own_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradwatch.integrations.huggingface import GradWatchTrainerCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def forward(self, x, labels):
            return {"loss": nn.functional.mse_loss(self.net(x), labels)}

    class Data(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.x[i, :1] * 0.5}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to="wandb", run_name="gw-hf-steps", save_strategy="no",
        logging_steps=1,  # the Trainer logs at every step too
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    gw = GradWatchTrainerCallback(run_dir=False, log_every=LOG_EVERY)  # wandb="auto"
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=Data(STEPS * 8),
                                   callbacks=[gw])
    trainer.train()
    run = gw.monitor._reporters.reporters[-1].run
    assert run is not None and run is wandb.run  # the Trainer's own run
    path = run.settings.sync_file
    wandb.finish()
    _assert_on_gradwatch_step(wait_for_exit(path), "train/global_step")
