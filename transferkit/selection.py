"""Choosing what to transfer: transferability scores and unsupervised validation.

Two questions, two families of functions.

**Which pretrained model (or layer) should I transfer from?** Extract each candidate's
features (or source-class probabilities) on the labelled target data and score them;
higher is better for every score. No fine-tuning is needed.

* [`logme`][] -- log maximum evidence of a Bayesian linear model (You et al., 2021).
* [`leep`][] -- log expected empirical prediction of the source classifier
  (Nguyen et al., 2020).
* [`hscore`][] -- H-score (Bao et al., 2019), by default with the Ledoit-Wolf
  regularised covariance of Ibrahim et al. (2022), so that noise does not rank first.
* [`nce`][] -- negative conditional entropy of target labels given source labels
  (Tran et al., 2019).
* [`knn_score`][], [`linear_probe_score`][] -- cross-validated baselines.
* [`rank`][] -- scores several candidates and returns a [`Ranking`][] table.

**Which adapted model (or trade-off weight) is best when the target has no labels?**
Score each adapted model on labelled *source* validation data and unlabelled target
data.

* [`iwcv`][] -- importance-weighted validation risk (Sugiyama et al., 2007); lower
  is better.
* [`dev`][] -- deep embedded validation risk (You et al., 2019); lower is better.
* [`snd`][] -- soft neighbourhood density of target predictions (Saito et al., 2021);
  higher is better.
* [`prediction_entropy`][] -- mean entropy of target predictions; lower is better.
* [`importance_weights`][] -- the density ratio ``p_target(x) / p_source(x)`` from a
  domain classifier, shared by [`iwcv`][] and [`dev`][].

Everything accepts ``numpy`` arrays or ``torch`` tensors and computes in float64 NumPy
(``snd`` in float32 torch), returning plain Python floats.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, overload

import numpy as np
import torch
from torch import Tensor

from ._validation import check_bool, check_option, check_positive, did_you_mean
from .metrics import as_numpy_features, as_numpy_labels, make_domain_classifier

__all__ = [
    "RankedCandidate",
    "Ranking",
    "dev",
    "hscore",
    "importance_weights",
    "iwcv",
    "knn_score",
    "leep",
    "linear_probe_score",
    "logme",
    "nce",
    "prediction_entropy",
    "rank",
    "snd",
]

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | Tensor
ScoreName = Literal["logme", "hscore", "leep", "nce", "knn", "linear_probe"]
SCORES: tuple[ScoreName, ...] = ("logme", "hscore", "leep", "nce", "knn", "linear_probe")


def _one_hot(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` one-hot float64 targets over the classes present, and those classes."""
    classes, index = np.unique(labels, return_inverse=True)
    targets = np.zeros((labels.shape[0], classes.shape[0]), dtype=np.float64)
    targets[np.arange(labels.shape[0]), index.reshape(-1)] = 1.0
    return targets, classes


