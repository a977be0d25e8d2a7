"""``TCA``: transfer component analysis on a kernel matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import check_option, check_positive
from ._align import fixed_signs
from ._gram import (
    KERNELS,
    MULTIPLIERS,
    KernelName,
    check_kernel_params,
    gram_matrix,
    named_kernel,
    resolve_gamma,
)
from ._inputs import DomainsInY, split_domains, to_host


class TCA(DomainsInY, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    r"""Transfer Component Analysis (Pan et al., 2011): a kernel map that shrinks the MMD.

    On the stacked source and target rows (target rows: ``y == unlabelled``) with kernel
    matrix $K$, centring matrix $H$ and MMD matrix $L$
    ($1/n_s^2$, $1/n_t^2$, $-1/(n_s n_t)$), the transfer components
    $W$ are the top ``n_components`` generalised eigenvectors of

    $$
    K H K\, w = \lambda\, (K L K + \mu I)\, w,
    $$

    i.e. they maximise the embedded variance while keeping the domains' means close. Any
    row (either domain, or new data) maps to $k(x, X_{fit}) W$, so ``transform``
    and ``fit_transform`` agree. ``fit`` raises ``ValueError`` without ``y`` or without
    rows of both domains (a one-domain fit would silently be kernel PCA). The cost is
    ``O(n^3)`` in the number of fitted rows (a few thousand at most).

    Args:
        n_components: number of transfer components.
        kernel: ``"rbf"``, ``"linear"``, ``"poly"``, ``"laplacian"`` or ``"multi_rbf"``
            (as [`TorchKernelSVC`][transferkit.sklearn.TorchKernelSVC]).
        mu: trade-off $\mu > 0$; smaller values weigh the MMD term more.
        gamma: kernel ``gamma`` (``"scale"``, ``"auto"`` or a number).
        degree: power of the ``"poly"`` kernel.
        coef0: constant of the ``"poly"`` kernel.
        multipliers: the ``"multi_rbf"`` factors on $1 / \gamma$, by default those of
            [`TorchKernelSVC`][transferkit.sklearn.TorchKernelSVC] and
            [`transferkit.kernels.GaussianKernel`][]. (TCA used to fix them at
            ``(0.5, 1, 2)``; pass ``multipliers=(0.5, 1.0, 2.0)`` for that kernel.)
        unlabelled: the label that marks target rows.

    Attributes:
        components_: $W$, ``(n_fit, n_components)``.
        fit_data_: the rows the kernel is evaluated against, ``(n_fit, D)``.
        gamma_: the numeric ``gamma`` used.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = np.vstack([rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 2])
        >>> y = np.r_[rng.integers(0, 2, 60), -np.ones(60, dtype=int)]
        >>> tca = TCA(n_components=3, mu=0.1).fit(X, y)
        >>> tca.transform(X).shape
        (120, 3)
    """

    def __init__(
        self,
        n_components: int = 30,
        *,
        kernel: KernelName = "rbf",
        mu: float = 1.0,
        gamma: Literal["scale", "auto"] | float = "scale",
        degree: int = 3,
        coef0: float = 1.0,
        multipliers: Sequence[float] = MULTIPLIERS,
        unlabelled: Any = -1,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.mu = mu
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.multipliers = multipliers
        self.unlabelled = unlabelled

    def _kernel_matrix(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        degree, coef0, multipliers = check_kernel_params(self.degree, self.coef0, self.multipliers)
        kernel = named_kernel(self.kernel, self.gamma_, degree, coef0, multipliers)
        return gram_matrix(
            kernel, x, y, device=torch.device("cpu"), dtype=torch.float64, chunk_size=4096
        )

    def fit(self, X: Any, y: Any = None) -> TCA:
        """Solve the TCA eigenproblem on the stacked source and target rows.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, to_host(X), dtype=np.float64, ensure_min_samples=2)
        k = int(check_positive(self.n_components, "n_components", integer=True))
        mu = check_positive(self.mu, "mu")
        if k > X.shape[0]:
            raise ValueError(f"n_components: expected at most n_samples = {X.shape[0]}, got {k}")
        check_option(self.kernel, "kernel", KERNELS)
        source, target = split_domains(y, X.shape[0], self.unlabelled, "TCA")
        self.gamma_ = resolve_gamma(self.gamma, self.kernel, X)
        gram = self._kernel_matrix(X, None)
        n = X.shape[0]
        # L = e e^T with e = 1/n_s on source rows and -1/n_t on target rows.
        e = source / source.sum() - target / target.sum()
        centred = gram - gram.mean(0)
        spread = centred.T @ centred  # K H K (H is idempotent)
        # K L K + mu I = mu I + v v^T (v = K e): its inverse square root is
        # (I - c u u^T) / sqrt(mu) with u = v / |v|, which turns the generalised problem
        # into a standard symmetric one: W = B^{-1/2} Z, and W^T B W = I as with eigh(A, B).
        v = gram @ e
        norm = float(np.linalg.norm(v))
        u = v / norm if norm > 0 else v
        c = 1.0 - math.sqrt(mu / (mu + norm**2))
        root = (np.eye(n) - c * np.outer(u, u)) / math.sqrt(mu)
        standard = root @ spread @ root
        values, vectors = scipy.linalg.eigh(
            (standard + standard.T) / 2, subset_by_index=[n - k, n - 1]
        )
        vectors = (root @ vectors)[:, ::-1]
        self.components_ = fixed_signs(vectors)
        self.eigenvalues_ = values[::-1]
        self.fit_data_ = X.copy()
        self._n_features_out = k
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Embed rows of either domain: $k(x, X_{fit}) W$, ``(N, n_components)``."""
        check_is_fitted(self)
        X = validate_data(self, to_host(X), dtype=np.float64, reset=False)
        embedded: np.ndarray = self._kernel_matrix(X, self.fit_data_) @ self.components_
        return embedded
