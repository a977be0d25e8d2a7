"""LEEP and NCE: scores of a source classifier's predictions on the target.

Both estimate ``P(y | z)`` (target label given source class) from the target samples;
the in-sample ("empirical") estimate of the papers overfits with few samples per source
class, so both offer a leave-one-out estimator and choose it automatically there.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Literal

import numpy as np
from torch import Tensor

from .._validation import check_option
from ..metrics import as_numpy_features
from ._inputs import ArrayLike, _dense_labels, labels_array

logger = logging.getLogger(__name__)

Estimator = Literal["auto", "empirical", "leave_one_out"]
ESTIMATORS: tuple[Estimator, ...] = ("auto", "empirical", "leave_one_out")
# Fewer target samples than this per source class (on average) and the in-sample
# estimate of P(y | z) that LEEP and NCE rest on overfits: a random source model with
# many classes then scores close to a perfect one.
_MIN_SAMPLES_PER_SOURCE_CLASS = 5.0


# Probabilities larger than this are not in cache any more when a second pass reads them:
# their sign check then runs block by block, each block right before its matrix product.
_CACHED_BYTES = 2 * 1024 * 1024
_BLOCK_BYTES = 512 * 1024


def _probabilities(x: object, name: str) -> np.ndarray:
    """``(N, Z)`` float64 probabilities, checked except for signs and row sums.

    The signs are checked by ``_joint_and_signs`` in the pass that computes the joint
    distribution; the row sums (and NaN/inf, which make them non-finite) from a product
    the caller computes anyway (``_check_row_sums``).
    """
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and x.ndim == 2:
        if x.shape[0] < 2 or x.shape[1] == 0:
            as_numpy_features(x, name, min_samples=2)  # raises the usual message
        return x  # fast path: no NaN/inf scan here
    return as_numpy_features(x, name, min_samples=2)


def _check_signs(low: float, name: str) -> None:
    """Raise for a negative minimum; a NaN minimum is left to the finite-value check."""
    if low < 0:
        raise ValueError(f"{name}: expected probabilities >= 0; pass softmax(logits), not logits")


def _joint_and_signs(p: np.ndarray, targets: np.ndarray, name: str) -> np.ndarray:
    """``targets.T @ p``, the ``(C, Z)`` joint counts, with ``p >= 0`` checked in the same pass.

    Small ``p`` stays in cache: one ``min`` and one product. A large ``p`` is read from
    memory once, block by block: each block's ``min`` brings it into cache and its
    product then reads it from there, so the check adds no pass over memory (measured:
    the blocked product with its checks takes no longer than one product over all of
    ``p``). As with a single ``min``, NaN anywhere leaves the error to the caller's
    finite-value check.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported by the caller
        if p.nbytes <= _CACHED_BYTES:
            _check_signs(p.min(), name)
            joint = p.T @ targets  # (Z, C): faster than targets.T @ p in BLAS
        else:
            joint = _blocked_joint_and_signs(p, targets, name)
    # C order: `p @ conditional.T` (BLAS) and the rows `joint[index]` read it fastest
    out: np.ndarray = np.ascontiguousarray(joint.T)
    return out