def _features_and_labels(
    features: object, labels: object, *, min_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    f = as_numpy_features(features, "features", min_samples=2)
    y = as_numpy_labels(labels, "labels", num_samples=f.shape[0])
    if np.unique(y).shape[0] < min_classes:
        raise ValueError(f"labels: expected at least {min_classes} distinct classes")
    return f, y


# --------------------------------------------------------------------------- scores


def logme(features: ArrayLike, labels: ArrayLike) -> float:
    r"""LogME: log maximum evidence of a linear model on the features (You et al., 2021).

    For every class $c$ the one-hot target column $y_c$ is modelled as
    $y_c = F w + \text{noise}$ with prior $w \sim N(0, \alpha^{-1} I)$ and
    noise precision $\beta$. $\alpha, \beta$ maximise the evidence
    $p(y_c | F, \alpha, \beta)$ by MacKay's fixed-point iteration in the SVD basis
    of $F$ (the paper's fixed-point algorithm: $\alpha = \beta = 1$ at the
    start, at most 11 iterations, stop when $\alpha / \beta$ changes by less than
    0.1 %, ``1e-5`` added to the residuals). The score is the mean over classes of the
    maximised log evidence divided by $N$:

    $$
    \frac{1}{N}\Big[\tfrac{D}{2}\log\alpha + \tfrac{N}{2}\log\beta
    - \tfrac12\log|\alpha I + \beta F^\top F| - \tfrac{\beta}{2}\|F m - y_c\|^2
    - \tfrac{\alpha}{2}\|m\|^2 - \tfrac{N}{2}\log 2\pi\Big].
    $$

    This equals the authors' reference implementation whenever ``features`` has full
    column rank (``N > D``). When it does not, the log-determinant here keeps the
    $(D - \text{rank})\log\alpha$ term of the zero singular values (the evidence as
    the paper defines it), which the reference's truncated SVD drops. Classes are the
    distinct values in ``labels``. Features are used as given (no centring).

    Args:
        features: target features of one candidate model.
        labels: target class labels.

    Returns:
        The LogME score (higher means better transferability). Comparable between
        candidates on the same target data only.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)`` integers, at least 2 classes.

    Raises:
        ValueError: NaN/inf, mismatched lengths, fewer than 2 samples or classes.
        TypeError: non-numeric features or non-integer labels.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 3, size=300)
        >>> good = np.eye(3)[labels] + 0.1 * rng.normal(size=(300, 3))
        >>> noise = rng.normal(size=(300, 3))
        >>> logme(good, labels) > logme(noise, labels)
        True
    """
    f, y = _features_and_labels(features, labels)
    targets, _ = _one_hot(y)
    n, d = f.shape
    if n > d:
        # Eigen-decomposition of the (D, D) Gram matrix: cheaper than an SVD of F.
        sigma, v = np.linalg.eigh(f.T @ f)
        sigma = np.clip(sigma, 0.0, None)
        singular = np.sqrt(sigma)
        positive = singular > 1e-10 * max(float(singular.max()), 1e-300)
        x = np.zeros((d, targets.shape[1]))
        x[positive] = (v[:, positive].T @ (f.T @ targets)) / singular[positive, None]
    else:
        u, singular, _ = np.linalg.svd(f, full_matrices=False)
        sigma = singular**2
        x = u.T @ targets
    sigma = sigma[:, None]
    x2 = x**2
    residual_x2 = (targets**2).sum(0) - x2.sum(0)
    missing = d - sigma.shape[0]  # zero singular values not returned by the thin SVD

    num_classes = targets.shape[1]
    alpha = np.ones(num_classes)
    beta = np.ones(num_classes)
    m2 = np.zeros(num_classes)
    res2 = np.zeros(num_classes)
    active = np.ones(num_classes, dtype=bool)
    for _ in range(11):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum(0)
        new_m2 = (sigma * x2 / (t + sigma) ** 2).sum(0)
        new_res2 = (x2 / (1.0 + sigma / t) ** 2).sum(0) + residual_x2
        new_alpha = gamma / (new_m2 + 1e-5)
        new_beta = (n - gamma) / (new_res2 + 1e-5)
        m2 = np.where(active, new_m2, m2)
        res2 = np.where(active, new_res2, res2)
        converged = np.abs(new_alpha / new_beta - t) / t <= 1e-3
        alpha = np.where(active, new_alpha, alpha)
        beta = np.where(active, new_beta, beta)
        active &= ~converged
        if not active.any():
            break
    log_det = np.log(alpha + beta * sigma).sum(0) + missing * np.log(alpha)
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * log_det
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - n / 2.0 * math.log(2.0 * math.pi)
    ) / n
    return float(evidence.mean())


Estimator = Literal["auto", "empirical", "leave_one_out"]
ESTIMATORS: tuple[Estimator, ...] = ("auto", "empirical", "leave_one_out")
# Fewer target samples than this per source class (on average) and the in-sample
# estimate of P(y | z) that LEEP and NCE rest on overfits: a random source model with
# many classes then scores close to a perfect one.
_MIN_SAMPLES_PER_SOURCE_CLASS = 5.0


def _probabilities(x: object, name: str) -> np.ndarray:
    """``(N, Z)`` float64 probabilities, checked except for the row sums.

    The row sums (and NaN/inf, which make them non-finite) are checked by the caller,
    from a product it computes anyway (``_check_row_sums``).
    """
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and x.ndim == 2:
        if x.shape[0] < 2 or x.shape[1] == 0:
            as_numpy_features(x, name, min_samples=2)  # raises the usual message
        p = x  # fast path: no NaN/inf scan here
    else:
        p = as_numpy_features(x, name, min_samples=2)
    low = p.min()
    if low < 0:
        raise ValueError(f"{name}: expected probabilities >= 0; pass softmax(logits), not logits")
    return p


def _check_row_sums(sums: np.ndarray, name: str) -> None:
    if not np.isfinite(sums).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    if np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError(
            f"{name}: expected rows that sum to 1, got sums in [{sums.min():.4g}, "
            f"{sums.max():.4g}]; pass softmax(logits), not logits"
        )


