"""Experiment 5: sensitivity to loss spikes, false alarms and harm, across models and
optimizers.

Each scenario is a model and an optimizer learning a 10-class problem of 64 features
(scikit-learn's ``make_classification``: 20,000 samples, 5 % of labels flipped, so a
run of 1,200 batches of 32 sees each sample about twice and its loss stays well above
zero, as in most real training; on a data set small enough to memorise, such as the
bundled digits, the norms of healthy steps spread over a factor of 20 as the loss
reaches zero, and no statistic tells a spike from a healthy step). The features are
read as an 8 x 8 image or as 8 rows of 8: an MLP with SGD, a conv net with Adam (its
norms fall steeply), a GRU over the rows with Adam, a small transformer over the rows
with AdamW; and, held back while the statistics are tuned, an LSTM with AdamW, an MLP
with Adam on batches of 8 (heavy-tailed norms), a conv net with SGD and a transformer
with SGD.

* **Spikes:** the loss is multiplied by 3, 5, 10 or 30 at 11 known steps (one run per
  magnitude). Recall: spikes flagged at their step, per method.
* **Clean runs** (3 seeds, no spikes): false alarms per 1,000 steps after the first
  50, the share of steps clipped, and the final test loss against no clipping.
* **Level:** gradwatch's typical norm against the centred 31-step running median of
  the actual norm, from step 75 (50 after warm-up) on.
* **Drift** (seed 0): from step 300 on, either the loss is multiplied by ``g**k`` at
  the k-th step (the gradient norm grows ``g`` a step, whatever the optimizer) or the
  learning rate is multiplied by ``g`` every step, for ``g`` of 1.05, 1.08 and 1.10.
  Latency: steps from the first grown step to the method's first flag (within 60).
  A growing learning rate raises the norm only once the model leaves its stable
  region, so its rows also give the step where the norm itself began to rise (its
  5-step median above twice the median of the 50 steps before the growth).

ZClip runs without its fixed ceiling (``max_grad_norm=None``); its flags are its z rule.

    python benchmarks/efficacy/sensitivity.py                    # tuning scenarios
    python benchmarks/efficacy/sensitivity.py --held-out         # the held-out ones
    python benchmarks/efficacy/sensitivity.py --plot-only        # the figure, from both pages

Each command also draws ``sensitivity.png``: recall against spike magnitude, per
scenario and method, from the recall tables of both pages as they are on disk.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402
import methods as M  # noqa: E402

STEPS = 1200
SPIKES = [150 + 95 * i for i in range(11)]
MAGNITUDES = (3.0, 5.0, 10.0, 30.0)
DRIFT_FROM = 300  # the first grown step
DRIFT_SPAN = 60  # steps watched after it
GROWTHS = (1.05, 1.08, 1.10)
DRIFT_KINDS = ("norm", "lr")
SKIP_FIRST = 50  # false alarms are counted after the first steps
LEVEL_FROM = 75  # 50 steps after gradwatch's warm-up


class Rows(nn.Module):
    """An image as 8 rows of 8 pixels, for sequence models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 8, 8)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], width: int = 64) -> None:
        super().__init__()
        self.rows = Rows()
        self.rnn = cell(8, width, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.rows(x))
        return self.head(out[:, -1])


