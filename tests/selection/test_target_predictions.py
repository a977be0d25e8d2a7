"""Label-free scores of target predictions: entropy and SND."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from transferkit import selection


def test_prediction_entropy_equals_scipy_entropy_of_the_softmax() -> None:
    logits = np.random.default_rng(0).normal(size=(30, 5)) * 3
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    expected = float(np.mean(scipy_entropy(probs, axis=1)))
    assert selection.prediction_entropy(logits) == pytest.approx(expected, rel=1e-10)
    assert selection.prediction_entropy(torch.from_numpy(logits).float()) == pytest.approx(
        expected, rel=1e-5
    )


def test_snd_equals_the_authors_formula_and_does_not_depend_on_chunking() -> None:
    logits = np.random.default_rng(0).normal(size=(37, 4)) * 2
    p = torch.nn.functional.normalize(torch.softmax(torch.from_numpy(logits).float(), 1))
    mat = p @ p.T / 0.05
    mat.masked_fill_(torch.eye(37, dtype=torch.bool), -1 / 0.05)
    q = torch.softmax(mat, 1)
    expected = float(-(q * torch.log(q + 1e-5)).sum(1).mean())
    assert selection.snd(logits) == pytest.approx(expected, rel=1e-5)
    assert selection.snd(logits, chunk_size=5) == pytest.approx(expected, rel=1e-5)
