"""Fixtures shared by the selection tests: real digits candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import transferkit as tk


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, LogisticRegression]:
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(123)
    order = rng.permutation(len(y))
    source, rest = order[:700], order[700:]
    net = LogisticRegression(max_iter=2000).fit(x[source], y[source])
    return x[rest], y[rest], net


@pytest.fixture(scope="module")
def digits_candidates() -> dict[str, np.ndarray]:
    """Informative features of target digits vs a random projection of pure noise."""
    task = tk.datasets.digits("noise", size=8, seed=0).flat()
    source_x, source_y = task.source_x.numpy(), task.source_y.numpy()
    target_x, target_y = task.target_x.numpy(), task.target_y.numpy()
    rng = np.random.default_rng(0)
    classifier = LogisticRegression(max_iter=2000).fit(source_x, source_y)
    random_weights = rng.normal(size=(64, 10))
    noise_projection = rng.normal(size=target_x.shape) @ random_weights
    random_logits = target_x @ random_weights
    return {
        "labels": target_y,
        "good_features": target_x,
        "random_features": noise_projection,
        "good_probs": classifier.predict_proba(target_x),
        "random_probs": torch.softmax(torch.from_numpy(random_logits), 1).numpy(),
    }