def _dense_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered ``0..C-1`` in sorted order, and ``C``."""
    high = int(y.max()) if y.shape[0] else 0
    if high < 4 * y.shape[0] + 64:  # small label values: bincount instead of a sort
        present = np.bincount(y, minlength=high + 1) > 0
        if present.all():
            return y, high + 1
        code = np.cumsum(present) - 1
        return code[y], int(present.sum())
    classes, index = np.unique(y, return_inverse=True)
    return index.reshape(-1), int(classes.shape[0])


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
    y = as_numpy_labels(labels, "labels", num_samples=p.shape[0])
    estimator = _check_estimator(estimator)
    index, num_classes = _dense_labels(y)
    n = p.shape[0]
    # joint (C, Z) and the predictor's (N, C) outputs are matrix products (BLAS)
    targets = np.zeros((n, num_classes))
    targets[np.arange(n), index] = 1.0
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported below
        joint = (p.T @ targets).T  # (C, Z); faster than targets.T @ p in BLAS
    marginal = joint.sum(0)
    if not np.isfinite(marginal).all():  # any NaN/inf in p reaches its column's sum
        raise ValueError("source_probs: expected finite values, got NaN or inf")
    nonzero = marginal[marginal > 0] / n
    effective = float(np.exp(-(nonzero * np.log(nonzero)).sum()))
    estimator = _resolve_estimator("leep", estimator, n, effective)
    if estimator == "empirical":
        conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
        predictions = p @ conditional.T  # (N, C)
        # rows of P(y | z) sum to 1 over y wherever some sample has mass on z (and p >= 0),
        # so the rows of `predictions` sum like the rows of p: the sum-to-1 (and NaN/inf)
        # check costs no extra pass over p
        _check_row_sums(predictions.sum(1), "source_probs")
        expected = predictions[np.arange(n), index]
        return float(np.log(expected).mean())
    _check_row_sums(p.sum(1), "source_probs")
    counts = targets.sum(0)
    prior = counts[index] / (n - 1 + num_classes)
    own = np.maximum(joint[index] - p, 0.0)  # (N, Z): joint without sample i
    expected = (p * (own + prior[:, None]) / (marginal - p + 1.0)).sum(1)
    return float(np.log(np.minimum(expected, 1.0)).mean())


def _ledoit_wolf_shrinkage(x: np.ndarray, gram: np.ndarray) -> float:
    """Ledoit-Wolf (2004) shrinkage of centred ``x`` towards a scaled identity.

    ``gram`` is ``x.T @ x`` or ``x @ x.T`` (same Frobenius norm). The formula of
    scikit-learn's ``ledoit_wolf_shrinkage``, without its blocks of ``X2.T @ X2``.
    """
    n, d = x.shape
    squared_norms = np.einsum("ij,ij->i", x, x)
    mu = float(squared_norms.sum()) / (n * d)
    beta_ = float((squared_norms**2).sum())
    delta_ = float(np.einsum("ij,ij->", gram, gram)) / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else beta / delta


def hscore(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    shrinkage: float | Literal["ledoit_wolf"] | None = "ledoit_wolf",
) -> float:
    r"""H-score of features for a classification task (Bao et al., 2019), regularised.

    $$
    H_\alpha(f) = \operatorname{tr}\big(\operatorname{cov}_\alpha(f)^{-1}\,
    (1 - \alpha) \operatorname{cov}(\mathbb E[f | y])\big),
    \qquad
    \operatorname{cov}_\alpha(f) = (1 - \alpha) \operatorname{cov}(f) + \alpha\, \mu I
    $$

    where $\operatorname{cov}$ is the unbiased sample covariance,
    $\mu = \operatorname{tr}\operatorname{cov}(f) / D$ and
    $\mathbb E[f | y]$ replaces every sample by the mean feature of its class.

    By default $\alpha$ is the Ledoit-Wolf shrinkage, which is what Ibrahim, Ponomareva
    & Mazumder (2022, "Newer is not always better") call the regularised H-score
    ($H_\alpha$): without it, the covariance of ``D`` features from ``N <= D + 1``
    samples is singular, every labelling of the samples is linearly separable and the
    H-score of *pure noise* reaches its maximum ``C - 1``, so noise ranks first. With
    it, noise of a few times ``N`` dimensions scores near 0. The regularised score still
    has a chance level, the value that features independent of the labels get,
    $(1 - \alpha) \frac{C - 1}{N - 1} \operatorname{tr}(\operatorname{cov}_\alpha(f)^{-1}
    \operatorname{cov}(f))$ in expectation: it grows with ``D / N`` and with ``C / N``
    (10 classes, 40 samples: noise of 400 dimensions scores about 3 of 9, of 4000
    about 7.6). A ``UserWarning`` gives it when it exceeds a quarter of ``C - 1``: there
    noise of many dimensions can outrank a weakly informative candidate. The value
    equals the authors' implementation (scikit-learn's ``LedoitWolf``, biased covariance) times
    ``(N - 1) / N``, a factor shared by all candidates scored on the same samples.

    ``shrinkage=None`` (or ``0``) gives the original score of Bao et al. with the
    Moore-Penrose pseudo-inverse, $\operatorname{tr}(\operatorname{cov}(f)^{+}
    \operatorname{cov}(\mathbb E[f | y]))$, at most ``C - 1`` for ``C`` classes and
    invariant to invertible affine maps of the features; it warns when
    ``D >= N - 1``. A number in ``[0, 1]`` fixes $\alpha$.

    Args:
        features: target features of one candidate model.
        labels: target class labels.
        shrinkage: ``"ledoit_wolf"`` (default), a fixed $\alpha$ in ``[0, 1]``, or
            ``None`` for the unregularised H-score.

    Returns:
        The H-score; higher means better transferability.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)``, at least 2 classes.

    Raises:
        ValueError: NaN/inf, mismatched lengths, fewer than 2 samples or classes,
            ``shrinkage`` outside ``[0, 1]`` or an unknown name.
        TypeError: non-numeric features, non-integer labels, or a ``shrinkage`` that is
            neither a number, a name nor ``None``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = rng.integers(0, 3, size=300)
        >>> good = np.eye(3)[labels] + 0.1 * rng.normal(size=(300, 3))
        >>> round(hscore(good, labels, shrinkage=None), 2)
        1.94
        >>> noise = rng.normal(size=(300, 600))  # more dimensions than samples
        >>> hscore(noise, labels) < 0.1 < hscore(good, labels)
        True
    """
    f, y = _features_and_labels(features, labels)
    alpha = _check_shrinkage(shrinkage)
    n, d = f.shape
    index, num_classes = _dense_labels(y)
    counts = np.bincount(index, minlength=num_classes).astype(np.float64)
    x = f - f.mean(0)
    targets = np.zeros((n, num_classes))
    targets[np.arange(n), index] = 1.0
    weights = counts / (n - 1)  # cov(E[f|y]) = M^T diag(weights) M, M the class means
    if alpha is None or alpha == 0.0:
        if d >= n - 1:
            warnings.warn(
                f"hscore: {d} feature dimensions for {n} samples: without shrinkage the "
                f"covariance is singular and any features (noise included) reach the "
                f"maximum {num_classes - 1}; use shrinkage='ledoit_wolf'",
                UserWarning,
                stacklevel=2,
            )
        means = (targets.T @ x) / counts[:, None]
        cov = (x.T @ x) / (n - 1)
        solved = np.linalg.pinv(cov, hermitian=True) @ means.T
        return float((weights * np.einsum("cd,dc->c", means, solved)).sum())
    gram = x.T @ x if d <= n else x @ x.T
    if alpha == "ledoit_wolf":
        alpha = _ledoit_wolf_shrinkage(x, gram)
    mu = float(np.trace(gram)) / ((n - 1) * d)
    if alpha >= 1.0 or mu == 0.0:
        return 0.0
    a, b = (1.0 - alpha) / (n - 1), alpha * mu  # cov_alpha = a X^T X + b I
    _warn_chance_level(gram, a, b, alpha, n, d, num_classes)
    if d <= n:
        means = (targets.T @ x) / counts[:, None]
        system = a * gram
        system[np.diag_indices(d)] += b
        quadratic = np.einsum("cd,dc->c", means, np.linalg.solve(system, means.T))
    else:
        # Woodbury: (a X^T X + b I)^-1 = (I - X^T (b/a I + X X^T)^-1 X) / b, so only an
        # (N, N) system is solved; X M^T = (X X^T) T / counts.
        projected = (gram @ targets) / counts  # (N, C) = X @ means.T
        squared = np.einsum("nc,nc->c", targets, projected) / counts  # |m_c|^2
        system = gram.copy()
        system[np.diag_indices(n)] += b / a
        inner = np.einsum("nc,nc->c", projected, np.linalg.solve(system, projected))
        quadratic = (squared - inner) / b
    return float((1.0 - alpha) * (weights * quadratic).sum())


# share of the maximum C - 1 that label-independent features reach before hscore warns
_CHANCE_SHARE = 0.25


def _warn_chance_level(
    gram: np.ndarray, a: float, b: float, alpha: float, n: int, d: int, num_classes: int
) -> None:
    """Warn when features independent of the labels would score a large share of C - 1.

    For such features the class means are noise: E[cov(E[f | y])] = (C - 1) / (N - 1)
    cov(f), so the expected regularised score is
    (1 - alpha) (C - 1) / (N - 1) tr(cov_alpha^-1 cov(f)), computed from the spectrum.
    """
    eigenvalues = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    trace = float((eigenvalues / (a * eigenvalues + b)).sum()) / (n - 1)
    chance = (1.0 - alpha) * (num_classes - 1) / (n - 1) * trace
    if chance > _CHANCE_SHARE * (num_classes - 1):
        warnings.warn(
            f"hscore: with {n} samples, {num_classes} classes and {d} feature dimensions, "
            f"features independent of the labels would score about {chance:.3g} (of the "
            f"maximum {num_classes - 1}): a candidate near that level carries no "
            "information, and pure noise of more dimensions can outscore a weakly "
            "informative candidate; use more samples or fewer dimensions (e.g. PCA)",
            UserWarning,
            stacklevel=3,
        )


def _check_shrinkage(shrinkage: object) -> float | Literal["ledoit_wolf"] | None:
    if shrinkage is None:
        return None
    if isinstance(shrinkage, str):
        check_option(shrinkage, "shrinkage", ("ledoit_wolf",))
        return "ledoit_wolf"
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float, np.floating)):
        raise TypeError(
            "shrinkage: expected 'ledoit_wolf', a number in [0, 1] or None, got "
            f"{type(shrinkage).__name__}"
        )
    value = float(shrinkage)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"shrinkage: expected a number in [0, 1], got {shrinkage}")
    return value


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
        z = as_numpy_labels(
            source_labels_pred,
            "source_labels_pred",
            num_samples=len(source_labels_pred),
        )
    y = as_numpy_labels(labels, "labels", num_samples=z.shape[0])
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


def _cv_splits(labels: np.ndarray, folds: int, seed: int) -> object:
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(np.unique(labels, return_inverse=True)[1].reshape(-1)).min())
    if smallest < 2:
        raise ValueError("labels: every class needs at least 2 samples for cross-validation")
    return StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)


def knn_score(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = 5,
    metric: Literal["cosine", "euclidean"] = "cosine",
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated k-nearest-neighbour accuracy of the features (a baseline score).

    Stratified ``folds``-fold cross-validation (fewer folds when the smallest class is
    smaller) of a ``k``-NN classifier (scikit-learn, brute force).

    Args:
        features: target features of one candidate model.
        labels: target class labels (every class at least 2 samples).
        k: neighbours.
        metric: ``"cosine"`` or ``"euclidean"`` distance.
        folds: cross-validation folds (at least 2).
        seed: seed of the fold assignment.

    Returns:
        Mean held-out accuracy in ``[0, 1]``; higher is better.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: invalid inputs, a class with a single sample, bad ``k``/``folds``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 50)
        >>> features = np.eye(2)[labels] + 0.1 * rng.normal(size=(100, 2))
        >>> knn_score(features, labels)
        1.0
    """
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    f, y = _features_and_labels(features, labels)
    check_positive(k, "k", integer=True)
    check_option(metric, "metric", ("cosine", "euclidean"))
    if check_positive(folds, "folds", integer=True) < 2:
        raise ValueError(f"folds: expected at least 2, got {folds}")
    model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute")
    scores = cross_val_score(model, f, y, cv=_cv_splits(y, folds, seed))
    return float(np.mean(scores))


