"""Experiment 1: the gradient-clipping tutorial experiment, done properly.

An MLP (64-256-256-10) learns scikit-learn's handwritten digits with SGD (momentum
0.9) at a learning rate where plain training diverges, with raw 0-16 pixel inputs and
with normalised ones, under each clipping method, over several seeds. Every method
sees exactly the same batches for a given seed.

    python benchmarks/efficacy/digits.py          # 10 seeds, writes digits.md and .png
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402
import methods as M  # noqa: E402

STEPS = 500
SPECS = [
    ("none", {}),
    ("value", {"threshold": 0.1}),
    ("value", {"threshold": 1.0}),
    ("norm", {"threshold": 0.5}),
    ("norm", {"threshold": 1.0}),
    ("norm", {"threshold": 5.0}),
    ("zclip", {}),  # ZClip's defaults, which include a fixed ceiling max_grad_norm=1.0
    ("zclip", {"max_grad_norm": None}),  # its adaptive rule alone
    ("autoclip", {}),
    ("gradwatch", {}),
    ("gradwatch", {"max_norm": 1.0}),  # with the same ceiling as ZClip's default
]
SETTINGS = [("raw inputs", False, 0.05), ("normalised inputs", True, 0.3)]


def load(normalise: bool):
    return M.load_digits(normalise)


def run(data, spec, seed: int, lr: float) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model, opt, hook, g = M.setup(spec, seed, 256, lr)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x_tr), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        hook(model)
        opt.step()
    test_loss, acc = M.evaluate(model, x_te, y_te)
    clipped = hook.clipped()
    if hook.monitor is not None:
        hook.monitor.detach()
    return {"name": hook.name, "accuracy": acc if math.isfinite(test_loss) else 0.0,
            "diverged": not math.isfinite(test_loss) or acc < 0.2,
            "clipped": sum(clipped) / STEPS}


def plot(results: dict[str, list[tuple[str, float, int]]], path: Path) -> None:
    with C.figure(path, 1, len(results), figsize=(10, 3.6), sharey=True) as (fig, axes):
        for ax, (title, rows) in zip(axes, results.items()):
            names = [r[0] for r in rows]
            colors = ["tab:blue" if n.startswith("gradwatch") else "0.6" for n in names]
            ax.barh(names, [r[1] for r in rows], color=colors)
            for i, (_, acc, div) in enumerate(rows):
                if div:
                    ax.text(acc + 0.01, i, f"{div} diverged", va="center", fontsize=7)
            ax.set_xlim(0, 1.15)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("mean test accuracy")
        axes[0].invert_yaxis()  # shared: once for both


def main(argv=None) -> int:
    args = C.parser(__doc__, "digits", seeds=10, plot="PNG of the accuracies").parse_args(argv)
    lines = [
        "# Experiment 1: the clipping tutorial experiment", "",
        f"Produced by `python benchmarks/efficacy/digits.py --seeds {args.seeds}`. MLP "
        f"64-256-256-10, SGD with momentum 0.9, batch 32, {STEPS} steps; mean test "
        f"accuracy over {args.seeds} seeds (a diverged run counts as 0), runs that "
        "diverged (non-finite loss or accuracy under 20 %), and the share of steps each "
        "method clipped. The learning rate is one at which plain training diverges on "
        "most seeds.", "",
    ]
    results: dict[str, list[tuple[str, float, int]]] = {}
    for title, normalise, lr in SETTINGS:
        data = load(normalise)
        lines += [f"## {title}, lr {lr}", "",
                  "| method | accuracy | diverged | steps clipped |", "|---|---|---|---|"]
        for spec in SPECS:
            res = [run(data, spec, seed, lr) for seed in range(args.seeds)]
            name = res[0]["name"]
            acc = statistics.mean(r["accuracy"] for r in res)
            div = sum(r["diverged"] for r in res)
            clipped = statistics.mean(r["clipped"] for r in res)
            print(f"{title:18s} {name:10s} acc {acc:.3f} diverged {div}/{args.seeds} "
                  f"clipped {100 * clipped:.1f}%", flush=True)
            lines.append(f"| {name} | {acc:.3f} | {div}/{args.seeds} | {100 * clipped:.1f}% |")
            results.setdefault(f"{title}, lr {lr}", []).append((name, acc, div))
        lines.append("")
    if args.plot is not None:
        plot(results, args.plot)
        lines += [C.image_link("mean accuracy per method", args.plot, args.out), ""]
    C.write(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
