"""Transferability scores vs plain NumPy implementations of the same formulas.

``tk.selection`` validates its inputs (types, shapes, NaN/inf, probabilities that sum
to 1, label ranges) and returns plain floats. This benchmark checks that the validation
does not make it slower than the formula written directly in NumPy, the way the
authors' reference code (and TLlib) write it:

* ``logme``: the authors' fixed-point LogME (thuml/LogME), one loop per class;
* ``leep``: the matrix form of Nguyen et al. (joint by a one-hot product, the expected
  empirical predictor by ``p @ P(y|z).T``);
* ``hscore`` (``shrinkage=None``): Bao et al. as in TLlib (``np.cov`` of the features and
  of the class-mean features, ``pinv``);
* ``hscore`` (default, Ledoit-Wolf): the regularised H-score of Ibrahim et al. as in TLlib
  (scikit-learn's ``LedoitWolf``, then the same formula);
* ``nce``: the conditional entropy from a count table.

Every pair gets the same inputs; values are compared (``rel_diff``). The contenders run
interleaved (one call of each per round, the order alternating), single-threaded
(``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``). The ratio ``tk / numpy`` is
taken per round, for wall time and for the process's CPU time (which leaves out the time
spent waiting for a core on a shared machine), and the table gives its median and
quartiles over rounds (below 1: transferkit is faster), with the median times. The
machine load (``os.getloadavg()``) before and after is recorded.

Run ``OMP_NUM_THREADS=1 python benchmarks/bench_selection.py`` (``--quick`` for a small
run). Results go to ``benchmarks/results/bench_selection.{json,md}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from transferkit import selection

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import RESULTS, environment, load_average, write_results

# --------------------------------------------------------------------------- references


def logme_numpy(f: np.ndarray, y: np.ndarray) -> float:
    """The authors' ``LogME._fit_fixed_point`` (thuml/LogME), written in NumPy."""
    n, d = f.shape
    if n > d:
        _, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        u_times_sigma = f @ vh.T
        k = int(np.sum(s > 1e-10))
        s = s.reshape(-1, 1)[:k]
        vh = vh[:k]
        u = u_times_sigma[:, :k] / s.reshape(1, -1)
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    s = s.reshape(-1, 1)
    sigma = s**2
    evidences = []
    for i in range(int(y.max() + 1)):
        y_ = (y == i).astype(np.float64).reshape(-1, 1)
        x = u.T @ y_
        x2 = x**2
        res_x2 = (y_**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            t_ = alpha / beta
            if abs(t_ - t) / t <= 1e-3:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2.0 * res2
            - alpha / 2.0 * m2
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep_numpy(p: np.ndarray, y: np.ndarray) -> float:
    """LEEP (Nguyen et al., 2020) in matrix form."""
    n = p.shape[0]
    one_hot = np.eye(int(y.max()) + 1)[y]
    joint = one_hot.T @ p / n  # (C, Z)
    conditional = joint / joint.sum(0, keepdims=True)  # P(y | z)
    expected = (p @ conditional.T)[np.arange(n), y]
    return float(np.mean(np.log(expected)))


def _class_mean_features(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return g


def hscore_numpy(f: np.ndarray, y: np.ndarray) -> float:
    """H-score (Bao et al., 2019) as in TLlib."""
    cov_f = np.cov(f, rowvar=False)
    cov_g = np.cov(_class_mean_features(f, y), rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15) @ cov_g))


def regularised_hscore_numpy(f: np.ndarray, y: np.ndarray) -> float:
    """Regularised H-score (Ibrahim et al., 2022) as in TLlib, times ``(N - 1) / N``.

    The factor puts it on transferkit's unbiased-covariance scale (the same factor for
    every candidate on the same samples).
    """
    n = f.shape[0]
    f = f - f.mean(0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)
    alpha = lw.shrinkage_
    cov_g = np.cov(_class_mean_features(f, y), rowvar=False)
    h = np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - alpha) * cov_g))
    return float(h) * (n - 1) / n


