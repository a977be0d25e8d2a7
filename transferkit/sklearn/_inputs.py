"""Input conventions shared by the estimators: host arrays, unlabelled rows, row chunks.

* Torch tensors are accepted anywhere an array is: `to_host` turns them into
  NumPy arrays before scikit-learn's own validation.
* scikit-learn's semi-supervised convention marks unlabelled (target-domain) rows by a
  label value: the classifiers skip them (`drop_unlabelled`), the aligners use them
  as the target domain (`split_domains`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_not_meta


def to_host(data: Any) -> Any:
    """Torch tensors as NumPy arrays: detached, on the CPU, fp16/bf16 widened to fp32.

    NumPy has no bfloat16 and cannot read a tensor that requires grad; estimators take
    the values (they never backpropagate), so any tensor is accepted. Other inputs pass
    through unchanged for scikit-learn's own validation.
    """
    if not isinstance(data, Tensor):
        return data
    check_not_meta(data, "X")
    tensor = data.detach().cpu()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.numpy()


def row_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``n`` rows."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def unlabelled_mask(labels: np.ndarray, unlabelled: object) -> np.ndarray:
    """Boolean mask of the rows whose label is the ``unlabelled`` marker.

    A Python list that mixes class names and the marker (``["cat", -1, "dog"]``, the
    semi-supervised convention for string labels) becomes a NumPy *string* array, where
    the marker is the text ``"-1"``: that text counts as the marker too, instead of
    becoming one more class.
    """
    mask = np.broadcast_to(np.asarray(labels == unlabelled, dtype=bool), labels.shape)
    number = isinstance(unlabelled, (int, float, np.number)) and not isinstance(unlabelled, bool)
    if number and labels.dtype.kind in "US":
        mask = mask | np.asarray(labels == str(unlabelled), dtype=bool)
    return np.array(mask, dtype=bool).reshape(-1)


def drop_unlabelled(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray | None, unlabelled: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The rows of ``x``, ``y`` (and ``weight``) whose label is not ``unlabelled``."""
    if unlabelled is None:
        return x, y, weight
    keep = ~unlabelled_mask(np.asarray(y), unlabelled)
    if not keep.any():
        raise ValueError(
            f"y: every row is marked unlabelled (y == {unlabelled!r}); a classifier needs "
            "labelled rows"
        )
    return x[keep], y[keep], None if weight is None else np.asarray(weight)[keep]


def labelled_rows(
    X: Any, y: Any, weight: Any, unlabelled: object
) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """``drop_unlabelled`` for ``score``: rows of ``X`` kept in its own type.

    A pandas DataFrame stays a DataFrame (rows taken with ``iloc``), so the estimator
    still checks its column names against those seen in ``fit``: as a bare array, a
    DataFrame with its columns in another order was scored silently on the wrong columns.
    """
    labels = np.asarray(to_host(y))
    keep = ~unlabelled_mask(labels, unlabelled)
    if not keep.any():
        raise ValueError(
            f"y: every row is marked unlabelled (y == {unlabelled!r}); a classifier needs "
            "labelled rows"
        )
    X = to_host(X)
    if len(keep) != len(X):
        raise ValueError(f"y: expected {len(X)} labels to match X, got {len(keep)}")
    rows = X.iloc[keep] if hasattr(X, "iloc") else np.asarray(X)[keep]
    return rows, labels[keep], None if weight is None else np.asarray(weight)[keep]


def split_domains(
    y: Any, n: int, unlabelled: Any, estimator: str, minimum: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(source, target)``: target rows are those with ``y == unlabelled``.

    Each domain needs ``minimum`` rows: fitted on one domain only, an aligner would
    silently become a one-domain map (identity, PCA, kernel PCA), so that raises.
    """
    if y is None:
        raise ValueError(
            f"y: {estimator} requires y to be passed, but the target y is None; pass the "
            f"source labels with unlabelled={unlabelled!r} marking the target rows"
        )
    labels = np.asarray(to_host(y))
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"y: expected {n} labels to match X, got shape {labels.shape}")
    target = unlabelled_mask(labels, unlabelled)
    source = ~target
    for mask, domain, how in (
        (target, "target", f"labelled unlabelled={unlabelled!r}"),
        (source, "source", f"labelled other than unlabelled={unlabelled!r}"),
    ):
        if int(mask.sum()) < minimum:
            raise ValueError(
                f"y: {estimator} expected at least {minimum} {domain} rows ({how}), got "
                f"{int(mask.sum())}; stack source and target rows in X"
            )
    return source, target


class DomainsInY:
    """Mixin of the aligners: ``fit`` needs ``y``, whose ``unlabelled`` rows are the target.

    Put it first among the bases, so that scikit-learn's estimator checks know that
    fitting requires ``y`` (it tells source rows from target rows).
    """

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.target_tags.required = True
        return tags
