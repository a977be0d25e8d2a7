"""Kernel SVM, fit + predict: ``tk.sklearn.TorchKernelSVC`` vs ``sklearn.svm.SVC``.

Both fit an RBF SVM (``C=1``, ``gamma="scale"``) on ``n`` training rows and predict
``n_test`` rows, one thread each (``torch.set_num_threads(1)`` and threadpoolctl limits
for every BLAS/OpenMP pool). ``TorchKernelSVC`` runs twice: with its defaults (float64
Gram matrices: the model of ``SVC``) and with ``dtype="float32"`` (float32 strips written
into the float64 matrix: faster, the same predictions are not guaranteed). Each repeat
runs the three contenders back to back, in rotating order (interleaved); the table gives
medians over repeats, the total (fit + predict) speed-ups, whether the predictions (and
support vectors) are identical to ``SVC``'s, and the machine load (``os.getloadavg()``)
before and after each size. The Gram step of ``TorchKernelSVC`` is timed once on its own
to show where the fit time goes.

Two inputs:

* ``mnist``: MNIST training images as 784 pixels in [0, 1] (``tk.datasets.mnist``, needs
  the packaged MNIST), test rows from the MNIST test set;
* ``deep``: deep-feature-like rows, ReLU of a fixed random projection to 512 dimensions
  of noisy scikit-learn digits (non-negative, correlated, 10 class clusters).

Run ``python benchmarks/bench_svm.py`` (both inputs at n in {10000, 20000}, 3 repeats);
``--quick`` runs n in {1000, 2000} once. Results go to
``benchmarks/results/bench_svm.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

import transferkit as tk
from transferkit.sklearn import TorchKernelSVC

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import RESULTS, environment, load_average, write_results

ROOT = Path(__file__).resolve().parent.parent


def deep_like_features(n: int, *, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ReLU of a random projection of noisy digits: ``(n, dim)`` features and labels."""
    digits, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(digits), size=n)
    pixels = digits[index] / 16.0 + rng.normal(scale=0.3, size=(n, digits.shape[1]))
    projection = np.random.default_rng(1234).normal(size=(digits.shape[1], dim)) / 8.0
    features = np.maximum(pixels @ projection, 0.0)
    return features, labels[index]


