"""LogME: the log maximum evidence of a Bayesian linear model on the features."""

from __future__ import annotations

import math

import numpy as np

from ._inputs import ArrayLike, _features_and_labels, _one_hot


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
    distinct values in ``labels``. Features are used as given (no centring). All-zero
    features (a dead layer) get the evidence of the noise model alone, the lowest any
    features can score (the fixed point would divide by zero there).

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
    if not float(sigma.max(initial=0.0)) > 0.0:
        return _logme_without_signal(targets)
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


def _logme_without_signal(targets: np.ndarray) -> float:
    r"""LogME of features that are all zero (e.g. a dead layer): only the noise model is left.

    With $F = 0$ the prior precision $\alpha$ cancels out of the evidence
    ($\frac D2 \log\alpha - \frac12\log|\alpha I|$) and the fixed point, which
    divides by $\alpha$, would give NaN. What remains, $\frac N2\log\beta -
    \frac\beta2\|y_c\|^2 - \frac N2\log 2\pi$, is maximised at
    $\beta = N / (\|y_c\|^2 + 10^{-5})$ (the same ``1e-5`` as the fixed point). It is
    the $\alpha \to \infty$ (no weights) evidence of any features, so no candidate
    scores below it.
    """
    n = targets.shape[0]
    res2 = (targets**2).sum(0)
    beta = n / (res2 + 1e-5)
    evidence = (n / 2.0 * np.log(beta) - beta / 2.0 * res2 - n / 2.0 * math.log(2.0 * math.pi)) / n
    return float(evidence.mean())
