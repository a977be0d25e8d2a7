"""Kernel SVM on deep-feature-like inputs: ``tk.sklearn.TorchKernelSVC`` vs ``sklearn.svm.SVC``.

Both fit an RBF SVM (``C=1``, ``gamma="scale"``) on ``n`` training rows of ``d = 512``
features and predict ``n_test`` rows; the script times fit and predict separately
(medians over repeats), checks that the predictions are identical, and times the Gram
step alone: the training Gram matrix from ``tk.sklearn``'s chunked torch path vs
``sklearn.metrics.pairwise.rbf_kernel``.

The inputs imitate CNN features: each row is a scikit-learn digit (64 pixels) plus
Gaussian noise, sent through a fixed random projection to 512 dimensions and a ReLU
(non-negative, correlated, with 10 class clusters).

Run ``python benchmarks/bench_svm.py`` (n in {2000, 10000}); ``--quick`` runs a small
version. Results go to ``benchmarks/results/bench_svm.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.svm import SVC

import transferkit as tk
from transferkit.sklearn import TorchKernelSVC

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def deep_like_features(n: int, *, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ReLU of a random projection of noisy digits: ``(n, dim)`` features and labels."""
    digits, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(digits), size=n)
    pixels = digits[index] / 16.0 + rng.normal(scale=0.3, size=(n, digits.shape[1]))
    projection = np.random.default_rng(1234).normal(size=(digits.shape[1], dim)) / 8.0
    features = np.maximum(pixels @ projection, 0.0)
    return features, labels[index]


CPU_TIMES: dict[str, float] = {}


def median_time(fn: Callable[[], Any], repeats: int, name: str) -> tuple[float, Any]:
    """Median wall time of ``fn`` (returned) and median process CPU time (in CPU_TIMES).

    The CPU time (all threads) does not depend on other jobs sharing the cores; it counts
    torch's two GEMM threads twice, so it is pessimistic for the torch path.
    """
    times, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    CPU_TIMES[name] = statistics.median(cpu)
    return statistics.median(times), result


def run_size(n: int, n_test: int, repeats: int, device: str) -> dict[str, Any]:
    x, y = deep_like_features(n + n_test, seed=n)
    x_train, y_train, x_test = x[:n], y[:n], x[n:]

    def fit_ours() -> TorchKernelSVC:
        return TorchKernelSVC(kernel="rbf", C=1.0, device=device).fit(x_train, y_train)

    def fit_theirs() -> SVC:
        return SVC(kernel="rbf", C=1.0).fit(x_train, y_train)

    ours_fit, ours = median_time(fit_ours, repeats, "fit_ours")
    ours_predict, ours_pred = median_time(lambda: ours.predict(x_test), repeats, "pred_ours")
    theirs_fit, theirs = median_time(fit_theirs, repeats, "fit_sklearn")
    theirs_predict, theirs_pred = median_time(
        lambda: theirs.predict(x_test), repeats, "pred_sklearn"
    )

    gamma = ours.gamma_
    gram_ours, gram_a = median_time(lambda: ours._gram(x_train, None), repeats, "gram_ours")
    gram_theirs, gram_b = median_time(
        lambda: rbf_kernel(x_train, gamma=gamma), repeats, "gram_sklearn"
    )
    cpu_ours = CPU_TIMES["fit_ours"] + CPU_TIMES["pred_ours"]
    cpu_theirs = CPU_TIMES["fit_sklearn"] + CPU_TIMES["pred_sklearn"]
    total_ours = ours_fit + ours_predict
    total_theirs = theirs_fit + theirs_predict
    row = {
        "n_train": n,
        "n_test": n_test,
        "dim": x.shape[1],
        "n_support_ours": len(ours.support_),
        "n_support_sklearn": len(theirs.support_),
        "fit_s_ours": ours_fit,
        "fit_s_sklearn": theirs_fit,
        "predict_s_ours": ours_predict,
        "predict_s_sklearn": theirs_predict,
        "total_s_ours": total_ours,
        "total_s_sklearn": total_theirs,
        "speedup": total_theirs / total_ours,
        "cpu_s_ours": cpu_ours,
        "cpu_s_sklearn": cpu_theirs,
        "cpu_speedup": cpu_theirs / cpu_ours,
        "identical_predictions": float(np.mean(ours_pred == theirs_pred)),
        "accuracy_ours": float(np.mean(ours_pred == y[n:])),
        "accuracy_sklearn": float(np.mean(theirs_pred == y[n:])),
        "gram_s_ours": gram_ours,
        "gram_s_sklearn": gram_theirs,
        "gram_speedup": gram_theirs / gram_ours,
        "gram_max_abs_diff": float(np.abs(gram_a - gram_b).max()),
    }
    print(
        f"n={n}: ours {total_ours:.2f}s sklearn {total_theirs:.2f}s "
        f"({row['speedup']:.2f}x), identical {row['identical_predictions']:.4f}",
        flush=True,
    )
    return row


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, scikit-learn "
        f"{result['sklearn']}, {result['cpu_count']} CPU threads; medians of "
        f"{result['repeats']} runs; RBF, C=1, gamma='scale', d=512, {result['n_test']} test rows. "
        "Times are wall-clock seconds; the CPU-time speed-up uses process CPU time (all threads), "
        "which other jobs on shared cores do not inflate.",
        "",
        "| n train | fit ours (s) | fit sklearn (s) | predict ours (s) | predict sklearn (s) "
        "| total speed-up (wall) | speed-up (CPU time) | identical predictions "
        "| accuracy ours / sklearn | Gram ours (s) | rbf_kernel (s) | Gram speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_train']} | {r['fit_s_ours']:.2f} | {r['fit_s_sklearn']:.2f} "
            f"| {r['predict_s_ours']:.3f} | {r['predict_s_sklearn']:.3f} "
            f"| {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x "
            f"| {100 * r['identical_predictions']:.2f}% "
            f"| {r['accuracy_ours']:.4f} / {r['accuracy_sklearn']:.4f} "
            f"| {r['gram_s_ours']:.2f} | {r['gram_s_sklearn']:.2f} | {r['gram_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--device", default="auto", help="where the Gram matrices are computed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_svm.json")
    args = parser.parse_args(argv)
    device = str(tk.resolve_device(args.device))
    sizes = (1000, 2000) if args.quick else (2000, 10000)
    repeats = args.repeats or (1 if args.quick else 3)
    n_test = 500 if args.quick else 2000
    rows = [run_size(n, n_test, repeats, device) for n in sizes]
    result = {
        "benchmark": "bench_svm",
        "quick": args.quick,
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "cpu_count": torch.get_num_threads(),
        "repeats": repeats,
        "n_test": n_test,
        "rows": rows,
    }
    table = to_markdown(result)
    print(table)
    output = args.output
    write_atomic(output, json.dumps(result, indent=2) + "\n")
    write_atomic(output.with_suffix(".md"), "# bench_svm\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