class Transformer(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.rows = Rows()
        self.embed = nn.Linear(8, width)
        self.pos = nn.Parameter(torch.zeros(8, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(self.rows(x)) + self.pos)
        return self.head(h.mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def conv() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 10))


def sgd(lr: float) -> Callable:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def adam(lr: float, cls: type = torch.optim.Adam) -> Callable:
    return lambda params: cls(params, lr=lr)


# name: (model, optimizer, batch size)
SCENARIOS: dict[str, tuple[Callable, Callable, int]] = {
    "mlp_sgd": (mlp, sgd(0.05), 32),
    "conv_adam": (conv, adam(3e-3), 32),
    "gru_adam": (lambda: Recurrent(nn.GRU), adam(3e-3), 32),
    "transformer_adamw": (Transformer, adam(1e-3, torch.optim.AdamW), 32),
}
HELD_OUT: dict[str, tuple[Callable, Callable, int]] = {
    "lstm_adamw": (lambda: Recurrent(nn.LSTM), adam(3e-3, torch.optim.AdamW), 32),
    "mlp_adam_batch8": (mlp, adam(1e-3), 8),
    "conv_sgd": (conv, sgd(0.02), 32),
    "transformer_sgd": (Transformer, sgd(0.05), 32),
}
METHODS = {
    "none": ("none", {}),
    "gradwatch": ("gradwatch", {}),
    "zclip": ("zclip", {"max_grad_norm": None}),
}


def load_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 20,000 + 4,000 samples, standardised."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=24_000, n_features=64, n_informative=32,
                               n_redundant=16, n_classes=10, n_clusters_per_class=2,
                               flip_y=0.05, class_sep=1.5, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y)
    return x[:20_000], y[:20_000], x[20_000:], y[20_000:]


def train(scenario: tuple[Callable, Callable, int], method: str, seed: int,
          magnitude: float | None, data, drift: tuple[str, float] | None = None) -> dict:
    """One run: per-step norms, flags and clips, the typical norm, the final loss.
    ``drift``: ``("norm", g)`` or ``("lr", g)``, growth from ``DRIFT_FROM`` on (the run
    then stops ``DRIFT_SPAN`` steps later)."""
    build, make_opt, batch = scenario
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = build()
    opt = make_opt(model.parameters())
    kind, opts = METHODS[method]
    hook = M.make(kind, model, opt, **opts)
    gen = torch.Generator().manual_seed(seed)
    spikes = set(SPIKES) if magnitude else set()
    steps = STEPS if drift is None else DRIFT_FROM + DRIFT_SPAN
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if step in spikes:
            loss = loss * magnitude
        if drift is not None and step >= DRIFT_FROM:
            kind, growth = drift
            if kind == "norm":
                loss = loss * growth ** (step - DRIFT_FROM + 1)
            else:
                for group in opt.param_groups:
                    group["lr"] *= growth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        hook(model)
        opt.step()
    test_loss, _ = M.evaluate(model, xt, yt)
    out = {"pre": np.array(hook.pre), "flagged": hook.flagged(), "clipped": hook.clipped(),
           "loss": test_loss}
    if hook.monitor is not None:
        out["typical"] = hook.monitor.steps().typical_norm.to_numpy()
        out["events"] = hook.monitor.events()
        hook.monitor.detach()
    return out


def level_ratio(run: dict) -> float:
    """The largest factor between the typical norm and the centred 31-step running
    median of the norm, from LEVEL_FROM on (1.0: always equal)."""
    pre = run["pre"]
    med = np.array([np.median(pre[max(0, i - 15): i + 16]) for i in range(len(pre))])
    r = run["typical"][LEVEL_FROM:] / med[LEVEL_FROM:]
    r = r[np.isfinite(r) & (r > 0)]
    return float(np.exp(np.abs(np.log(r)).max())) if len(r) else math.nan


def drift_latency(run: dict) -> int | None:
    """Steps from the first grown step to the first flag (None: none within the span)."""
    flags = [s for s in run["flagged"] if DRIFT_FROM <= s < DRIFT_FROM + DRIFT_SPAN]
    return min(flags) - DRIFT_FROM if flags else None


def rise_onset(run: dict) -> int | None:
    """Steps from the first grown step to where the norm itself began to rise: its
    5-step median above twice the median of the 50 steps before (None: no rise)."""
    pre = run["pre"]
    before = np.median(pre[DRIFT_FROM - 50:DRIFT_FROM])
    for t in range(DRIFT_FROM, len(pre)):
        window = pre[t:t + 5]
        if len(window) and np.median(np.where(np.isfinite(window), window, np.inf)) > 2 * before:
            return t - DRIFT_FROM
    return None


