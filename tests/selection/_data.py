"""Data shared by the selection tests: informative candidates and noise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

SEEDS = (0, 1, 2)


N = 240  # target samples per seed


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def informative_features(rng: np.random.Generator, n: int, d: int, classes: int) -> tuple:
    labels = rng.integers(0, classes, size=n)
    means = rng.normal(size=(classes, d)) * 2.0
    return means[labels] + rng.normal(size=(n, d)), labels


def noise_candidates(digits, seed: int, kind: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x, y, net = digits
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(y), size=N, replace=False)
    labels = y[pick]
    if kind == "features":
        return {
            "noise, D >= N": rng.normal(size=(N, 2 * N)),
            "noise, D = N": rng.normal(size=(N, N)),
            "digits pixels": x[pick],
            "noise, D < N": rng.normal(size=(N, N // 4)),
        }, labels
    return {
        "noise, Z >= N": softmax(3.0 * rng.normal(size=(N, 2 * N))),
        "trained classifier": net.predict_proba(x[pick]),
        "noise, Z < N": softmax(3.0 * rng.normal(size=(N, N // 8))),
    }, labels


def load_benchmark() -> ModuleType:
    """``benchmarks/bench_selection.py``: its NumPy formulas are the references here too."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_selection.py"
    spec = importlib.util.spec_from_file_location("bench_selection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
