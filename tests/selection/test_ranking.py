"""rank and Ranking: every score orders real candidates above noise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.selection._data import SEEDS, noise_candidates
from transferkit import selection


@pytest.mark.parametrize("score", selection.SCORES)
def test_every_score_ranks_informative_digits_above_a_random_projection(
    score: str, digits_candidates: dict[str, np.ndarray]
) -> None:
    kind = "probs" if score in ("leep", "nce") else "features"
    table = selection.rank(
        {
            "random": digits_candidates[f"random_{kind}"],
            "good": digits_candidates[f"good_{kind}"],
        },
        digits_candidates["labels"],
        score=score,
    )
    assert table.names == ["good", "random"]
    assert table.score == score
    assert table["good"].score > table["random"].score


def test_rank_accepts_a_callable_and_prints_a_table() -> None:
    def spread(features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.std(features))

    rng = np.random.default_rng(0)
    table = selection.rank(
        {"narrow": rng.normal(size=(10, 2)), "wide": 5 * rng.normal(size=(10, 2))},
        np.arange(10) % 2,
        score=spread,
    )
    assert [row.rank for row in table] == [1, 2]
    assert table.best == "wide" and len(table) == 2
    text = str(table)
    assert text.splitlines()[0].split() == ["rank", "candidate", "spread"]
    assert "wide" in text.splitlines()[2]
    markdown = table.to_markdown().splitlines()
    assert markdown[0] == "| rank | candidate | spread |" and len(markdown) == 4
    with pytest.raises(KeyError, match="did you mean 'wide'"):
        table["wid"]


FEATURE_SCORES = [s for s in selection.SCORES if s not in ("leep", "nce")]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score", FEATURE_SCORES)
def test_feature_scores_rank_digits_above_noise_of_any_dimension(digits, score, seed) -> None:
    candidates, labels = noise_candidates(digits, seed, "features")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default scores need no warning here
        table = selection.rank(candidates, labels, score=score)
    assert table.best == "digits pixels", str(table)


def test_rank_refuses_a_nan_score_instead_of_misordering_the_others() -> None:
    # failed before the fix: NaN compares False with everything, so sorting left
    # {"a": 1, "b": NaN, "c": 2} as a, b, c: "a" ranked above the better "c"
    values = {"a": 1.0, "b": float("nan"), "c": 2.0}
    labels = np.arange(10) % 2

    def lookup(name: object, _: object) -> float:
        return values[str(name)]

    with pytest.raises(ValueError, match="candidate 'b': the lookup score is NaN"):
        selection.rank({k: k for k in values}, labels, score=lookup)  # type: ignore[misc]
    del values["b"]
    assert selection.rank({k: k for k in values}, labels, score=lookup).names == ["c", "a"]  # type: ignore[misc]


def test_rank_keeps_ties_in_input_order_and_a_dead_layer_ranks_last() -> None:
    """Guard: equal scores keep the input order (stable sort, both directions), and an
    all-zero candidate (dead layer) gets a finite LogME below real features."""
    labels = np.arange(12) % 3
    for order in (["x", "y", "z"], ["z", "y", "x"]):
        table = selection.rank({k: k for k in order}, labels, score=lambda v, y: 0.5)  # type: ignore[misc]
        assert table.names == order and [r.rank for r in table] == [1, 2, 3]
    rng = np.random.default_rng(0)
    features = np.eye(3)[labels] + 0.1 * rng.normal(size=(12, 3))
    table = selection.rank({"dead": np.zeros((12, 3)), "real": features}, labels)
    assert table.names == ["real", "dead"] and np.isfinite(table["dead"].score)


def test_rank_refuses_names_that_collide_as_strings() -> None:
    # before: {1: good, "1": noise} gave two rows both named "1", so table["1"] and
    # as_dict() silently returned one of them
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match=r"candidates: names \['1'\] appear twice"):
        selection.rank({1: 1.0, "1": 2.0}, labels, score=lambda v, y: float(v))  # type: ignore[dict-item]