def _blocked_joint_and_signs(p: np.ndarray, targets: np.ndarray, name: str) -> np.ndarray:
    """``p.T @ targets`` over blocks of rows; each block's ``min`` loads it for its product."""
    rows = max(8, _BLOCK_BYTES // (8 * p.shape[1]))
    joint = np.zeros((p.shape[1], targets.shape[1]))
    low, nan = 0.0, False
    for start in range(0, p.shape[0], rows):
        block = p[start : start + rows]
        block_min = float(block.min())
        if block_min < low:
            low = block_min
        elif block_min != block_min:
            nan = True
        joint += block.T @ targets[start : start + rows]
    if not nan:
        _check_signs(low, name)
    return joint


def _check_row_sums(sums: np.ndarray, name: str) -> None:
    low, high = float(sums.min()), float(sums.max())
    if low >= 1.0 - 1e-3 and high <= 1.0 + 1e-3:  # False for NaN too
        return
    if not np.isfinite(sums).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    raise ValueError(
        f"{name}: expected rows that sum to 1, got sums in [{low:.4g}, {high:.4g}]; "
        "pass softmax(logits), not logits"
    )


def _resolve_estimator(
    score: str, estimator: Estimator, samples: int, source_classes: float
) -> Estimator:
    """``"auto"``: the paper's formula unless it would overfit (too few samples per class)."""
    per_class = samples / max(source_classes, 1.0)
    if estimator != "auto":
        if estimator == "empirical":
            _warn_few_per_source_class(score, samples, source_classes)
        return estimator
    if per_class >= _MIN_SAMPLES_PER_SOURCE_CLASS:
        return "empirical"
    logger.info(
        "%s: %.1f target samples per source class in use: leave-one-out estimate", score, per_class
    )
    return "leave_one_out"


def _warn_few_per_source_class(score: str, samples: int, source_classes: float) -> None:
    per_class = samples / max(source_classes, 1.0)
    if per_class < _MIN_SAMPLES_PER_SOURCE_CLASS:
        warnings.warn(
            f"{score}: {samples} target samples for ~{source_classes:.0f} source classes in "
            f"use ({per_class:.1f} per class): the in-sample estimate of P(y | z) overfits and "
            "can rank a random source model first; pass estimator='leave_one_out'",
            UserWarning,
            stacklevel=3,
        )


def _check_estimator(estimator: object) -> Estimator:
    return check_option(estimator, "estimator", ESTIMATORS)


def leep(source_probs: ArrayLike, labels: ArrayLike, *, estimator: Estimator = "auto") -> float:
    r"""LEEP: log expected empirical prediction (Nguyen et al., 2020).

    With $\theta(x)$ the source classifier's probabilities over its $Z$
    source classes, the empirical joint distribution of target label and source class is
    $\hat P(y, z) = \frac1N\sum_i \theta(x_i)_z [y_i = y]$ and
    $\hat P(y | z) = \hat P(y, z) / \hat P(z)$. The score is the average
    log-likelihood of the "expected empirical predictor":

    $$
    \text{LEEP} = \frac1N \sum_i \log \sum_z \hat P(y_i | z)\, \theta(x_i)_z.
    $$

    ``estimator="empirical"`` is this formula of the paper. It estimates
    $\hat P(y | z)$ on the same samples it scores, so with few target samples per
    source class (e.g. a 1000-class ImageNet model on a few hundred target images) it
    overfits: confident random predictions then score close to 0, above informative
    ones. A ``UserWarning`` says so when there are fewer than 5 samples per source class
    in use (``exp`` of the entropy of $\hat P(z)$). ``estimator="leave_one_out"``
    scores every sample with $\hat P(y | z)$ estimated without it, each source class
    given one pseudo-sample distributed like the target labels:

    $$
    \hat P_{-i}(y | z) = \frac{\sum_{j \ne i} \theta(x_j)_z [y_j = y] + \pi_{-i}(y)}
    {\sum_{j \ne i} \theta(x_j)_z + 1},
    \qquad \pi_{-i}(y) = \frac{\#\{j \ne i: y_j = y\} + 1}{N - 1 + C},
    $$

    which does not reward noise: it tends to $\log \pi(y)$ (no information) for a
    random source model with many classes, and to the empirical score when every source
    class has many samples.

    Args:
        source_probs: the source model's softmax outputs on the target inputs (rows sum
            to 1; apply ``softmax`` to logits first).
        labels: target class labels.
        estimator: ``"auto"`` (default: ``"empirical"`` with at least 5 samples per
            source class in use, else ``"leave_one_out"``), ``"empirical"`` (the paper's
            in-sample formula) or ``"leave_one_out"`` (see above).

    Returns:
        The LEEP score, ``<= 0``; higher means better transferability.

    Shape:
        - ``source_probs``: ``(N, Z)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: negative entries or rows that do not sum to 1, mismatched lengths,
            an unknown ``estimator``.
        TypeError: non-numeric probabilities or non-integer labels.

    Examples:
        >>> import numpy as np
        >>> labels = np.repeat([0, 1], 10)
        >>> informative = np.where(labels[:, None] == [0, 1], 0.9, 0.1)
        >>> uninformative = np.full((20, 2), 0.5)
        >>> round(leep(uninformative, labels), 4)
        -0.6931
        >>> leep(informative, labels) > leep(uninformative, labels)
        True
    """
    p = _probabilities(source_probs, "source_probs")
    try:
        y = labels_array(labels, "labels", num_samples=p.shape[0])
        estimator = _check_estimator(estimator)
    except (TypeError, ValueError):
        _check_signs(p.min(), "source_probs")  # negative probabilities are reported first
        raise
    index, num_classes = _dense_labels(y)
    n = p.shape[0]
    # joint (C, Z) and the predictor's (N, C) outputs are matrix products (BLAS)
    targets = np.zeros((n, num_classes))
    targets[np.arange(n), index] = 1.0
    joint = _joint_and_signs(p, targets, "source_probs")
    marginal = np.ones(num_classes) @ joint  # column sums by one GEMV
    # NaN/inf in p reach their column's sum; without NaN, p >= 0 was checked, so a
    # non-finite sum is NaN or +inf and shows in the maximum
    if not float(marginal.max()) < math.inf:
        raise ValueError("source_probs: expected finite values, got NaN or inf")
    every_class_used = float(marginal.min()) > 0
    nonzero = marginal / n if every_class_used else marginal[marginal > 0] / n
    effective = math.exp(-float(np.dot(nonzero, np.log(nonzero))))
    estimator = _resolve_estimator("leep", estimator, n, effective)
    if estimator == "empirical":
        if every_class_used:
            conditional = joint / marginal
        else:
            used = marginal > 0
            conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=used)
        predictions = p @ conditional.T  # (N, C)
        # rows of P(y | z) sum to 1 over y wherever some sample has mass on z (and p >= 0),
        # so the rows of `predictions` sum like the rows of p: the sum-to-1 (and NaN/inf)
        # check costs no extra pass over p
        _check_row_sums(predictions @ np.ones(num_classes), "source_probs")
        expected = predictions[np.arange(n), index]
        return float(np.log(expected).mean())
    _check_row_sums(p.sum(1), "source_probs")
    counts = targets.sum(0)
    prior = counts[index] / (n - 1 + num_classes)
    own = np.maximum(joint[index] - p, 0.0)  # (N, Z): joint without sample i
    expected = (p * (own + prior[:, None]) / (marginal - p + 1.0)).sum(1)
    return float(np.log(np.minimum(expected, 1.0)).mean())