def linear_probe_score(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated accuracy of a linear probe on the features (a baseline score).

    Standardised features, then multinomial logistic regression with inverse
    regularisation ``C``, evaluated by stratified ``folds``-fold cross-validation.

    Args:
        features: target features of one candidate model.
        labels: target class labels (every class at least 2 samples).
        C: inverse regularisation strength.
        folds: cross-validation folds (at least 2).
        seed: seed of the fold assignment.

    Returns:
        Mean held-out accuracy in ``[0, 1]``; higher is better.

    Shape:
        - ``features``: ``(N, D)``; ``labels``: ``(N,)``.

    Raises:
        ValueError: invalid inputs, a class with a single sample, bad ``C``/``folds``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 50)
        >>> features = np.eye(2)[labels] + 0.1 * rng.normal(size=(100, 2))
        >>> linear_probe_score(features, labels)
        1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, y = _features_and_labels(features, labels)
    check_positive(C, "C")
    if check_positive(folds, "folds", integer=True) < 2:
        raise ValueError(f"folds: expected at least 2, got {folds}")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    scores = cross_val_score(model, f, y, cv=_cv_splits(y, folds, seed))
    return float(np.mean(scores))


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
    given instead of a name. Ties keep the input order.

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
        ValueError: no candidates, an unknown score name, or invalid candidate data.
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
    results: list[tuple[str, float]] = []
    for candidate, values in candidates.items():
        try:
            value = float(function(values, labels))
        except (ValueError, TypeError) as error:
            raise type(error)(f"candidate {candidate!r}: {error}") from error
        logger.info("rank: %s %s = %.4f", candidate, name, value)
        results.append((str(candidate), value))
    order = sorted(range(len(results)), key=lambda i: -results[i][1])
    rows = tuple(
        RankedCandidate(position + 1, results[i][0], results[i][1])
        for position, i in enumerate(order)
    )
    return Ranking(name, rows)


