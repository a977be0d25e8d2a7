"""Benchmark: unsupervised domain adaptation on digits shifts, every method vs source-only.

Runs ``examples/domain_adaptation_digits.py``'s training loop (imported, not copied) for
source-only, MMD (DAN-style), Deep CORAL, DANN and CDAN+E on several ``tk.datasets``
digits shifts and seeds, with the same network, optimizer and step budget. Reports the
target-test accuracy (mean ± std over seeds), each method's gain over source-only and
the median wall time per run with its ratio to source-only.

    python benchmarks/bench_adaptation.py --jobs 2        # full run (3 shifts x 3 seeds)
    python benchmarks/bench_adaptation.py --quick         # 1 seed, fewer steps

Writes ``benchmarks/results/adaptation.json`` and ``benchmarks/results/adaptation.md``
(``--quick`` writes ``adaptation-quick.*`` so the committed full results stay).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # for _common

import domain_adaptation_digits as digits_example  # noqa: E402
from _common import RESULTS, environment, write_results  # noqa: E402

import transferkit as tk  # noqa: E402


def markdown(
    accuracies: dict[str, dict[str, list[float]]],
    seconds: dict[str, list[float]],
    cpu_seconds: dict[str, list[float]],
    meta: dict[str, Any],
) -> str:
    baseline = digits_example.average(accuracies, "source-only")
    base_cpu = statistics.median(cpu_seconds["source-only"])
    lines = [
        f"Target-test accuracy, mean ± std over {meta['seeds']} seed(s); "
        f"SmallCNN(width={meta['recipe']['width']}), {meta['recipe']['steps']} steps of "
        f"{meta['recipe']['batch_size']} source + {meta['recipe']['batch_size']} target "
        f"samples; {meta['device']}, torch {meta['torch']}.",
        "",
        digits_example.table(accuracies),
        "",
        "| method | average gain over source-only | median s/run (wall) "
        "| median CPU s/run | CPU time vs source-only |",
        "|---|---|---|---|---|",
    ]
    for method in seconds:
        gain = digits_example.average(accuracies, method) - baseline
        median = statistics.median(seconds[method])
        cpu = statistics.median(cpu_seconds[method])
        lines.append(
            f"| {method} | {gain:+.3f} | {median:.1f} | {cpu:.1f} | {cpu / base_cpu:.2f}x |"
        )
    lines += [
        "",
        f"Command: `{meta['command']}`: {meta['wall_s']:.0f} s wall, "
        f"{meta['cpu_total_s']:.0f} CPU-seconds in all runs "
        f"({meta['cpu_total_s'] / meta['jobs']:.0f} s per worker with {meta['jobs']} workers).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 150 steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=digits_example.Recipe.steps)
    parser.add_argument(
        "--shifts",
        nargs="+",
        default=list(digits_example.DEFAULT_SHIFTS),
        choices=digits_example.SHIFTS,
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 150
    torch.set_num_threads(1)
    device = tk.resolve_device(args.device)
    recipe = digits_example.Recipe(steps=args.steps)

    start = time.perf_counter()
    accuracies, seconds, cpu_seconds = digits_example.run(
        args.shifts,
        digits_example.METHODS,
        range(args.seeds),
        recipe=recipe,
        device=str(device),
        jobs=args.jobs,
    )
    wall = time.perf_counter() - start
    env = environment(device)
    meta: dict[str, Any] = {
        "command": "python " + shlex.join(["benchmarks/bench_adaptation.py", *sys.argv[1:]]),
        "device": f"{device.type} ({env['device_name']}, {env['cpu_count']} cores)",
        "torch": env["torch"],
        "environment": env,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "recipe": {
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "weight_decay": recipe.weight_decay,
            "width": recipe.width,
            "trade_off": {m: recipe.weight(m) for m in digits_example.METHODS[1:]},
        },
        "wall_s": wall,
        "cpu_total_s": sum(sum(values) for values in cpu_seconds.values()),
    }
    summary = {
        method: {
            "average_accuracy": digits_example.average(accuracies, method),
            "median_seconds": statistics.median(seconds[method]),
            "median_cpu_seconds": statistics.median(cpu_seconds[method]),
        }
        for method in seconds
    }
    payload = {
        "meta": meta,
        "accuracy": accuracies,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "summary": summary,
    }
    name = "adaptation-quick" if args.quick else "adaptation"
    text = markdown(accuracies, seconds, cpu_seconds, meta)
    write_results(RESULTS / f"{name}.json", payload, text)
    print()
    print(text)


if __name__ == "__main__":
    main()
