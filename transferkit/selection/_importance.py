"""Importance-weighted validation: density ratios, IWCV and DEV."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .._validation import check_bool, check_positive
from ..metrics import as_numpy_domains, as_numpy_features, make_domain_classifier
from ._inputs import ArrayLike, check_folds


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
    pooled, domain, n_s = as_numpy_domains(source_features, target_features, min_samples=2)
    n_t = pooled.shape[0] - n_s
    if clip is not None:
        check_positive(clip, "clip")
    check_positive(C, "C")
    check_folds(folds)
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

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