def nce(
    source_labels_pred: ArrayLike, labels: ArrayLike, *, estimator: Estimator = "auto"
) -> float:
    r"""NCE: negative conditional entropy of target labels given source labels.

    Tran et al. (2019): with $z_i$ the source model's predicted (hard) source class
    of target sample $i$, and the empirical joint $\hat P(y, z)$,

    $$
    \text{NCE} = -H(Y | Z) = \sum_{y, z} \hat P(y, z) \log \hat P(y | z).
    $$

    ``estimator="empirical"`` is this formula. Like [`leep`][] it is an
    in-sample estimate: a source class predicted for a single target sample "determines"
    its label, so random predictions over many source classes score close to 0. A
    ``UserWarning`` says so when there are fewer than 5 samples per predicted source
    class. ``estimator="leave_one_out"`` returns
    $\frac1N \sum_i \log \hat P_{-i}(y_i | z_i)$ with
    $\hat P_{-i}(y | z) = (n_{yz} - [y = y_i] + \pi_{-i}(y)) / n_z$ (counts without
    sample $i$ plus one pseudo-sample distributed like the target labels,
    $\pi_{-i}(y) = (n_y - [y = y_i] + 1) / (N - 1 + C)$): a held-out estimate of
    $-H(Y | Z)$ that does not reward noise. The default ``estimator="auto"`` uses the
    paper's formula with at least 5 samples per predicted source class, else this one.

    Args:
        source_labels_pred: predicted source classes ``(N,)`` (integers), or source
            probabilities/logits ``(N, Z)`` whose ``argmax`` is taken.
        labels: target class labels.
        estimator: ``"auto"`` (default; see above), ``"empirical"`` (the paper's
            formula) or ``"leave_one_out"``.

    Returns:
        NCE in nats, ``<= 0``; higher (closer to 0) means better transferability.

    Shape:
        - ``source_labels_pred``: ``(N,)`` or ``(N, Z)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: mismatched lengths, negative labels, an unknown ``estimator``.
        TypeError: wrong dtypes.

    Examples:
        >>> import numpy as np
        >>> labels = np.repeat([0, 1], 10)
        >>> nce(np.repeat([3, 5], 10), labels)  # source class determines the label
        0.0
        >>> round(nce(np.tile([3, 5], 10), labels), 4)  # independent: -log 2
        -0.6931
    """
    if isinstance(source_labels_pred, (np.ndarray, Tensor)) and source_labels_pred.ndim == 2:
        scores = as_numpy_features(source_labels_pred, "source_labels_pred", min_samples=1)
        z = scores.argmax(1)
    else:
        if isinstance(source_labels_pred, (np.ndarray, Tensor)) and source_labels_pred.ndim != 1:
            raise ValueError(
                "source_labels_pred: expected (N,) predicted classes or (N, Z) scores, got "
                f"shape {tuple(source_labels_pred.shape)}"
            )
        z = labels_array(
            source_labels_pred,
            "source_labels_pred",
            num_samples=len(source_labels_pred),
        )
    y = labels_array(labels, "labels", num_samples=z.shape[0])
    estimator = _check_estimator(estimator)
    n = y.shape[0]
    if n == 0:
        raise ValueError("labels: expected at least 1 sample, got 0")
    z_index, z_classes = _dense_labels(z)
    y_index, num_classes = _dense_labels(y)
    counts = np.bincount(z_index * num_classes + y_index, minlength=z_classes * num_classes)
    joint = counts.reshape(z_classes, num_classes).astype(np.float64)
    marginal = joint.sum(1)
    if n >= 2 or estimator == "auto":
        estimator = _resolve_estimator("nce", estimator, n, float(z_classes))
    if estimator == "leave_one_out":
        class_counts = joint.sum(0)
        prior = class_counts[y_index] / (n - 1 + num_classes)
        held_out = (joint[z_index, y_index] - 1.0 + prior) / marginal[z_index]
        return float(np.log(held_out).mean())
    ratio = np.divide(joint, marginal[:, None], out=np.ones_like(joint), where=joint > 0)
    return float((joint * np.log(ratio)).sum() / n) + 0.0
