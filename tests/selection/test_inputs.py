"""Bad inputs of the scores raise errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit import selection


def test_scores_reject_bad_inputs_with_the_argument_name() -> None:
    f = np.random.default_rng(0).normal(size=(10, 3))
    y = np.arange(10) % 2
    bad = f.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="features"):
        selection.logme(bad, y)
    with pytest.raises(ValueError, match="labels: expected 10 labels"):
        selection.hscore(f, y[:5])
    with pytest.raises(TypeError, match="labels"):
        selection.logme(f, y.astype(float))
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        selection.logme(f, np.zeros(10, dtype=int))
    with pytest.raises(TypeError, match="features"):
        selection.logme(f.tolist(), y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source_probs.*softmax"):
        selection.leep(f, y)
    with pytest.raises(ValueError, match="score: .*did you mean 'logme'"):
        selection.rank({"a": f}, y, score="logmee")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate 'a'"):
        selection.rank({"a": f[:5]}, y)
    with pytest.raises(ValueError, match="candidates"):
        selection.rank({}, y)
    with pytest.raises(ValueError, match="every class needs at least 2"):
        selection.knn_score(f[:3], np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="metric"):
        selection.knn_score(f, y, metric="manhattan")  # type: ignore[arg-type]