# --------------------------------------------------------------------------- validators


def importance_weights(
    source_features: ArrayLike,
    target_features: ArrayLike,
    *,
    clip: float | None = None,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    r"""Density ratio $w(x) = p_T(x) / p_S(x)$ at the source samples.

    A domain classifier (standardised features, logistic regression with inverse
    regularisation ``C``) learns $P(\text{target} | x)$; Bayes' rule gives

    $$
    w(x) = \frac{N_S}{N_T} \frac{P(\text{target}|x)}{P(\text{source}|x)}.
    $$

    The probability of each source sample comes from a classifier that did not see it
    (``folds``-fold cross-fitting), so that an over-confident classifier does not inflate
    the weights of its own training points. Under covariate shift, the mean of
    $w(x)\,\ell(x)$ over source samples estimates the target risk.

    **Clipping.** Where the domains barely overlap a few weights explode and the estimate
    becomes noisy. ``clip`` caps every weight at ``clip`` (in units of the mean weight,
    which is ~1): this trades a bias (the most target-like source samples count less than
    they should) for a lower variance. ``None`` (the default) keeps the unbiased weights;
    ``clip`` in 5-20 is a common choice when the features are high-dimensional.

    Args:
        source_features: features of the labelled source (validation) samples.
        target_features: features of unlabelled target samples.
        clip: upper bound on the weights, or ``None``.
        C: inverse regularisation strength of the domain classifier.
        folds: cross-fitting folds (at least 2).
        seed: seed of the fold assignment.

    Returns:
        ``(N_s,)`` non-negative float64 weights, not normalised (their mean is close to 1
        when the domain classifier is calibrated).

    Shape:
        - ``source_features``: ``(N_s, D)``, ``target_features``: ``(N_t, D)``.

    Raises:
        ValueError: mismatched dimensions, NaN/inf, too few samples, bad ``clip``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> source = rng.normal(size=(500, 1))
        >>> target = rng.normal(loc=1.0, size=(500, 1))
        >>> w = importance_weights(source, target)
        >>> bool(w[source[:, 0] > 1].mean() > w[source[:, 0] < -1].mean())
        True
    """
    source = as_numpy_features(source_features, "source_features", min_samples=2)
    target = as_numpy_features(target_features, "target_features", min_samples=2)
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            "source_features and target_features: expected the same feature dimension, got "
            f"{source.shape[1]} and {target.shape[1]}"
        )
    if clip is not None:
        check_positive(clip, "clip")
    check_positive(C, "C")
    if check_positive(folds, "folds", integer=True) < 2:
        raise ValueError(f"folds: expected at least 2, got {folds}")
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n_s, n_t = source.shape[0], target.shape[0]
    pooled = np.concatenate([source, target])
    domain = np.concatenate([np.zeros(n_s, np.int64), np.ones(n_t, np.int64)])
    splits = StratifiedKFold(n_splits=min(folds, n_s, n_t), shuffle=True, random_state=seed)
    model = make_domain_classifier("logistic", C=C, seed=seed)
    proba = cross_val_predict(model, pooled, domain, cv=splits, method="predict_proba")
    p_target = np.clip(proba[:n_s, 1], 1e-12, 1.0 - 1e-12)
    weights: np.ndarray = (n_s / n_t) * p_target / (1.0 - p_target)
    if clip is not None:
        weights = np.minimum(weights, clip * weights.mean())
    return weights


