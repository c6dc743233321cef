"""Experiment 2: recurrent networks, where explosions are native.

A vanilla tanh RNN (one layer, HIDDEN units, the recurrent matrix initialised with
spectral radius RADIUS, at the edge of where gradients explode through time) learns the
classic long-range problems of Hochreiter & Schmidhuber (1997), as set up by Pascanu,
Mikolov & Bengio (2013), with plain SGD:

* ``addition``: a sequence of T pairs (a value drawn from U(0, 1), a marker); two
  values are marked, one in the first half and one in the second; the target is their
  sum (regression; always answering 1 gives an MSE of 0.167). Solved: test MSE under
  ADD_SOLVED.
* ``order``: a sequence of T one-hot symbols, distractors except X or Y at one
  position in [0.1T, 0.2T] and one in [0.5T, 0.6T]; the class is which of XX, XY, YX,
  YY (4 classes). Solved: test error under ORDER_SOLVED.

Methods: no clipping, norm clipping at each threshold of a sweep, and gradwatch
``auto`` with its defaults (no tuning). Reported per task, length and method: the
seeds that solved the task within the step budget, the median steps they needed, the
runs that diverged (a non-finite test error, or on addition a test MSE above
ADD_DIVERGED), and the share of steps clipped.

    python benchmarks/efficacy/rnn.py --lengths 50 100   # writes rnn.md
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

HIDDEN = 100
RADIUS = 1.0
BATCH = 20
LR = 0.05
STEPS = 8000
EVAL_EVERY = 250
ADD_SOLVED = 0.01
ADD_DIVERGED = 1.0  # a test MSE six times the trivial answer's: the weights blew up
ORDER_SOLVED = 0.01
THRESHOLDS = (0.3, 1.0, 3.0, 10.0)
SYMBOLS = 6  # a, b, c, d (distractors), X, Y


def addition(batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(batch, length, generator=g)
    first = torch.randint(0, length // 2, (batch,), generator=g)
    second = torch.randint(length // 2, length, (batch,), generator=g)
    marks = torch.zeros(batch, length)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=2), target


def order(batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    symbols = torch.randint(0, 4, (batch, length), generator=g)
    t1 = torch.randint(int(0.1 * length), int(0.2 * length) + 1, (batch,), generator=g)
    t2 = torch.randint(int(0.5 * length), int(0.6 * length) + 1, (batch,), generator=g)
    a = torch.randint(0, 2, (batch,), generator=g)
    b = torch.randint(0, 2, (batch,), generator=g)
    rows = torch.arange(batch)
    symbols[rows, t1] = 4 + a
    symbols[rows, t2] = 4 + b
    return nn.functional.one_hot(symbols, SYMBOLS).float(), 2 * a + b


TASKS = {"addition": (addition, 2, 1), "order": (order, SYMBOLS, 4)}


class TanhRNN(nn.Module):
    def __init__(self, inputs: int, outputs: int, hidden: int = HIDDEN,
                 radius: float = RADIUS) -> None:
        super().__init__()
        self.rnn = nn.RNN(inputs, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, outputs)
        with torch.no_grad():
            w = torch.randn(hidden, hidden) / math.sqrt(hidden)
            w *= radius / torch.linalg.eigvals(w).abs().max()
            self.rnn.weight_hh_l0.copy_(w)
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def task_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "addition":
        return nn.functional.mse_loss(out[:, 0], y)
    return nn.functional.cross_entropy(out, y)


def task_error(task: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """Test MSE (addition) or error rate (order)."""
    if task == "addition":
        return float(nn.functional.mse_loss(out[:, 0], y))
    return float((out.argmax(1) != y).float().mean())


def run(task: str, length: int, spec, seed: int, steps: int = STEPS, lr: float = LR) -> dict:
    make_batch, inputs, outputs = TASKS[task]
    solved_at = ADD_SOLVED if task == "addition" else ORDER_SOLVED
    torch.manual_seed(seed)
    model = TanhRNN(inputs, outputs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    method, opts = spec
    hook = M.make(method, model, opt, **opts)
    g = torch.Generator().manual_seed(seed)
    x_test, y_test = make_batch(1000, length, torch.Generator().manual_seed(99_999))
    solved, diverged, error = None, False, math.nan
    for step in range(1, steps + 1):
        x, y = make_batch(BATCH, length, g)
        loss = task_loss(task, model(x), y)
        opt.zero_grad()
        loss.backward()
        hook(model)
        opt.step()
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                error = task_error(task, model(x_test), y_test)
            if not math.isfinite(error) or (task == "addition" and error > ADD_DIVERGED):
                diverged = True
                break
            if error < solved_at:
                solved = step
                break
    out = {"name": hook.name, "solved": solved, "diverged": diverged, "error": error,
           "clipped": sum(hook.clipped()) / max(1, len(hook.pre))}
    if hook.monitor is not None:
        hook.monitor.detach()
    return out


def specs() -> list[tuple[str, dict]]:
    return ([("none", {})] + [("norm", {"threshold": t}) for t in THRESHOLDS]
            + [("gradwatch", {})])


def label(spec: tuple[str, dict]) -> str:
    """The name a method's row carries: none, norm(0.3), gradwatch."""
    method, opts = spec
    return f"norm({opts['threshold']:g})" if method == "norm" else method


