"""Linear feature-space alignment: ``CORAL`` and ``SubspaceAlignment``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    OneToOneFeatureMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import check_positive
from ._inputs import DomainsInY, split_domains, to_host


def fixed_signs(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` with each column's largest-magnitude entry made positive (a unique basis)."""
    k = vectors.shape[1]
    signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(k)])
    result: np.ndarray = vectors * np.where(signs == 0, 1.0, signs)
    return result


def _matrix_power(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    values = np.maximum(values, np.finfo(np.float64).eps * max(values.max(), 1.0))
    result: np.ndarray = (vectors * values**power) @ vectors.T
    return result


def _regularised_covariance(x: np.ndarray, reg: float) -> np.ndarray:
    centred = x - x.mean(0)
    covariance = centred.T @ centred / max(x.shape[0] - 1, 1)
    scale = float(np.trace(covariance)) / covariance.shape[0]
    ridge = reg * (scale if scale > 0 else 1.0)
    regularised: np.ndarray = covariance + ridge * np.eye(covariance.shape[0])
    return regularised


class CORAL(DomainsInY, OneToOneFeatureMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    r"""CORrelation ALignment (Sun et al., 2016): recolour source features to the target.

    ``fit(X, y)`` takes source and target rows stacked; target rows carry the label
    ``unlabelled`` (-1 by default). It whitens the source covariance and re-colours with
    the target's, and matches the means:

    $$
    x_s \mapsto (x_s - \mu_s)\, C_s^{-1/2} C_t^{1/2} + \mu_t,
    \qquad C = \mathrm{Cov} + \lambda \bar\sigma^2 I
    $$

    where $\bar\sigma^2$ is the mean variance, so ``reg=1`` is the paper's ``+ I``
    for standardised features. ``fit_transform(X, y)`` maps the source rows and returns
    target rows unchanged; ``transform`` (prediction time: target-domain input) is the
    identity. A classifier trained after it thus sees source features with target
    statistics. ``fit`` raises ``ValueError`` without ``y`` or with fewer than two rows
    of either domain (a one-domain fit would silently be the identity).

    Args:
        reg: covariance regularisation $\lambda \ge 0$, relative to the mean variance.
        unlabelled: the label that marks target rows.

    Attributes:
        source_mean_, target_mean_: the domain means, ``(D,)``.
        matrix_: $C_s^{-1/2} C_t^{1/2}$, ``(D, D)``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> source = rng.normal(size=(200, 3))
        >>> target = 3 * rng.normal(size=(200, 3)) + 5
        >>> X = np.vstack([source, target])
        >>> y = np.r_[rng.integers(0, 2, 200), -np.ones(200, dtype=int)]
        >>> aligned = CORAL(reg=0.0).fit_transform(X, y)
        >>> bool(np.allclose(np.cov(aligned[:200].T), np.cov(target.T)))
        True
    """

    def __init__(self, reg: float = 1.0, *, unlabelled: Any = -1) -> None:
        self.reg = reg
        self.unlabelled = unlabelled

    def fit(self, X: Any, y: Any = None) -> CORAL:
        """Learn the source-to-target recolouring.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, to_host(X), dtype=np.float64, ensure_min_samples=2)
        reg = check_positive(self.reg, "reg", strict=False)
        source, target = split_domains(y, X.shape[0], self.unlabelled, "CORAL", minimum=2)
        self.source_mean_ = X[source].mean(0)
        self.target_mean_ = X[target].mean(0)
        self.matrix_ = _matrix_power(_regularised_covariance(X[source], reg), -0.5) @ (
            _matrix_power(_regularised_covariance(X[target], reg), 0.5)
        )
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """Fit, then map the source rows; target rows are returned unchanged."""
        self.fit(X, y)
        X = validate_data(self, to_host(X), dtype=np.float64, reset=False)
        source, _ = split_domains(y, X.shape[0], self.unlabelled, "CORAL")
        out: np.ndarray = X.copy()
        out[source] = (X[source] - self.source_mean_) @ self.matrix_ + self.target_mean_
        return out

    def transform(self, X: Any) -> np.ndarray:
        """Target-domain rows: returned unchanged (a validated float64 copy)."""
        check_is_fitted(self)
        out: np.ndarray = validate_data(self, to_host(X), dtype=np.float64, reset=False, copy=True)
        return out


class SubspaceAlignment(
    DomainsInY,
    ClassNamePrefixFeaturesOutMixin,  # type: ignore[misc]
    TransformerMixin,  # type: ignore[misc]
    BaseEstimator,  # type: ignore[misc]
):
    r"""Subspace alignment (Fernando et al., 2013): align the source PCA basis to the target's.

    With $P_s, P_t$ the top ``n_components`` principal directions of each domain
    (``(D, k)``) and $M = P_s^\top P_t$, source rows map to
    $(x - \mu_s) P_s M$ and target rows to $(x - \mu_t) P_t$. Target rows are
    marked by ``y == unlabelled`` as for [`CORAL`][transferkit.sklearn.CORAL];
    ``transform`` applies the target map. ``fit`` raises ``ValueError`` without ``y`` or
    without rows of both domains.

    Args:
        n_components: dimension ``k`` of the subspaces.
        unlabelled: the label that marks target rows.

    Attributes:
        source_mean_, target_mean_: domain means.
        source_components_, target_components_: the bases $P_s, P_t$, ``(D, k)``.
        alignment_: $M$, ``(k, k)``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(100, 5))
        >>> y = np.r_[np.zeros(50, dtype=int), -np.ones(50, dtype=int)]
        >>> SubspaceAlignment(n_components=2).fit_transform(X, y).shape
        (100, 2)
    """

    def __init__(self, n_components: int = 20, *, unlabelled: Any = -1) -> None:
        self.n_components = n_components
        self.unlabelled = unlabelled

    @staticmethod
    def _basis(x: np.ndarray, k: int) -> np.ndarray:
        _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        return fixed_signs(vt[:k].T)

    def fit(self, X: Any, y: Any = None) -> SubspaceAlignment:
        """Compute both PCA bases and the alignment matrix.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, to_host(X), dtype=np.float64, ensure_min_samples=2)
        k = int(check_positive(self.n_components, "n_components", integer=True))
        source, target = split_domains(y, X.shape[0], self.unlabelled, "SubspaceAlignment")
        n_min = int(min(source.sum(), target.sum()))
        if k > min(n_min, X.shape[1]):
            raise ValueError(
                f"n_components: expected at most min(n_samples, n_features) of each domain "
                f"(n_samples = {n_min}, n_features = {X.shape[1]}), got {k}"
            )
        self.source_mean_ = X[source].mean(0)
        self.target_mean_ = X[target].mean(0)
        self.source_components_ = self._basis(X[source], k)
        self.target_components_ = self._basis(X[target], k)
        self.alignment_ = self.source_components_.T @ self.target_components_
        self._n_features_out = k
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """Fit, then map source rows with the aligned basis and target rows with theirs."""
        self.fit(X, y)
        X = validate_data(self, to_host(X), dtype=np.float64, reset=False)
        source, _ = split_domains(y, X.shape[0], self.unlabelled, "SubspaceAlignment")
        out = self._target_map(X)
        projection = self.source_components_ @ self.alignment_
        out[source] = (X[source] - self.source_mean_) @ projection
        return out

    def _target_map(self, X: np.ndarray) -> np.ndarray:
        mapped: np.ndarray = (X - self.target_mean_) @ self.target_components_
        return mapped

    def transform(self, X: Any) -> np.ndarray:
        """Target-domain rows: projected on the target basis, ``(N, n_components)``."""
        check_is_fitted(self)
        rows: np.ndarray = validate_data(self, to_host(X), dtype=np.float64, reset=False)
        return self._target_map(rows)
