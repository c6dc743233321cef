"""gradwatch in a Hugging Face Trainer: one callback, the Trainer's W&B run, a report.

A tiny model built from config (a 2-layer BERT-style encoder, no download) classifies
scikit-learn's handwritten digits, each image read as a sequence of 64 pixel tokens.
A few batches get their loss scaled by 1e3, a loss spike; the callback detects and
clips it. The Trainer must not clip itself: ``max_grad_norm=0``.

Run:  python examples/hf_trainer.py           (under a minute on CPU)
      torchrun --nproc_per_node 2 examples/hf_trainer.py   (two processes, gloo)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=Path("gradwatch_hf"))
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    import transformers
    from sklearn.datasets import load_digits

    from gradwatch.integrations.huggingface import GradWatchTrainerCallback
    from gradwatch.report import export_report

    digits = load_digits()
    tokens = torch.tensor(digits.data, dtype=torch.long)  # pixel values 0..16 as tokens
    labels = torch.tensor(digits.target)

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": labels[i]}

    config = transformers.BertConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=10)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    # Forward calls 120, 180, 240: optimizer steps 60, 90 and about 120 (an epoch of 113
    # batches ends with a lone micro-batch, which shifts the count by one).
    spike_calls = {120, 180, 240}

    class Spiky(transformers.Trainer):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs, **kwargs)
            if Spiky.calls in spike_calls:
                loss = loss * 1e3
            Spiky.calls += 1
            return loss

    watch = GradWatchTrainerCallback(run_dir=args.out / "run", log_every=10)
    targs = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=16, gradient_accumulation_steps=2, learning_rate=3e-4,
        max_grad_norm=0.0, report_to="wandb", run_name="gradwatch-hf-example",
        logging_steps=25, save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Spiky(model=model, args=targs, train_dataset=Digits(), callbacks=[watch])
    trainer.train()

    events = watch.monitor.events()
    actions = watch.monitor.steps()["action"].value_counts().to_dict()
    print(f"process {targs.process_index}: actions {actions}; {len(events)} event(s)",
          flush=True)
    if not trainer.is_world_process_zero():
        return 0  # the main process alone recorded the run
    for ev in events.itertuples():
        print(f"  step {ev.step:4d} {ev.kind:10s} {ev.action:10s} layer {ev.layer}: {ev.reason[:110]}")
    print(f"report: {export_report(args.out / 'run', args.out / 'report.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