def _losses_and_weights(
    source_losses: object,
    source_features: ArrayLike | None,
    target_features: ArrayLike | None,
    weights: ArrayLike | None,
    **weight_options: object,
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source_losses, (np.ndarray, Tensor)) and source_losses.ndim == 1:
        losses = as_numpy_features(source_losses.reshape(-1, 1), "source_losses")[:, 0]
    else:
        raise ValueError("source_losses: expected a 1-D array or tensor of per-sample losses")
    if weights is not None:
        if source_features is not None or target_features is not None:
            raise ValueError("weights: pass either weights or source/target features, not both")
        if not isinstance(weights, (np.ndarray, Tensor)) or weights.ndim != 1:
            raise ValueError("weights: expected a 1-D array or tensor of importance weights")
        w = as_numpy_features(weights.reshape(-1, 1), "weights")[:, 0]
        if (w < 0).any():
            raise ValueError("weights: expected non-negative importance weights")
    else:
        if source_features is None or target_features is None:
            raise ValueError(
                "source_features and target_features: both are needed to estimate the "
                "importance weights (or pass weights=...)"
            )
        w = importance_weights(source_features, target_features, **weight_options)  # type: ignore[arg-type]
    if w.shape[0] != losses.shape[0]:
        raise ValueError(
            f"source_losses: expected one loss per source sample ({w.shape[0]}), "
            f"got {losses.shape[0]}"
        )
    return losses, w


