"""How long the report and the summary of a long, wide run record take, and their peak
memory.

Records a run of ``--steps`` steps of a model of ``--layers`` layers (synthetic
gradients written into a stack of small linear layers, with a few spikes, a NaN and a
slow rise, so every section of the report has something to draw), then runs
``gradwatch report`` and ``gradwatch summary`` on it, each in a fresh process, and
prints their wall time and peak resident memory.

    python benchmarks/report_scale.py                     # 20,000 steps x 200 layers
    python benchmarks/report_scale.py --reuse             # time an existing record again
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

MEASURE = """
import json, resource, sys, time
from gradwatch.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def record(run_dir: Path, steps: int, layers: int, seed: int = 0) -> None:
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(layers)))
    monitor = gradwatch.attach(model, run_dir=run_dir, log_every=100, flush_every=1000,
                               nonfinite="zero")
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    spikes = {steps // 4: 30.0, steps // 2: 100.0}
    nan_step = 3 * steps // 4
    for t in range(steps):
        scale = torch.exp(0.3 * torch.randn(layers, generator=gen))
        rise = 1.05 ** max(0, t - (steps - 60)) if t >= steps - 60 else 1.0
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen) * float(scale[i // 2]) * rise
        if t in spikes:
            params[4].grad.mul_(spikes[t])
        if t == nan_step:
            params[0].grad[0, 0] = math.nan
        monitor.step(loss=torch.tensor(1.0 / math.sqrt(t + 1)))
    monitor.detach()


def measure(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--layers", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("report_scale"))
    p.add_argument("--reuse", action="store_true", help="time the record already in --out")
    args = p.parse_args(argv)
    run_dir = args.out / "run"
    if not args.reuse:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        start = time.perf_counter()
        record(run_dir, args.steps, args.layers)
        print(f"recorded {args.steps} steps x {args.layers} layers in "
              f"{time.perf_counter() - start:.0f} s: {run_dir}")
    size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
    print(f"record on disk: {size:.0f} MB")
    for name, argv_ in (("report", ("report", str(run_dir), "-o", str(args.out / "r.html"))),
                        ("summary", ("summary", str(run_dir)))):
        r = measure(*argv_)
        print(f"gradwatch {name:8s} {r['seconds']:6.1f} s  peak {r['peak_mb']:6.0f} MB  "
              f"exit {r['code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
