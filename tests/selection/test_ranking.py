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