def iwcv(
    source_losses: ArrayLike,
    source_features: ArrayLike | None = None,
    target_features: ArrayLike | None = None,
    *,
    weights: ArrayLike | None = None,
    clip: float | None = None,
    self_normalize: bool = True,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> float:
    r"""Importance-weighted validation risk (Sugiyama, Krauledat & Müller, 2007).

    Under covariate shift ($p(y|x)$ shared, $p(x)$ differs) the target risk
    of a model equals the source risk re-weighted by $w = p_T(x) / p_S(x)$:

    $$
    \hat R_T = \frac{\sum_i w_i \ell_i}{\sum_i w_i}
    $$

    over held-out labelled source samples with losses $\ell_i$ (or
    $\frac1N\sum_i w_i \ell_i$ with ``self_normalize=False``, the original
    unbiased form; the self-normalised one has a lower variance). Weights come from
    [`importance_weights`][] (a logistic-regression domain classifier on source vs
    target features; see it for ``clip``) unless given. Compare models with the *lowest*
    estimated risk.

    Args:
        source_losses: per-sample losses (e.g. cross-entropy or 0-1 errors) of the model
            on held-out labelled source data.
        source_features: features of those source samples (e.g. the model's bottleneck).
        target_features: features of unlabelled target samples.
        weights: precomputed importance weights instead of the two feature arguments.
        clip: cap on the weights (see [`importance_weights`][]); ``None`` for none.
        self_normalize: divide by the sum of weights instead of ``N``.
        C: inverse regularisation of the domain classifier.
        folds: cross-fitting folds of the domain classifier.
        seed: seed of the folds.

    Returns:
        The estimated target risk (same units as the losses); lower is better.

    Shape:
        - ``source_losses``: ``(N_s,)``; ``source_features``: ``(N_s, D)``;
          ``target_features``: ``(N_t, D)``; ``weights``: ``(N_s,)``.

    Raises:
        ValueError: missing or inconsistent inputs, negative weights, NaN/inf.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> source = rng.normal(size=(1000, 1))
        >>> target = rng.normal(loc=1.5, size=(1000, 1))
        >>> errors = (source[:, 0] > 1).astype(float)  # the model fails on x > 1
        >>> plain = errors.mean()
        >>> weighted = iwcv(errors, source, target)
        >>> true_risk = (target[:, 0] > 1).mean()
        >>> bool(abs(weighted - true_risk) < abs(plain - true_risk))
        True
    """
    check_bool(self_normalize, "self_normalize")
    losses, w = _losses_and_weights(
        source_losses,
        source_features,
        target_features,
        weights,
        clip=clip,
        C=C,
        folds=folds,
        seed=seed,
    )
    if self_normalize:
        total = w.sum()
        if total <= 0:
            raise ValueError("weights: expected a positive sum of importance weights")
        return float((w * losses).sum() / total)
    return float((w * losses).mean())


def dev(
    source_losses: ArrayLike,
    source_features: ArrayLike | None = None,
    target_features: ArrayLike | None = None,
    *,
    weights: ArrayLike | None = None,
    clip: float | None = None,
    C: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> float:
    r"""Deep embedded validation risk (You, Wang, Long & Wang, ICML 2019).

    Importance-weighted validation in the model's feature space, with a control variate
    that removes much of its variance. With density ratios $w_i$ (whose expectation
    over the source is 1) and weighted losses $L_i = w_i \ell_i$,

    $$
    \eta = -\frac{\widehat{\operatorname{Cov}}(L, w)}{\widehat{\operatorname{Var}}(w)},
    \qquad
    \hat R_{\text{DEV}} = \overline{L} + \eta\,\overline{w} - \eta.
    $$

    The weights are the raw (un-normalised) ratios of [`importance_weights`][]
    (normalising them would make the control variate vanish). Compare models with the
    *lowest* estimated risk. If all weights are equal the control variate is dropped.

    Args:
        source_losses: per-sample losses of the model on held-out labelled source data.
        source_features: the model's features of those source samples.
        target_features: the model's features of unlabelled target samples.
        weights: precomputed importance weights instead of the two feature arguments.
        clip: cap on the weights (see [`importance_weights`][]); ``None`` for none.
        C: inverse regularisation of the domain classifier.
        folds: cross-fitting folds of the domain classifier.
        seed: seed of the folds.

    Returns:
        The DEV risk estimate; lower is better.

    Shape:
        - ``source_losses``: ``(N_s,)``; ``source_features``: ``(N_s, D)``;
          ``target_features``: ``(N_t, D)``; ``weights``: ``(N_s,)``.

    Raises:
        ValueError: missing or inconsistent inputs, negative weights, NaN/inf.

    Examples:
        >>> import numpy as np
        >>> losses = np.array([1.0, 2.0, 3.0, 4.0])
        >>> dev(losses, weights=np.ones(4))  # equal weights: the plain mean
        2.5
        >>> # weights averaging exactly 1: the control variate term vanishes
        >>> round(dev(losses, weights=np.array([0.5, 0.5, 1.5, 1.5])), 4)
        3.0
    """
    losses, w = _losses_and_weights(
        source_losses,
        source_features,
        target_features,
        weights,
        clip=clip,
        C=C,
        folds=folds,
        seed=seed,
    )
    weighted = w * losses
    if w.shape[0] < 2 or np.var(w) <= 1e-12 * max(float(np.mean(w)) ** 2, 1e-300):
        return float(weighted.mean())
    cov = np.cov(np.stack([weighted, w]), ddof=1)
    eta = -cov[0, 1] / cov[1, 1]
    return float(weighted.mean() + eta * w.mean() - eta)


def _logits(x: object, name: str) -> np.ndarray:
    return as_numpy_features(x, name, min_samples=1)


def prediction_entropy(target_logits: ArrayLike) -> float:
    r"""Mean entropy of the model's predictions on the target (in nats).

    $\frac1N \sum_i -\sum_c p_{ic} \log p_{ic}$ with
    $p_i = \operatorname{softmax}(\text{logits}_i)$. Confident target predictions
    (low entropy) are a common, if fallible, sign of a well-adapted model (Morerio et
    al., 2018): compare models with the *lowest* entropy, but beware that a model which
    collapses onto one class is also confident.

    Args:
        target_logits: the model's logits on unlabelled target samples.

    Returns:
        Mean entropy in ``[0, log C]``; lower is better.

    Shape:
        - ``target_logits``: ``(N, C)``.

    Raises:
        ValueError: not 2-D, NaN/inf, empty.

    Examples:
        >>> import numpy as np
        >>> round(prediction_entropy(np.zeros((4, 3))), 4)  # uniform: log 3
        1.0986
    """
    from scipy.special import log_softmax

    logits = _logits(target_logits, "target_logits")
    log_p = log_softmax(logits, axis=1)
    return float(-(np.exp(log_p) * log_p).sum(1).mean())


def snd(target_logits: ArrayLike, *, temperature: float = 0.05, chunk_size: int = 2048) -> float:
    r"""Soft neighbourhood density of target predictions (Saito et al., ICCV 2021).

    Following the authors' implementation: the softmax predictions $p_i$ are
    L2-normalised, their cosine similarities $s_{ij}$ (with $s_{ii}$ set to
    -1, so a sample is not its own neighbour) are turned into neighbour distributions
    $q_i = \operatorname{softmax}_j(s_{ij} / \tau)$, and

    $$
    \text{SND} = \frac1N \sum_i -\sum_j q_{ij} \log (q_{ij} + 10^{-5}).
    $$

    A high value means target samples sit in dense neighbourhoods of similar predictions,
    which Saito et al. found to correlate with target accuracy across hyper-parameters.
    Compare models with the *highest* SND.

    Args:
        target_logits: the model's logits on unlabelled target samples.
        temperature: $\tau$ (0.05 in the paper).
        chunk_size: rows of the ``(N, N)`` similarity matrix computed at a time
            (memory ``chunk_size * N`` floats).

    Returns:
        The SND score; higher is better.

    Shape:
        - ``target_logits``: ``(N, C)`` with ``N >= 2``.

    Raises:
        ValueError: fewer than 2 samples, NaN/inf, bad ``temperature``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> clustered = np.eye(3)[rng.integers(0, 3, size=60)] * 10.0
        >>> diffuse = rng.normal(size=(60, 3))
        >>> snd(clustered) > snd(diffuse)
        True
    """
    logits = as_numpy_features(target_logits, "target_logits", min_samples=2)
    tau = check_positive(temperature, "temperature")
    step = int(check_positive(chunk_size, "chunk_size", integer=True))
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    probs = torch.nn.functional.normalize(probs, dim=1)
    n = probs.shape[0]
    total = 0.0
    for start in range(0, n, step):
        block = probs[start : start + step] @ probs.T / tau
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -1.0 / tau
        q = torch.softmax(block, dim=1)
        total += float(-(q * torch.log(q + 1e-5)).sum())
    return total / n