def run_scenario(name: str, scenario, seeds: int, data) -> dict:
    res: dict = {"clean": {}, "spikes": {}, "drift": {}}
    for method in METHODS:
        runs = [train(scenario, method, s, None, data) for s in range(seeds)]
        res["clean"][method] = runs
    for magnitude in MAGNITUDES:
        for method in ("gradwatch", "zclip"):
            run = train(scenario, method, 0, magnitude, data)
            res["spikes"][(method, magnitude)] = run
    for kind in DRIFT_KINDS:
        for growth in GROWTHS:
            for method in ("gradwatch", "zclip"):
                run = train(scenario, method, 0, None, data, drift=(kind, growth))
                res["drift"][(method, kind, growth)] = {
                    "latency": drift_latency(run), "onset": rise_onset(run)}
    print(f"{name}: done", flush=True)
    return res


def clean_rows(name: str, res: dict) -> list[str]:
    base = [r["loss"] for r in res["clean"]["none"]]
    rows = []
    for method in ("gradwatch", "zclip"):
        runs = res["clean"][method]
        alarms = [1000 * len([s for s in r["flagged"] if s >= SKIP_FIRST])
                  / (STEPS - SKIP_FIRST) for r in runs]
        clipped = [100 * float(np.mean(r["clipped"])) for r in runs]
        rel = [100 * (r["loss"] / b - 1) for r, b in zip(runs, base)]
        level = (f"{max(level_ratio(r) for r in runs):.2f}" if method == "gradwatch" else "–")
        rows.append(
            f"| {name} | {method} | {statistics.mean(alarms):.1f} ({max(alarms):.1f}) | "
            f"{statistics.mean(clipped):.1f} ({max(clipped):.1f}) | "
            f"{statistics.mean(rel):+.1f} ({min(rel):+.1f}..{max(rel):+.1f}) | {level} |")
    return rows


def spike_rows(name: str, res: dict) -> list[str]:
    rows = []
    for method in ("gradwatch", "zclip"):
        cells = []
        for magnitude in MAGNITUDES:
            flagged = res["spikes"][(method, magnitude)]["flagged"]
            cells.append(f"{sum(s in flagged for s in SPIKES)}/{len(SPIKES)}")
        rows.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return rows


def drift_rows(name: str, res: dict) -> list[str]:
    rows = []
    for method in ("gradwatch", "zclip"):
        cells = []
        for kind in DRIFT_KINDS:
            for growth in GROWTHS:
                r = res["drift"].get((method, kind, growth))
                if r is None:
                    cells.append("–")
                    continue
                cell = "–" if r["latency"] is None else str(r["latency"])
                if kind == "lr":
                    cell += " (rise " + ("–" if r["onset"] is None else str(r["onset"])) + ")"
                cells.append(cell)
        rows.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return rows