def load_inputs(
    name: str, n: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, y_train, x_test, y_test`` for the ``mnist`` or ``deep`` input."""
    if name == "mnist":
        data = tk.datasets.mnist()
        x = data.train_images[:n].reshape(n, -1).numpy() / 255.0
        x_test = data.test_images[:n_test].reshape(n_test, -1).numpy() / 255.0
        return x, data.train_labels[:n].numpy(), x_test, data.test_labels[:n_test].numpy()
    x, y = deep_like_features(n + n_test, seed=n)
    return x[:n], y[:n], x[n:], y[n:]


CPU_SECONDS: dict[str, list[float]] = {}


def timed(fn: Callable[[], Any], name: str = "") -> tuple[float, Any]:
    """Wall time of ``fn()`` and its result; the process CPU time goes to ``CPU_SECONDS``.

    CPU time (one thread here) does not count the time other jobs on the shared cores
    take from this process, so it is a second, less load-sensitive view of the cost.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    CPU_SECONDS.setdefault(name, []).append(time.process_time() - start_cpu)
    return time.perf_counter() - start, result


def run_size(name: str, n: int, n_test: int, repeats: int, device: str) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = load_inputs(name, n, n_test)
    CPU_SECONDS.clear()
    load_before = load_average()
    keys = ("fit_ours", "pred_ours", "fit_ours32", "pred_ours32", "fit_sk", "pred_sk")
    times: dict[str, list[float]] = {k: [] for k in keys}
    ours: Any = None
    ours32: Any = None
    theirs: Any = None
    ours_pred = ours32_pred = theirs_pred = np.empty(0)

    def run_ours() -> None:
        nonlocal ours, ours_pred
        model = TorchKernelSVC(kernel="rbf", C=1.0, device=device)
        seconds, ours = timed(lambda: model.fit(x_train, y_train), "ours")
        times["fit_ours"].append(seconds)
        seconds, ours_pred = timed(lambda: ours.predict(x_test), "ours")
        times["pred_ours"].append(seconds)

    def run_ours32() -> None:
        nonlocal ours32, ours32_pred
        model = TorchKernelSVC(kernel="rbf", C=1.0, device=device, dtype="float32")
        seconds, ours32 = timed(lambda: model.fit(x_train, y_train), "ours32")
        times["fit_ours32"].append(seconds)
        seconds, ours32_pred = timed(lambda: ours32.predict(x_test), "ours32")
        times["pred_ours32"].append(seconds)

    def run_theirs() -> None:
        nonlocal theirs, theirs_pred
        model = SVC(kernel="rbf", C=1.0)
        seconds, theirs = timed(lambda: model.fit(x_train, y_train), "sk")
        times["fit_sk"].append(seconds)
        seconds, theirs_pred = timed(lambda: theirs.predict(x_test), "sk")
        times["pred_sk"].append(seconds)

    contenders = [run_ours, run_theirs, run_ours32]
    for repeat in range(repeats):
        shift = repeat % len(contenders)  # rotating order: each goes first in turn
        for run in contenders[shift:] + contenders[:shift]:
            run()
        print(
            f"  {name} n={n} repeat {repeat}: { ({k: round(v[-1], 2) for k, v in times.items()}) }"
        )
    gram_s, _ = timed(lambda: ours._gram(x_train, None))
    load_after = load_average()
    med = {k: statistics.median(v) for k, v in times.items()}
    total_ours = med["fit_ours"] + med["pred_ours"]
    total_theirs = med["fit_sk"] + med["pred_sk"]
    total_ours32 = med["fit_ours32"] + med["pred_ours32"]
    row = {
        "input": name,
        "n_train": n,
        "n_test": n_test,
        "dim": x_train.shape[1],
        "n_support_ours": len(ours.support_),
        "n_support_sklearn": len(theirs.support_),
        "same_support": bool(np.array_equal(ours.support_, theirs.support_)),
        "times_s": times,
        "fit_s_ours": med["fit_ours"],
        "fit_s_sklearn": med["fit_sk"],
        "predict_s_ours": med["pred_ours"],
        "predict_s_sklearn": med["pred_sk"],
        "total_s_ours": total_ours,
        "total_s_sklearn": total_theirs,
        "speedup": total_theirs / total_ours,
        "fit_speedup": med["fit_sk"] / med["fit_ours"],
        "fit_s_ours_float32": med["fit_ours32"],
        "predict_s_ours_float32": med["pred_ours32"],
        "total_s_ours_float32": total_ours32,
        "speedup_float32": total_theirs / total_ours32,
        "identical_predictions_float32": float(np.mean(ours32_pred == theirs_pred)),
        "same_support_float32": bool(np.array_equal(ours32.support_, theirs.support_)),
        "gram_s_ours": gram_s,
        # fit + predict CPU seconds per repeat (process time), and their medians' ratio
        "cpu_s_ours": [a + b for a, b in zip(*[iter(CPU_SECONDS["ours"])] * 2, strict=True)],
        "cpu_s_sklearn": [a + b for a, b in zip(*[iter(CPU_SECONDS["sk"])] * 2, strict=True)],
        "cpu_s_ours_float32": [
            a + b for a, b in zip(*[iter(CPU_SECONDS["ours32"])] * 2, strict=True)
        ],
        "identical_predictions": float(np.mean(ours_pred == theirs_pred)),
        "accuracy_ours": float(np.mean(ours_pred == y_test)),
        "accuracy_sklearn": float(np.mean(theirs_pred == y_test)),
        "load_before": load_before,
        "load_after": load_after,
    }
    row["cpu_speedup"] = statistics.median(row["cpu_s_sklearn"]) / statistics.median(
        row["cpu_s_ours"]
    )
    row["cpu_speedup_float32"] = statistics.median(row["cpu_s_sklearn"]) / statistics.median(
        row["cpu_s_ours_float32"]
    )
    print(
        f"{name} n={n}: ours {total_ours:.2f}s sklearn {total_theirs:.2f}s "
        f"({row['speedup']:.2f}x), identical {row['identical_predictions']:.4f}; "
        f"float32 {total_ours32:.2f}s ({row['speedup_float32']:.2f}x), identical "
        f"{row['identical_predictions_float32']:.4f}",
        flush=True,
    )
    return row


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Device: {result['device']} ({result['device_name']}), torch {result['torch']}, "
        f"scikit-learn {result['sklearn']}, 1 thread for both (torch and every BLAS/OpenMP "
        f"pool); medians of {result['repeats']} interleaved repeats; RBF, C=1, "
        f"gamma='scale', {result['n_test']} test rows. Wall-clock seconds; load = 1-minute "
        "load average before / after each size (2-core machine shared with other jobs).",
        "",
        "| input | n train | fit ours / sklearn (s) | predict ours / sklearn (s) "
        "| total ours / sklearn (s) | total speed-up | fit speed-up | CPU-time speed-up "
        "| Gram alone (s) "
        "| identical predictions | same support | accuracy ours / sklearn "
        "| float32: total (s), speed-up, CPU-time speed-up, identical predictions, same support "
        "| load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['input']} ({r['dim']}-d) | {r['n_train']} "
            f"| {r['fit_s_ours']:.2f} / {r['fit_s_sklearn']:.2f} "
            f"| {r['predict_s_ours']:.2f} / {r['predict_s_sklearn']:.2f} "
            f"| {r['total_s_ours']:.2f} / {r['total_s_sklearn']:.2f} "
            f"| {r['speedup']:.2f}x | {r['fit_speedup']:.2f}x | {r['cpu_speedup']:.2f}x "
            f"| {r['gram_s_ours']:.2f} "
            f"| {100 * r['identical_predictions']:.2f}% | {'yes' if r['same_support'] else 'no'} "
            f"| {r['accuracy_ours']:.4f} / {r['accuracy_sklearn']:.4f} "
            f"| {r['total_s_ours_float32']:.2f}, {r['speedup_float32']:.2f}x, "
            f"{r['cpu_speedup_float32']:.2f}x, {100 * r['identical_predictions_float32']:.2f}%, "
            f"{'yes' if r['same_support_float32'] else 'no'} "
            f"| {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--device", default="cpu", help="where the Gram matrices are computed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--inputs", nargs="+", default=["mnist", "deep"])
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_svm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = str(tk.resolve_device(args.device))
    sizes = args.sizes or ((1000, 2000) if args.quick else (10000, 20000))
    repeats = args.repeats or (1 if args.quick else 3)
    n_test = 500 if args.quick else 2000
    with threadpool_limits(limits=1):
        rows = [run_size(name, n, n_test, repeats, device) for name in args.inputs for n in sizes]
    result = {
        "benchmark": "bench_svm",
        "quick": args.quick,
        **environment(device),
        "sklearn": sklearn.__version__,
        "threads": 1,
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "n_test": n_test,
        "rows": rows,
    }
    table = to_markdown(result)
    print(table)
    output = args.output
    write_results(output, result, "# bench_svm\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
