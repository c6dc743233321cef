"""Run the benchmark suite and write ``benchmarks/RESULTS.md``.

    python benchmarks/run.py                 # full run, about 6 minutes on 2 CPU cores
    python benchmarks/run.py --quick         # a smoke run (fewer rounds, smaller sweep)
    python benchmarks/run.py --device cuda   # on a GPU

Needs the ``bench`` extra for the peers (``pip install -e ".[bench]"``: zclip,
autoclip, wandb); a peer that is not installed is skipped and said so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine(device) -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {torch.get_num_threads()} torch threads "
            f"(of {os.cpu_count()} cores), torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.system()}")
    if device.type == "cuda":
        text += f", GPU: {torch.cuda.get_device_name(device)}"
    return text


def ratio(row: dict, key: str) -> str:
    if f"vs_{key}" not in row:
        return ""
    return f"{row[f'vs_{key}']:.2f} ({row[f'vs_{key}_min']:.2f}–{row[f'vs_{key}_max']:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, pinned to that many cores (default: all)")
    parser.add_argument("--models", nargs="+", default=["mlp", "gpt", "many_small"])
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    threads = args.threads or len(os.sched_getaffinity(0))
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    import grad_pass
    import models
    import step_bench

    device = torch.device(args.device)
    rounds, steps, warmup = (3, 3, 30) if args.quick else (10, 8, 40)
    os.environ.setdefault("GRADWATCH_BENCH_DIR", str(HERE / ".wandb"))
    os.makedirs(os.environ["GRADWATCH_BENCH_DIR"], exist_ok=True)

    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{command.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        f"Machine: {machine(device)}.",
        "",
        "## Full training steps",
        "",
        "Forward, backward, the tool, `AdamW.step()`; every variant trains its own copy "
        "of the model on a fixed batch. Variants run interleaved, round after round "
        f"({rounds} rounds of {steps} steps after {warmup} warm-up steps each). Ratios "
        "are per-round medians against the bare step and against `clip_grad_norm_` in "
        "the same round: median (min–max over rounds).",
        "",
    ]
    targets = []
    for name in args.models:
        model, _, _ = models.make(name, device)
        print(f"{name}: {models.describe(model)}", flush=True)
        res = step_bench.bench(name, step_bench.VARIANTS, device, rounds=rounds, steps=steps,
                               warmup=warmup)
        lines += [f"### `{name}`: {models.describe(model)}", "",
                  "| variant | median step | × bare | × clip_grad_norm_ |",
                  "|---|---|---|---|"]
        for variant, row in res.items():
            lines.append(f"| {variant} | {row['median_ms']:.2f} ms | {ratio(row, 'bare')} | "
                         f"{ratio(row, 'clip')} |")
        lines.append("")
        auto = res.get("gradwatch auto")
        if auto:
            vs_clip = auto["vs_clip"]
            vs_zclip = auto.get("vs_zclip")
            targets.append(
                f"| `{name}` | {ratio(auto, 'clip')} | {'met' if vs_clip <= 1.2 else 'missed'} | "
                + (f"{ratio(auto, 'zclip')} | {'met' if vs_zclip <= 1.0 else 'missed'} |"
                   if vs_zclip is not None else "– | – |"))
    lines += ["## Targets", "",
              "`gradwatch auto` (per-layer statistics, detection and adaptive clipping) "
              "against `clip_grad_norm_` and ZClip (one global norm), per-round medians:", "",
              "| model | auto × clip_grad_norm_ | ≤ 1.2 | auto × ZClip | ≤ 1 |",
              "|---|---|---|---|---|", *targets, ""]

    bw = grad_pass.bandwidth(device)
    if args.quick:
        configs = [(16, 5_000_000), (200, 5_000_000), (2000, 5_000_000)]
    else:
        configs = [(16, 5_000_000), (200, 5_000_000), (2000, 5_000_000),
                   (16, 100_000_000), (200, 100_000_000), (2000, 100_000_000)]
    print("isolated gradient pass", flush=True)
    rows = grad_pass.sweep(configs, device, bw)
    lines += [
        "## The isolated gradient pass", "",
        f"`monitor.step()` alone on synthetic gradients, against `clip_grad_norm_` and the "
        f"floor: every gradient byte read once at the measured read bandwidth "
        f"({bw / 1e9:.1f} GB/s). `norm` uses a threshold that is never reached, as on "
        "most steps of a run. State: the statistics, the window of recent norms and "
        "the row buffer.", "",
        "| tensors | parameters | floor | clip_grad_norm_ | none | norm | auto | "
        "auto × floor | auto per tensor | state |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tensors']} | {r['params'] / 1e6:.0f}M | {r['floor_ms']:.2f} ms | "
            f"{r['clip_grad_norm_ms']:.2f} ms | {r['none_ms']:.2f} ms | {r['norm_ms']:.2f} ms | "
            f"{r['auto_ms']:.2f} ms | {r['auto_ms'] / r['floor_ms']:.1f} | "
            f"{1e3 * r['auto_ms'] / r['tensors']:.1f} µs | {r['state_kib']:.0f} KiB |")
    lines.append("")
    notes = HERE / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