def report(results: dict, held_out: bool) -> str:
    which = "held-out" if held_out else "tuning"
    lines = [
        f"# Experiment 5: sensitivity, false alarms and harm ({which} scenarios)", "",
        f"Produced by `python benchmarks/efficacy/sensitivity.py{' --held-out' if held_out else ''}`."
        f" {STEPS} steps per run; spikes at steps {SPIKES[0]}, {SPIKES[1]}, ..., "
        f"{SPIKES[-1]}.", "",
        "## Recall: spikes flagged at their step", "",
        "| scenario | method | " + " | ".join(f"×{m:g}" for m in MAGNITUDES) + " |",
        "|---|---|" + "---|" * len(MAGNITUDES),
    ]
    for name, res in results.items():
        lines += spike_rows(name, res)
    lines += ["", "![recall against spike magnitude, both pages](sensitivity.png)"]
    lines += [
        "", "## Clean runs (mean over seeds, worst in brackets)", "",
        "False alarms per 1,000 steps after the first 50; steps clipped (%); final test "
        "loss against no clipping (%, seed range); level: the largest factor between "
        "gradwatch's typical norm and the centred 31-step running median of the norm "
        "from step 75 on.", "",
        "| scenario | method | false alarms / 1k | clipped % | loss vs none | level |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        lines += clean_rows(name, res)
    lines += [
        "", f"## Drift: steps from the first grown step (step {DRIFT_FROM}) to the first flag",
        "", "Growth of the norm (the loss scaled up step by step) or of the learning rate, "
        f"per step; – : no flag within {DRIFT_SPAN} steps. For the learning rate, "
        "in brackets: when the norm itself began to rise (– : it did not; these "
        "classifiers often collapse, their norm falling, instead).", "",
        "| scenario | method | " + " | ".join(
            f"{kind} ×{g:g}" for kind in DRIFT_KINDS for g in GROWTHS) + " |",
        "|---|---|" + "---|" * (len(DRIFT_KINDS) * len(GROWTHS)),
    ]
    for name, res in results.items():
        lines += drift_rows(name, res)
    return "\n".join(lines) + "\n"


def read_recalls(page: str) -> dict[tuple[str, str], list[float]]:
    """The recall table of a written page: ``(scenario, method) -> [recall per
    magnitude]`` (shares of the spikes flagged)."""
    table = page.split("## Recall", 1)[-1].split("\n## ", 1)[0]
    recalls = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 + len(MAGNITUDES) and "/" in cells[2]:
            recalls[(cells[0], cells[1])] = [
                int(a) / int(b) for a, b in (c.split("/") for c in cells[2:])]
    return recalls


def plot(recalls: dict[tuple[str, str], list[float]], path: Path) -> None:
    """Recall against spike magnitude: a panel per scenario, a line per method."""
    scenarios = list(dict.fromkeys(name for name, _ in recalls))
    cols = min(4, len(scenarios))
    rows = math.ceil(len(scenarios) / cols)
    with C.figure(path, rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False,
                  sharey=True) as (fig, axes):
        for ax, name in zip(axes.flat, scenarios):
            for method, style in (("gradwatch", "-o"), ("zclip", "--s")):
                if (name, method) in recalls:
                    ax.plot(MAGNITUDES, recalls[(name, method)], style, label=method,
                            markersize=4)
            ax.set_xscale("log")
            ax.set_xticks(MAGNITUDES, [f"×{m:g}" for m in MAGNITUDES])
            ax.minorticks_off()
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("loss spike", fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("spikes flagged", fontsize=8)
        for ax in list(axes.flat)[len(scenarios):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, "sensitivity", seeds=3,
                 plot="PNG of recall against magnitude, from both pages")
    p.add_argument("--held-out", action="store_true", help="the scenarios kept apart")
    p.add_argument("--scenarios", nargs="+", default=None, help="a subset, by name")
    p.add_argument("--plot-only", action="store_true",
                   help="only draw the figure from the pages already written")
    args = p.parse_args(argv)
    if not args.plot_only:
        run_pages(args)
    if args.plot is not None:
        recalls = {}
        for page in (C.HERE / "sensitivity.md", C.HERE / "sensitivity_held_out.md"):
            if page.exists():
                recalls.update(read_recalls(page.read_text()))
        plot(recalls, args.plot)
        print(f"wrote {args.plot}")
    return 0


def run_pages(args) -> None:
    pool = HELD_OUT if args.held_out else SCENARIOS
    names = args.scenarios or list(pool)
    data = load_data()
    results = {n: run_scenario(n, pool[n], args.seeds, data) for n in names}
    out = args.out
    if args.held_out and out == C.HERE / "sensitivity.md":
        out = C.HERE / "sensitivity_held_out.md"
    C.write(out, report(results, args.held_out))


if __name__ == "__main__":
    raise SystemExit(main())
