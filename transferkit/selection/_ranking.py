"""Ranking candidates (models, layers) by one transferability score."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, overload

from .._validation import check_option, did_you_mean
from ._baselines import knn_score, linear_probe_score
from ._hscore import hscore
from ._inputs import ArrayLike
from ._logme import logme
from ._source_predictions import leep, nce

logger = logging.getLogger(__name__)

ScoreName = Literal["logme", "hscore", "leep", "nce", "knn", "linear_probe"]
SCORES: tuple[ScoreName, ...] = ("logme", "hscore", "leep", "nce", "knn", "linear_probe")


_SCORE_FUNCTIONS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "logme": logme,
    "hscore": hscore,
    "leep": leep,
    "nce": nce,
    "knn": knn_score,
    "linear_probe": linear_probe_score,
}


class RankedCandidate(NamedTuple):
    """One row of a [`Ranking`][]: position (1 = best), candidate name and score."""

    rank: int
    name: str
    score: float


@dataclass(frozen=True)
class Ranking:
    """Candidates ordered from best to worst by one score; a small printable table.

    Iterating yields [`RankedCandidate`][] rows; ``str(ranking)`` is a plain-text
    table and [`to_markdown`][] a Markdown one.

    Attributes:
        score: the name of the score that ordered the candidates.
        rows: the rows, best first.
    """

    score: str
    rows: tuple[RankedCandidate, ...]

    @property
    def best(self) -> str:
        """Name of the best candidate."""
        return self.rows[0].name

    @property
    def names(self) -> list[str]:
        """Candidate names, best first."""
        return [row.name for row in self.rows]

    def as_dict(self) -> dict[str, float]:
        """``{name: score}``, best first."""
        return {row.name: row.score for row in self.rows}

    def __iter__(self) -> Iterator[RankedCandidate]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> RankedCandidate: ...
    @overload
    def __getitem__(self, index: str) -> RankedCandidate: ...
    def __getitem__(self, index: int | str) -> RankedCandidate:
        """A row by position (0 = best) or by candidate name."""
        if isinstance(index, str):
            for row in self.rows:
                if row.name == index:
                    return row
            raise KeyError(f"{index!r} is not a candidate{did_you_mean(index, self.names)}")
        return self.rows[index]

    def _cells(self) -> list[tuple[str, str, str]]:
        return [(str(r.rank), r.name, f"{r.score:.4f}") for r in self.rows]

    def to_markdown(self) -> str:
        """The table in Markdown.

        Examples:
            >>> print(Ranking("logme", (RankedCandidate(1, "a", 0.5),)).to_markdown())
            | rank | candidate | logme |
            |---:|:---|---:|
            | 1 | a | 0.5000 |
        """
        lines = [f"| rank | candidate | {self.score} |", "|---:|:---|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self._cells()]
        return "\n".join(lines)

    def __str__(self) -> str:
        cells = [("rank", "candidate", self.score), *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(3)]
        lines = [
            f"{a:>{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in cells
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def rank(
    candidates: Mapping[str, ArrayLike],
    labels: ArrayLike,
    score: ScoreName | Callable[[ArrayLike, ArrayLike], float] = "logme",
) -> Ranking:
    """Score every candidate on the same labelled target data and order them, best first.

    Each value of ``candidates`` is what the score takes: features ``(N, D)`` for
    ``"logme"``, ``"hscore"``, ``"knn"`` and ``"linear_probe"``, source-class
    probabilities ``(N, Z)`` for ``"leep"``, predicted source classes (or scores) for
    ``"nce"``. A callable ``score(values, labels) -> float`` (higher is better) may be
    given instead of a name. Ties keep the input order (and get consecutive ranks); a
    NaN score raises rather than being placed arbitrarily.

    Args:
        candidates: ``{name: features or probabilities}``, e.g. one entry per pretrained
            model or per layer of one model.
        labels: target labels shared by all candidates.
        score: a score name (see above) or a callable.

    Returns:
        A [`Ranking`][] (printable table of rank, name and score).

    Shape:
        - every candidate: ``(N, ...)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: no candidates, an unknown score name, invalid candidate data, a
            score that is NaN, or two names that are equal as strings (``1`` and ``"1"``).
        TypeError: ``score`` is neither a name nor a callable.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 3, size=200)
        >>> table = rank(
        ...     {"random": rng.normal(size=(200, 8)),
        ...      "good": np.eye(3)[labels] + 0.2 * rng.normal(size=(200, 3))},
        ...     labels,
        ... )
        >>> table.names
        ['good', 'random']
        >>> print(table)  # doctest: +ELLIPSIS
        rank  candidate    logme
        ------------------------
           1  good       ...
           2  random     ...
    """
    if not isinstance(candidates, Mapping) or len(candidates) == 0:
        raise ValueError("candidates: expected a non-empty dict {name: features}")
    name: str
    if isinstance(score, str):
        name = check_option(score, "score", SCORES)
        function = _SCORE_FUNCTIONS[name]
    elif callable(score):
        function = score
        # a functools.partial (e.g. of leep with estimator="leave_one_out") has no name
        name = str(
            getattr(score, "__name__", None)
            or getattr(getattr(score, "func", None), "__name__", "score")
        )
    else:
        raise TypeError(f"score: expected a score name or a callable, got {type(score).__name__}")
    labels_of = [str(candidate) for candidate in candidates]
    if len(set(labels_of)) != len(labels_of):
        repeated = sorted({n for n in labels_of if labels_of.count(n) > 1})
        raise ValueError(
            f"candidates: names {repeated} appear twice once written as strings (e.g. 1 and "
            "'1'); the table could not tell those candidates apart"
        )
    results: list[tuple[str, float]] = []
    for candidate, values in candidates.items():
        try:
            value = float(function(values, labels))
        except (ValueError, TypeError) as error:
            raise type(error)(f"candidate {candidate!r}: {error}") from error
        if math.isnan(value):
            # NaN compares False with everything: sorting would silently misorder the others
            raise ValueError(
                f"candidate {candidate!r}: the {name} score is NaN, so it cannot be ranked; "
                "check its values (e.g. a score function that divides by zero)"
            )
        logger.info("rank: %s %s = %.4f", candidate, name, value)
        results.append((str(candidate), value))
    order = sorted(range(len(results)), key=lambda i: -results[i][1])
    rows = tuple(
        RankedCandidate(position + 1, results[i][0], results[i][1])
        for position, i in enumerate(order)
    )
    return Ranking(name, rows)