def main(argv=None) -> int:
    parser = C.parser(__doc__, "rnn", seeds=3, steps=STEPS, lr=LR)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=[label(s) for s in specs()],
                        help="a subset of the methods (default: all)")
    args = parser.parse_args(argv)
    chosen = [s for s in specs() if args.methods is None or label(s) in args.methods]
    extra = "" if args.steps == STEPS else f" --steps {args.steps}"
    if args.methods is not None:
        extra += " --methods " + " ".join(f"'{m}'" for m in args.methods)
    lines = [
        "# Experiment 2: tanh RNN on the addition and temporal-order problems", "",
        f"Produced by `python benchmarks/efficacy/rnn.py --seeds {args.seeds} --tasks "
        f"{' '.join(args.tasks)} --lengths {' '.join(map(str, args.lengths))}{extra}`. "
        "A one-layer "
        f"tanh RNN ({HIDDEN} units, recurrent matrix at spectral radius {RADIUS}), plain "
        f"SGD at lr {args.lr:g}, batch {BATCH}, at most {args.steps} steps, evaluated "
        f"every {EVAL_EVERY} steps on 1,000 fixed test sequences. Solved: test MSE under "
        f"{ADD_SOLVED} (addition; "
        f"answering 1 always scores 0.167) or test error under {ORDER_SOLVED:.0%} "
        "(temporal order, 4 classes). Columns: seeds solved, median steps to solve (over "
        f"the solved seeds), seeds diverged (non-finite error, or on addition an MSE above "
        f"{ADD_DIVERGED:g}), final test error of the other unsolved runs "
        "(mean), share of steps clipped.", "",
    ]
    for task in args.tasks:
        for length in args.lengths:
            lines += [f"## {task}, T = {length}", "",
                      "| method | solved | steps to solve | diverged | error if unsolved "
                      "| steps clipped |", "|---|---|---|---|---|---|"]
            for spec in chosen:
                res = [run(task, length, spec, s, args.steps, args.lr)
                       for s in range(args.seeds)]
                name = res[0]["name"]
                done = [r["solved"] for r in res if r["solved"] is not None]
                left = [r["error"] for r in res if r["solved"] is None and not r["diverged"]]
                row = (f"| {name} | {len(done)}/{args.seeds} | "
                       f"{statistics.median(done):.0f} | " if done else
                       f"| {name} | 0/{args.seeds} | – | ")
                row += (f"{sum(r['diverged'] for r in res)}/{args.seeds} | "
                        f"{statistics.mean(left):.3f} | " if left else
                        f"{sum(r['diverged'] for r in res)}/{args.seeds} | – | ")
                row += f"{100 * statistics.mean(r['clipped'] for r in res):.1f}% |"
                lines.append(row)
                print(f"{task} T={length} {row}", flush=True)
            lines.append("")
    C.write(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
