"""Loose speed check: validated scores are not slower than the bare NumPy formulas.

The NumPy references live in ``benchmarks/bench_selection.py`` (which measures the
ratios properly and writes them to ``benchmarks/results``). Here each pair runs
interleaved 15 times and the *fastest* run of each is compared (the minimum is the
least sensitive to other jobs on the machine); the bound is generous (2x) so that only
a real regression, such as an extra pass of validation per element or a Python loop,
fails it (the measurement is repeated up to three times before failing).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.selection._data import load_benchmark
from transferkit import selection

bench = load_benchmark()


def _fastest(functions: list[Callable[[], float]], rounds: int = 7) -> list[float]:
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _features() -> tuple[np.ndarray, np.ndarray]:
    return bench.deep_like(1500, 256, 10, seed=0)


def _probs() -> tuple[np.ndarray, np.ndarray]:
    return bench.source_probs(3000, 500, 10, seed=0)


CASES = {
    "logme": (_features, selection.logme, bench.logme_numpy),
    "hscore": (_features, selection.hscore, bench.regularised_hscore_numpy),
    "hscore_unregularised": (
        _features,
        lambda f, y: selection.hscore(f, y, shrinkage=None),
        bench.hscore_numpy,
    ),
    "leep": (_probs, selection.leep, bench.leep_numpy),
}


@pytest.mark.parametrize("name", list(CASES))
def test_score_is_at_most_twice_as_slow_as_the_numpy_formula(name: str) -> None:
    make, ours, reference = CASES[name]
    x, y = make()
    assert ours(x, y) == pytest.approx(reference(x, y), rel=1e-6)
    for _attempt in range(3):  # a busy machine can spoil one measurement, not three
        mine, theirs = _fastest([lambda: ours(x, y), lambda: reference(x, y)], rounds=15)
        if mine <= 2.0 * theirs:
            break
    assert mine <= 2.0 * theirs, f"{name}: {mine * 1e3:.1f} ms vs NumPy {theirs * 1e3:.1f} ms"