def nce_numpy(z: np.ndarray, y: np.ndarray) -> float:
    """NCE (Tran et al., 2019) from a count table."""
    n = len(y)
    joint = np.zeros((int(z.max()) + 1, int(y.max()) + 1))
    np.add.at(joint, (z, y), 1.0)
    joint /= n
    marginal = joint.sum(1, keepdims=True)
    mask = joint > 0
    return float(np.sum(joint[mask] * np.log((joint / np.maximum(marginal, 1e-300))[mask])))


# --------------------------------------------------------------------------- inputs


def deep_like(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, correlated, clustered features (ReLU of a projection) and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    latent = rng.normal(size=(classes, 32))[y] + rng.normal(size=(n, 32))
    f = np.maximum(latent @ rng.normal(size=(32, d)) / 4 + 0.1 * rng.normal(size=(n, d)), 0)
    return f, y


def source_probs(n: int, z: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    logits = 2.0 * rng.normal(size=(classes, z))[y] + rng.normal(size=(n, z))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def cases(quick: bool) -> list[dict[str, Any]]:
    """(name, shape, tk function, numpy function, inputs)."""
    c = 10
    feature_shapes = [(500, 128), (2000, 512)] if not quick else [(300, 64)]
    wide = [(300, 1024)] if not quick else [(100, 300)]
    prob_shapes = [(2000, 100), (5000, 1000)] if not quick else [(300, 50)]
    out: list[dict[str, Any]] = []
    for n, d in feature_shapes:
        f, y = deep_like(n, d, c, seed=n + d)
        shape = f"N={n}, D={d}"
        out.append(dict(score="logme", shape=shape, tk=selection.logme, np=logme_numpy, x=f, y=y))
        out.append(
            dict(
                score="hscore (shrinkage=None)",
                shape=shape,
                tk=lambda a, b: selection.hscore(a, b, shrinkage=None),
                np=hscore_numpy,
                x=f,
                y=y,
            )
        )
        out.append(
            dict(
                score="hscore (Ledoit-Wolf)",
                shape=shape,
                tk=selection.hscore,
                np=regularised_hscore_numpy,
                x=f,
                y=y,
            )
        )
    for n, d in wide:
        f, y = deep_like(n, d, c, seed=n + d)
        shape = f"N={n}, D={d}"
        out.append(dict(score="logme", shape=shape, tk=selection.logme, np=logme_numpy, x=f, y=y))
        out.append(
            dict(
                score="hscore (Ledoit-Wolf)",
                shape=shape,
                tk=selection.hscore,
                np=regularised_hscore_numpy,
                x=f,
                y=y,
            )
        )
    for n, z in prob_shapes:
        p, y = source_probs(n, z, c, seed=n + z)
        shape = f"N={n}, Z={z}"
        out.append(dict(score="leep", shape=shape, tk=selection.leep, np=leep_numpy, x=p, y=y))
        hard = p.argmax(1)
        out.append(dict(score="nce", shape=shape, tk=selection.nce, np=nce_numpy, x=hard, y=y))
    return out


def interleaved(
    contenders: dict[str, Callable[[], float]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Wall and CPU seconds per round of each contender, and the values they returned.

    One call of each per round, the order alternating. CPU time (``time.process_time``)
    leaves out the time the process waits for a core, which on a shared machine is most
    of the wall time; both are recorded.
    """
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    values: dict[str, float] = {}
    names = list(contenders)
    for name in names:  # warm-up (imports, first-call allocations)
        values[name] = contenders[name]()
    # fast cases get more rounds (about a second of each), up to MAX_ROUNDS
    start = time.perf_counter()
    for name in names:
        contenders[name]()
    one_round = max(time.perf_counter() - start, 1e-9)
    rounds = max(rounds, min(MAX_ROUNDS, int(1.0 / one_round)))
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            values[name] = contenders[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu, values


#: Upper bound on the rounds of a fast case (sub-millisecond scores get this many).
MAX_ROUNDS = 1001


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def run(quick: bool, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    load_before = load_average()
    rows = []
    for case in cases(quick):
        x, y = case["x"], case["y"]
        times, cpu, values = interleaved(
            {
                "tk": lambda c=case, x=x, y=y: c["tk"](x, y),
                "numpy": lambda c=case, x=x, y=y: c["np"](x, y),
            },
            rounds,
        )
        rel = abs(values["tk"] - values["numpy"]) / max(abs(values["numpy"]), 1e-12)
        # the two calls of a round ran back to back under the same machine load: the
        # median of the per-round ratios is the paired, load-robust comparison
        paired = [a / b for a, b in zip(times["tk"], times["numpy"], strict=True)]
        q1, ratio, q3 = quartiles(paired)
        paired_cpu = [a / b for a, b in zip(cpu["tk"], cpu["numpy"], strict=True)]
        cpu_q1, cpu_ratio, cpu_q3 = quartiles(paired_cpu)
        row = {
            "score": case["score"],
            "shape": case["shape"],
            "tk_ms": 1e3 * statistics.median(times["tk"]),
            "numpy_ms": 1e3 * statistics.median(times["numpy"]),
            "ratio": ratio,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ratio_of_medians": statistics.median(times["tk"]) / statistics.median(times["numpy"]),
            "tk_cpu_ms": 1e3 * statistics.median(cpu["tk"]),
            "numpy_cpu_ms": 1e3 * statistics.median(cpu["numpy"]),
            "cpu_ratio": cpu_ratio,
            "cpu_ratio_q1": cpu_q1,
            "cpu_ratio_q3": cpu_q3,
            "rel_diff": rel,
            "rounds": len(times["tk"]),
        }
        rows.append(row)
        print(
            f"{row['score']:<24} {row['shape']:<16} tk {row['tk_ms']:8.2f} ms  "
            f"numpy {row['numpy_ms']:8.2f} ms  ratio {row['ratio']:.2f} "
            f"[{q1:.2f}, {q3:.2f}]  cpu ratio {cpu_ratio:.2f} [{cpu_q1:.2f}, {cpu_q3:.2f}]  "
            f"rel diff {rel:.1e}",
            flush=True,
        )
    return {
        "benchmark": "bench_selection",
        "rounds": rounds,
        "threads": 1,
        **environment(),
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"NumPy {result['numpy']}, Python {result['python']}, 1 thread; medians of at "
        f"least {result['rounds']} interleaved rounds (about a second of rounds, at most "
        f"{MAX_ROUNDS}, for the fast cases; `rounds` per row in the JSON); load average "
        "before/after "
        f"{result['loadavg_before'][0]:.2f} / {result['loadavg_after'][0]:.2f} on "
        f"{result['cpu_count']} cores. Ratio = transferkit / NumPy reference time of the "
        "same round, median [quartiles] over rounds (below 1: transferkit is faster), for "
        "wall time and for CPU time (the process's own, which leaves out waiting for a "
        "core on a busy machine); times are wall medians; rel. diff compares the two "
        "values.",
        "",
        "| score | inputs | transferkit (ms) | NumPy reference (ms) | wall ratio [q1, q3] "
        "| CPU ratio [q1, q3] | rel. diff |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['score']} | {r['shape']} | {r['tk_ms']:.2f} | {r['numpy_ms']:.2f} "
            f"| {r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] "
            f"| {r['cpu_ratio']:.2f} [{r['cpu_ratio_q1']:.2f}, {r['cpu_ratio_q3']:.2f}] "
            f"| {r['rel_diff']:.0e} |"
        )
    lines += [
        "",
        "LogME with D > N: the values differ by design (transferkit keeps the log-alpha terms "
        "of the zero singular values, which the authors' truncated SVD drops; see the "
        "selection guide). NCE times are microseconds: the ratio there is call overhead.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    result = run(args.quick, rounds)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(
        RESULTS / "bench_selection.json", result, "# bench_selection\n\n" + to_markdown(result)
    )


if __name__ == "__main__":
    main()
