"""H-score, by default regularised by Ledoit-Wolf shrinkage."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from .._validation import check_option
from ._inputs import ArrayLike, _dense_labels, _features_and_labels


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
