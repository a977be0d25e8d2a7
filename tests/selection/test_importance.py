"""Importance-weighted validation: density ratios, IWCV and DEV."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from transferkit import selection


def covariate_shift_toy(seed: int, n_source: int = 400, n_target: int = 400) -> dict:
    """Source x ~ N(0, I), target x ~ N((1, 0.5), I); p(y | x) is shared. The labelling
    rule has a second boundary at x_0 = 1.5 that a fixed model misses, so the model's
    risk is larger where the target lives. The true target risk is a Monte-Carlo
    average over 200,000 fresh target samples."""
    rng = np.random.default_rng(seed)
    shift = np.array([1.0, 0.5])

    def label(x: np.ndarray) -> np.ndarray:
        return ((x[:, 0] + 0.3 * x[:, 1] > 0) ^ (x[:, 0] > 1.5)).astype(int)

    def loss(x: np.ndarray) -> np.ndarray:
        predicted = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(int)
        return (predicted != label(x)).astype(float)

    source = rng.normal(size=(n_source, 2))
    target = rng.normal(size=(n_target, 2)) + shift
    fresh_target = rng.normal(size=(200_000, 2)) + shift
    return {
        "source": source,
        "target": target,
        "source_losses": loss(source),
        "true_risk": float(loss(fresh_target).mean()),
    }


def test_iwcv_and_dev_recover_the_target_risk_better_than_source_validation() -> None:
    errors: dict[str, list[float]] = {"source": [], "iwcv": [], "iwcv_clip5": [], "dev": []}
    for seed in range(8):
        toy = covariate_shift_toy(seed)
        truth, losses = toy["true_risk"], toy["source_losses"]
        if seed == 0:  # the feature path and the weights path agree
            direct = selection.iwcv(losses, toy["source"], toy["target"])
        weights = selection.importance_weights(toy["source"], toy["target"])
        if seed == 0:
            assert direct == pytest.approx(selection.iwcv(losses, weights=weights))
        clipped = np.minimum(weights, 5.0 * weights.mean())
        errors["source"].append(abs(losses.mean() - truth))
        errors["iwcv"].append(abs(selection.iwcv(losses, weights=weights) - truth))
        errors["iwcv_clip5"].append(abs(selection.iwcv(losses, weights=clipped) - truth))
        errors["dev"].append(abs(selection.dev(losses, weights=weights) - truth))
    mean = {name: float(np.mean(values)) for name, values in errors.items()}
    print("mean |estimate - true target risk| over 8 seeds:", mean)
    assert mean["iwcv"] < 0.5 * mean["source"]
    assert mean["dev"] < 0.5 * mean["source"]
    assert mean["iwcv_clip5"] < mean["source"]


def test_importance_weights_match_the_true_gaussian_density_ratio() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(2000, 1))
    target = rng.normal(loc=1.0, size=(2000, 1))
    true_ratio = np.exp(source[:, 0] - 0.5)  # N(1, 1) / N(0, 1)
    estimated = selection.importance_weights(source, target)
    central = np.abs(source[:, 0]) < 2
    relative = np.abs(estimated[central] - true_ratio[central]) / true_ratio[central]
    assert float(np.median(relative)) < 0.1
    assert estimated.mean() == pytest.approx(1.0, abs=0.1)
    clipped = selection.importance_weights(source, target, clip=3.0)
    assert clipped.max() <= 3.0 * estimated.mean() + 1e-12
    assert clipped.max() < estimated.max()


def test_dev_equals_the_control_variate_formula() -> None:
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=50)
    weights = rng.exponential(size=50)
    weighted = weights * losses
    eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
    expected = weighted.mean() + eta * weights.mean() - eta
    assert selection.dev(losses, weights=weights) == pytest.approx(expected, rel=1e-12)
    assert selection.dev(losses, weights=np.full(50, 2.0)) == pytest.approx(2 * losses.mean())
    assert selection.iwcv(losses, weights=weights) == pytest.approx(
        np.sum(weighted) / np.sum(weights)
    )
    assert selection.iwcv(losses, weights=weights, self_normalize=False) == pytest.approx(
        weighted.mean()
    )


def test_validators_reject_inconsistent_inputs() -> None:
    losses = np.ones(5)
    with pytest.raises(ValueError, match="source_losses: expected one loss per source sample"):
        selection.iwcv(losses, weights=np.ones(4))
    with pytest.raises(ValueError, match="weights=..."):
        selection.dev(losses)
    with pytest.raises(ValueError, match="not both"):
        selection.iwcv(losses, np.ones((5, 2)), np.ones((5, 2)), weights=np.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        selection.iwcv(losses, weights=-np.ones(5))
    with pytest.raises(ValueError, match="same feature dimension"):
        selection.iwcv(losses, np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="clip"):
        selection.importance_weights(np.ones((5, 2)), np.ones((5, 2)), clip=-1.0)
    with pytest.raises(ValueError, match="target_logits"):
        selection.snd(np.ones((1, 3)))
    with pytest.raises(ValueError, match="temperature"):
        selection.snd(np.ones((4, 3)), temperature=0.0)


@given(
    losses=arrays(np.float64, (15,), elements=st.floats(0.0, 10.0)),
    weights=arrays(np.float64, (15,), elements=st.floats(0.01, 5.0)),
    scale=st.floats(0.1, 100.0),
)
def test_self_normalised_iwcv_ignores_the_scale_of_the_weights_and_stays_in_the_loss_range(
    losses: np.ndarray, weights: np.ndarray, scale: float
) -> None:
    estimate = selection.iwcv(losses, weights=weights)
    assert selection.iwcv(losses, weights=scale * weights) == pytest.approx(estimate, abs=1e-9)
    assert losses.min() - 1e-9 <= estimate <= losses.max() + 1e-9
