"""Experiment 3: injected faults with ground truth.

An MLP learns scikit-learn's handwritten digits (normalised inputs, SGD with momentum
at a sane learning rate). At known steps a fault is injected into the batch:

* ``loss_spike``: the batch's loss multiplied by 1e2, 1e3 or 1e4;
* ``outlier``: one input component of one sample set to 1e3;
* ``bad_labels``: the batch's labels replaced by random ones;
* ``nan``: one input value NaN (so the loss and every gradient are NaN);
* ``lr_blowup``: from a step on, the learning rate grows 10 % per step for 40 steps.

For each method (the same batches, one stream per kind of fault): which faults it flagged
(precision, recall, latency in steps), what it did at the fault steps, and the final
test loss against the same method trained without faults.

    python benchmarks/efficacy/faults.py            # 5 seeds, writes faults.md and .png
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from gradwatch.demo import inject

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402
import methods as M  # noqa: E402

STEPS = 650
LR = 0.05
# One stream per kind of fault, each injected three times (or once, for the blow-up),
# so a fault that wrecks one method (a NaN) does not hide how it handles the others.
KINDS = {
    "loss_spike": [(200, 1e2), (350, 1e3), (500, 1e4)],
    "outlier": [(200, 1e2), (350, 1e3), (500, 1e4)],
    "bad_labels": [(200, None), (350, None), (500, None)],
    "nan": [(200, None), (350, None), (500, None)],
    "lr_blowup": [(450, None)],
}
BLOWUP_LEN = 40  # the learning rate grows 10 % a step for this many steps
# A detection counts for a fault when it happens at the fault step or within this
# many steps after it (a fault's effect on the optimizer state lasts a few steps).
WINDOW = 3


def load():
    return M.load_digits(normalise=True)


METHOD_SPECS = [
    ("none", {}),
    ("norm", {"threshold": 1.0}),
    ("zclip", {}),  # ZClip's defaults, which include a fixed ceiling max_grad_norm=1.0
    ("zclip", {"max_grad_norm": None}),  # its adaptive rule alone
    ("autoclip", {}),
    ("gradwatch", {}),
]


def run(data, spec, seed: int, kind: str | None, keep_monitor: bool = False) -> dict:
    """Train one model with ``spec``'s method; ``kind``: the fault stream (None: clean)."""
    x_tr, y_tr, x_te, y_te = data
    model, opt, hook, g = M.setup(spec, seed, 128, LR)
    faults = dict(KINDS[kind]) if kind else {}
    for step in range(STEPS):
        idx = torch.randint(0, len(x_tr), (32,), generator=g)
        xb, yb = x_tr[idx].clone(), y_tr[idx].clone()
        noise = torch.randint(0, 10, yb.shape, generator=g)  # drawn every step alike
        scale, lr = 1.0, LR
        if step in faults:
            xb, yb, scale = inject(kind, xb, yb, noise, faults[step] or 1.0)
        if kind == "lr_blowup":
            start = KINDS[kind][0][0]
            if start <= step < start + BLOWUP_LEN:
                lr = LR * 1.1 ** (step - start + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = nn.functional.cross_entropy(model(xb), yb) * scale
        opt.zero_grad()
        loss.backward()
        hook(model)
        opt.step()
    test_loss, acc = M.evaluate(model, x_te, y_te)
    clipped = hook.clipped()
    if hook.monitor is not None:  # gradwatch chooses: clip by norm or by value, or skip
        actions = [str(a) for a in hook.monitor.steps().action]
    else:  # the others only ever scale the whole gradient
        actions = ["clip_norm" if c else "none" for c in clipped]
    out = {"test_loss": test_loss, "accuracy": acc, "flagged": hook.flagged(),
           "clipped": clipped, "actions": actions, "name": hook.name, "pre": hook.pre}
    if hook.monitor is not None:
        hook.monitor.detach()
        if keep_monitor:
            out["monitor"] = hook.monitor
    return out


def score(kind: str, flagged: set[int]) -> dict:
    """Recall and latency over the injections of ``kind``; flags outside every fault
    window are false alarms (precision: the share of flags inside one)."""
    latency, covered = [], set()
    hits = 0
    for step, _ in KINDS[kind]:
        end = step + (BLOWUP_LEN if kind == "lr_blowup" else WINDOW)
        covered |= set(range(step, end + 1))
        near = [f for f in flagged if step <= f <= end]
        if near:
            hits += 1
            latency.append(min(near) - step)
    false_alarms = len([f for f in flagged if f not in covered])
    return {"recall": hits / len(KINDS[kind]), "latency": latency,
            "false_alarms": false_alarms, "true_flags": len(flagged) - false_alarms}


def precision(entry: dict) -> float:
    """Flags inside a fault window over all flags, pooled over every fault stream."""
    true = sum(r["score"]["true_flags"] for k in KINDS for r in entry[k])
    false = sum(r["score"]["false_alarms"] for k in KINDS for r in entry[k])
    return true / (true + false) if true + false else math.nan


def action_cell(kind: str, runs: list[dict]) -> str:
    """What the method did at the injected steps, over the seeds (for the blow-up, the
    share of its steps that were clipped)."""
    if kind == "lr_blowup":
        start = KINDS[kind][0][0]
        window = [a for r in runs for a in r["actions"][start:start + BLOWUP_LEN]]
        return f"clipped {100 * sum(a != 'none' for a in window) / len(window):.0f} %"
    counts: dict[str, int] = {}
    for r in runs:
        for step, _ in KINDS[kind]:
            counts[r["actions"][step]] = counts.get(r["actions"][step], 0) + 1
    return ", ".join(f"{a} {n}" for a, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def rise_onset(pre: list[float], start: int) -> int | None:
    """Steps from ``start`` to where the norm itself began to rise: its 5-step median
    above twice the median of the 50 steps before ``start`` (None: it did not)."""
    before = statistics.median(pre[start - 50:start])
    for t in range(start, min(len(pre), start + BLOWUP_LEN)):
        window = [v if math.isfinite(v) else math.inf for v in pre[t:t + 5]]
        if statistics.median(window) > 2 * before:
            return t - start
    return None


def blowup_rows(table) -> list[str]:
    """Per method: when the norm began to rise and when the method first flagged,
    both in steps after the learning rate began to grow (means over the seeds)."""
    start = KINDS["lr_blowup"][0][0]
    rows = []
    for name, entry in table.items():
        onsets, flags, gaps = [], [], []
        for r in entry["lr_blowup"]:
            onset = rise_onset(r["pre"], start)
            first = r["score"]["latency"][0] if r["score"]["latency"] else None
            if onset is not None:
                onsets.append(onset)
            if first is not None:
                flags.append(first)
            if onset is not None and first is not None:
                gaps.append(first - onset)
        fmt = lambda v: f"{statistics.mean(v):.1f}" if v else "–"  # noqa: E731
        rows.append(f"| {name} | {fmt(onsets)} ({len(onsets)}) | {fmt(flags)} | {fmt(gaps)} |")
    return rows


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else float("nan")


def main(argv=None) -> int:
    args = C.parser(__doc__, "faults", seeds=5,
                    plot="PNG of seed 0's loss-spike and blow-up streams").parse_args(argv)
    data = load()
    table = {}
    for spec in METHOD_SPECS:
        for seed in range(args.seeds):
            clean = run(data, spec, seed, None)
            name = clean["name"]
            entry = table.setdefault(name, {"clean": [], **{k: [] for k in KINDS}})
            entry["clean"].append(clean)
            for kind in KINDS:
                faulty = run(data, spec, seed, kind)
                faulty["score"] = score(kind, faulty["flagged"])
                faulty["damage"] = faulty["test_loss"] - clean["test_loss"]
                entry[kind].append(faulty)
            print(f"{name:10s} seed {seed}: " + ", ".join(
                f"{k} {entry[k][-1]['score']['recall']:.2f}/{entry[k][-1]['accuracy']:.2f}"
                for k in KINDS), flush=True)
    write(args, table)
    if args.plot is not None:
        plot(data, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(data, path: Path, seed: int = 0) -> None:
    """Seed ``seed``'s loss-spike and learning-rate blow-up streams: the global norm,
    gradwatch's clipping threshold and flags, ZClip's flags, the injections."""
    with C.figure(path, 1, 2, figsize=(10, 3.4)) as (fig, axes):
        for ax, kind in zip(axes, ("loss_spike", "lr_blowup")):
            watched = run(data, ("gradwatch", {}), seed, kind, keep_monitor=True)
            zclip = run(data, ("zclip", {"max_grad_norm": None}), seed, kind)
            steps = watched["monitor"].steps()
            ax.semilogy(steps.step, steps.global_norm, lw=0.7, color="0.45", label="gradient norm")
            ax.semilogy(steps.step, steps.threshold, lw=1.0, color="tab:blue",
                        label="gradwatch threshold")
            for i, (step, _) in enumerate(KINDS[kind]):
                end = step + (BLOWUP_LEN if kind == "lr_blowup" else 0)
                ax.axvspan(step - 1, end + 1, color="tab:red", alpha=0.15,
                           label="injected" if i == 0 else None)
            top = steps.global_norm.max() * 2
            for name, flagged, y, marker in (("gradwatch flags", watched["flagged"], top, "v"),
                                             ("ZClip (no ceiling) flags", zclip["flagged"],
                                              top * 1.8, "x")):
                xs = sorted(flagged)
                ax.scatter(xs, [y] * len(xs), marker=marker, s=14, label=name)
            ax.set_title(f"{kind}, seed {seed}", fontsize=9)
            ax.set_xlabel("step")
        axes[0].set_ylabel("global gradient norm")
        axes[1].legend(fontsize=7, loc="lower left")


def _cell(runs: list[dict]) -> str:
    recall = mean(r["score"]["recall"] for r in runs)
    lat = [x for r in runs for x in r["score"]["latency"]]
    diverged = sum(not math.isfinite(r["test_loss"]) or r["accuracy"] < 0.2 for r in runs)
    damage = statistics.median(r["damage"] for r in runs)
    text = f"{recall:.2f}"
    text += f" / {statistics.mean(lat):.1f}" if lat else " / –"
    if diverged:
        text += f" / **{diverged} diverged**"
    else:
        text += f" / {damage:+.3f}"
    return text


def write(args, table) -> None:
    kinds = list(KINDS)
    lines = [
        "# Experiment 3: injected faults with ground truth", "",
        f"Produced by `python benchmarks/efficacy/faults.py --seeds {args.seeds}`. A digits "
        f"MLP (64-128-128-10, normalised inputs, SGD with momentum 0.9, lr {LR}, batch 32, "
        f"{STEPS} steps) trained once clean and once per fault stream, on the same batches, "
        f"for each of {args.seeds} seeds. Faults: `loss_spike` (the batch loss ×1e2, ×1e3, "
        "×1e4), `outlier` (one input component of one sample set to 1e2, 1e3, 1e4), "
        "`bad_labels` (a batch with random labels, three times), `nan` (a NaN input, three "
        f"times), `lr_blowup` (the learning rate growing 10 % a step for {BLOWUP_LEN} "
        "steps).", "",
        f"Each cell: **recall** (share of injections flagged within {WINDOW} steps, or "
        "during the blow-up) / **latency** (steps from injection to the first flag) / "
        "**damage** (median increase of the final test loss over the same method's clean "
        "run; or how many seeds diverged). Flagged means: gradwatch's events; ZClip's "
        "z-score rule firing after its warm-up (not a clip by its fixed ceiling); "
        "AutoClip's clips (norms above its running quantile). Fixed clipping flags "
        "nothing. **Precision**: the share of a method's flags on the fault streams that "
        "fall inside a fault's window (a flag after it, while the optimizer's momentum "
        "still carries the fault, counts against it). The last columns are on the clean "
        "runs: false alarms per 1,000 steps, "
        "the share of steps the method clipped, the clean accuracy, and the blow-up "
        "recall a method would reach by chance: the probability that at least one of "
        f"its clean-run flags (at its false-alarm rate) lands in the {BLOWUP_LEN + 1}-step "
        "blow-up window. A blow-up recall near that number says little.", "",
        "| method | " + " | ".join(kinds) + " | precision | false alarms / 1k steps (clean) | "
        "steps clipped (clean) | accuracy (clean) | blow-up recall by chance |",
        "|---|" + "---|" * (len(kinds) + 5),
    ]
    for name, entry in table.items():
        clean = entry["clean"]
        false_alarms = mean(len(r["flagged"]) * 1000 / STEPS for r in clean)
        clipped = mean(sum(r["clipped"]) / STEPS for r in clean)
        acc = mean(r["accuracy"] for r in clean)
        chance = 1 - (1 - false_alarms / 1000) ** (BLOWUP_LEN + 1)
        prec = precision(entry)
        lines.append(f"| {name} | " + " | ".join(_cell(entry[k]) for k in kinds)
                     + (f" | {prec:.2f}" if math.isfinite(prec) else " | –")
                     + f" | {false_alarms:.1f} | {100 * clipped:.1f}% | {acc:.3f} | "
                     f"{chance:.2f} |")
    lines += [
        "", "## The blow-up: the norm's rise and the first flag", "",
        "Steps after the learning rate began to grow (mean over the seeds): when the "
        "pre-clip norm itself began to rise in that method's run (its 5-step median "
        "above twice the median of the 50 steps before; in brackets, the seeds where it "
        "did within the blow-up), when the method first flagged, and the first flag "
        "after the rise began (negative: before it). Until the norm moves, nothing in "
        "the gradients tells a growing learning rate apart.", "",
        "| method | norm began to rise | first flag | flag after the rise |",
        "|---|---|---|---|",
    ]
    lines += blowup_rows(table)
    lines += [
        "", "## What each method did at the injected steps", "",
        f"Actions at the injected steps over the {args.seeds} seeds (three injections a "
        "stream): `clip_norm` scales the whole gradient, `clip_value` clips the "
        "components of the layers where the excess is concentrated, `skip` drops the "
        "step, `none` lets it through. Only gradwatch chooses among them; the other "
        "methods can only scale the whole gradient, and a NaN gradient scaled is still "
        "NaN. For the blow-up, the share of its steps clipped.", "",
        "| method | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for name, entry in table.items():
        lines.append(f"| {name} | " + " | ".join(action_cell(k, entry[k]) for k in kinds)
                     + " |")
    C.write(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
