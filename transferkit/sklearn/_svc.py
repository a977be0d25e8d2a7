"""``TorchKernelSVC``: Gram matrices in torch, libsvm's solver."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import sklearn
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC, LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .._validation import check_bool, check_option, check_positive
from ..device import resolve_device
from ._gram import (
    DTYPES,
    MULTIPLIERS,
    KernelFunction,
    KernelName,
    check_custom_kernel,
    check_kernel_params,
    gram_matrix,
    named_kernel,
    resolve_gamma,
)
from ._inputs import drop_unlabelled, labelled_rows, row_chunks, to_host

logger = logging.getLogger("transferkit.sklearn")


class TorchKernelSVC(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    r"""Kernel SVM whose Gram matrices are computed in torch and solved by libsvm.

    ``fit`` computes the training Gram matrix with the kernels of
    [`transferkit.kernels`][] by [`transferkit.kernels.gram`][] in row strips of
    ``chunk_size`` (on the GPU when ``device`` resolves to one), with the rows grouped
    by class: one matrix product per strip for the upper triangle only, mirrored
    below the diagonal (half the arithmetic, an exactly symmetric matrix), with columns
    that cannot change a kernel value (constant for the distance kernels, all-zero for
    the inner-product ones) left out. libsvm then solves the dual problem through
    ``sklearn.svm.SVC(kernel="precomputed")``, where each kernel entry it needs is a
    lookup instead of a ``D``-term dot product. Only the support vectors are kept:
    ``predict``, ``decision_function`` and ``predict_proba`` compute the cross-kernel
    between new rows and the support vectors, chunk by chunk, and hand it to libsvm. The
    model is therefore the one ``sklearn.svm.SVC`` would learn: with the default
    ``dtype="float64"`` the tests check identical predictions and support vectors on
    digits, MNIST pixels and breast-cancer data.

    Kernels, with scikit-learn's parameterisation (``D`` = number of features):

    * ``"rbf"``: $\exp(-\gamma \|x - y\|^2)$; ``"multi_rbf"``:
      $\sum_m \exp(-\gamma \|x - y\|^2 / m)$ over ``multipliers`` (DAN's
      sum of Gaussians, [`transferkit.kernels.GaussianKernel`][] with
      $\sigma^2 = 1 / (2\gamma)$);
    * ``"linear"``: $x \cdot y$; ``"poly"``: $(\gamma\, x \cdot y + c_0)^p$;
    * ``"laplacian"``: $\exp(-\gamma \|x - y\|_2)$ (Euclidean distance, as
      [`transferkit.kernels.LaplacianKernel`][]; scikit-learn's ``laplacian_kernel``
      uses the L1 distance);
    * any kernel object ``k(x, y) -> (N, M)`` with fixed parameters, e.g.
      ``tk.kernels.GaussianKernel(bandwidth=2.0)``.

    ``gamma="scale"`` is ``1 / (D * X.var())`` as in scikit-learn (``1 / sqrt(D *
    X.var())`` for the Laplacian kernel), ``"auto"`` is ``1 / D``.

    **Precision.** ``dtype="float64"`` (the default) computes the Gram matrix in double
    precision, like libsvm's own kernels, so the predictions are those of
    ``sklearn.svm.SVC`` with the same parameters (entries agree to ~1e-15). On a GPU,
    ``dtype="float32"`` is several times faster; its ~1e-7 relative errors are far below
    libsvm's stopping tolerance ``tol`` and can only change samples that lie on the
    decision boundary.

    **Large n.** The exact path stores the ``(n, n)`` float64 Gram matrix (800 MB at
    n = 10,000). ``solver="auto"`` switches to ``"nystroem"`` above ``max_exact_samples``:
    ``n_components`` random training rows (landmarks) give the features
    $K_{nm} K_{mm}^{-1/2}$, classified by ``sklearn.svm.LinearSVC`` (one-vs-rest,
    squared hinge): an approximation of the kernel SVM in ``O(n m)`` memory. The
    ``support_*`` attributes exist on the exact path only.

    Args:
        kernel: a kernel name (see above) or a kernel object.
        C: regularisation (inverse strength), > 0.
        gamma: ``"scale"``, ``"auto"`` or a positive number.
        degree: power of the ``"poly"`` kernel.
        coef0: constant of the ``"poly"`` kernel.
        multipliers: the ``"multi_rbf"`` factors on $1 / \gamma$.
        device: where Gram matrices are computed (``"auto"``: CUDA when available).
        dtype: ``"float64"`` or ``"float32"`` for the Gram computation.
        chunk_size: rows per Gram block; memory is ``chunk_size * n`` per block.
        solver: ``"auto"``, ``"exact"`` (libsvm on the full Gram matrix) or
            ``"nystroem"``.
        max_exact_samples: largest training set ``solver="auto"`` solves exactly.
        n_components: landmarks of the Nystroem path.
        probability: fit Platt scaling so that ``predict_proba`` is available.
        class_weight: ``None``, ``"balanced"`` or a ``{class: weight}`` dict.
        tol: libsvm stopping tolerance.
        cache_size: libsvm kernel cache in MB.
        max_iter: libsvm iteration limit (-1: none).
        decision_function_shape: ``"ovr"`` or ``"ovo"`` (as ``SVC``).
        break_ties: as ``SVC``: break ties by ``decision_function`` (``"ovr"`` only).
        random_state: seed of Platt scaling and of the Nystroem landmarks.
        unlabelled: rows whose label equals this value (e.g. ``-1`` for unlabelled target
            rows in a domain-alignment pipeline) are skipped by ``fit`` and ``score``.

    Attributes:
        classes_: the class labels.
        gamma_: the numeric ``gamma`` used.
        solver_: ``"exact"`` or ``"nystroem"``.
        support_: indices of the support vectors in the (labelled) training rows.
        support_vectors_: the support vectors, ``(n_SV, D)``.
        n_support_: support vectors per class.
        dual_coef_: ``(n_classes - 1, n_SV)`` dual coefficients (as ``SVC``).
        intercept_: the intercepts (as ``SVC``).
        landmarks_: the Nystroem landmarks (``"nystroem"`` path only).

    Shape:
        - X: ``(N, D)``; y: ``(N,)``.
        - decision_function: ``(N,)`` for two classes, else ``(N, n_classes)`` (``"ovr"``).

    Examples:
        >>> from sklearn.datasets import load_digits
        >>> from sklearn.svm import SVC
        >>> X, y = load_digits(return_X_y=True)
        >>> ours = TorchKernelSVC(kernel="rbf", C=1.0, device="cpu").fit(X[:1000], y[:1000])
        >>> theirs = SVC(kernel="rbf", C=1.0).fit(X[:1000], y[:1000])
        >>> bool((ours.predict(X[1000:]) == theirs.predict(X[1000:])).all())
        True
        >>> ours.support_vectors_.shape == theirs.support_vectors_.shape
        True
    """

    def __init__(
        self,
        kernel: KernelName | KernelFunction = "rbf",
        C: float = 1.0,
        *,
        gamma: Literal["scale", "auto"] | float = "scale",
        degree: int = 3,
        coef0: float = 0.0,
        multipliers: Sequence[float] = MULTIPLIERS,
        device: str | torch.device | None = "auto",
        dtype: Literal["float64", "float32"] = "float64",
        chunk_size: int = 2048,
        solver: Literal["auto", "exact", "nystroem"] = "auto",
        max_exact_samples: int = 20_000,
        n_components: int = 1000,
        probability: bool = False,
        class_weight: Mapping[Any, float] | Literal["balanced"] | None = None,
        tol: float = 1e-3,
        cache_size: float = 200.0,
        max_iter: int = -1,
        decision_function_shape: Literal["ovr", "ovo"] = "ovr",
        break_ties: bool = False,
        random_state: int | np.random.RandomState | None = None,
        unlabelled: Any = None,
    ) -> None:
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.multipliers = multipliers
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.solver = solver
        self.max_exact_samples = max_exact_samples
        self.n_components = n_components
        self.probability = probability
        self.class_weight = class_weight
        self.tol = tol
        self.cache_size = cache_size
        self.max_iter = max_iter
        self.decision_function_shape = decision_function_shape
        self.break_ties = break_ties
        self.random_state = random_state
        self.unlabelled = unlabelled

    def _gram(
        self, x: np.ndarray, y: np.ndarray | None, rows: np.ndarray | None = None
    ) -> np.ndarray:
        degree, coef0, multipliers = check_kernel_params(self.degree, self.coef0, self.multipliers)
        device = resolve_device(self.device)
        dtype = DTYPES[check_option(self.dtype, "dtype", tuple(DTYPES))]
        chunk_size = int(check_positive(self.chunk_size, "chunk_size", integer=True))
        kernel = (
            check_custom_kernel(self.kernel)
            if callable(self.kernel)
            else named_kernel(self.kernel, self.gamma_, degree, coef0, multipliers)
        )
        return gram_matrix(
            kernel, x, y, device=device, dtype=dtype, chunk_size=chunk_size, rows=rows
        )

    def fit(self, X: Any, y: Any, sample_weight: np.ndarray | None = None) -> TorchKernelSVC:
        """Compute the training Gram matrix in torch and solve the SVM with libsvm.

        Args:
            X: training features, ``(N, D)``.
            y: class labels, ``(N,)``; rows equal to ``unlabelled`` are skipped.
            sample_weight: optional per-row weights (as ``SVC``).

        Returns:
            The fitted estimator.

        Raises:
            ValueError: for invalid input, a single class or unknown option names.
        """
        X, y = validate_data(self, to_host(X), to_host(y), dtype=np.float64, order="C")
        X, y, sample_weight = drop_unlabelled(X, y, sample_weight, self.unlabelled)
        check_classification_targets(y)
        check_positive(self.C, "C")
        check_bool(self.probability, "probability")
        check_bool(self.break_ties, "break_ties")
        solver = check_option(self.solver, "solver", ("auto", "exact", "nystroem"))
        self.gamma_ = resolve_gamma(self.gamma, self.kernel, X)
        if solver == "auto":
            limit = check_positive(self.max_exact_samples, "max_exact_samples", integer=True)
            solver = "exact" if X.shape[0] <= limit else "nystroem"
        self.solver_ = solver
        for name in ("support_", "support_vectors_", "dual_coef_", "landmarks_"):
            self.__dict__.pop(name, None)
        if solver == "exact":
            self._fit_exact(X, y, sample_weight)
        else:
            self._fit_nystroem(X, y, sample_weight)
        return self

    def _fit_exact(self, X: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> None:
        # Rows grouped by class (a stable sort): libsvm groups the classes itself, keeping
        # each class's rows in order, so it solves the very same problems, but each
        # one-vs-one subproblem now reads two contiguous ranges of a Gram row instead of
        # entries scattered over all of it (libsvm's fit measured ~20% faster on MNIST).
        order = np.argsort(np.unique(y, return_inverse=True)[1].ravel(), kind="stable")
        if weight is not None:
            weight = _check_sample_weight(weight, X, dtype=np.float64)[order]  # as SVC's
        y = y[order]
        gram = self._gram(X, None, rows=order)  # the Gram matrix of X[order]
        extra: dict[str, Any] = {"probability": True} if self.probability else {}
        svc = SVC(
            kernel="precomputed",
            C=self.C,
            class_weight=self.class_weight,
            tol=self.tol,
            cache_size=self.cache_size,
            max_iter=self.max_iter,
            decision_function_shape=self.decision_function_shape,
            break_ties=self.break_ties,
            random_state=self.random_state,
            **extra,
        )
        # A named kernel's Gram matrix is finite (bounded kernels; transferkit.kernels.gram
        # raises where linear/poly values overflow): skip scikit-learn's pass over n^2 values.
        finite = isinstance(self.kernel, str)
        with warnings.catch_warnings(), sklearn.config_context(assume_finite=finite):
            # scikit-learn 1.9 deprecates SVC(probability=True) (libsvm's Platt scaling,
            # removal planned for 1.11); it is what ``probability=True`` means here.
            warnings.filterwarnings("ignore", "The `probability` parameter", FutureWarning)
            svc.fit(gram, y, sample_weight=weight)
        del gram
        self.classes_ = svc.classes_
        self.support_ = order[svc.support_].astype(svc.support_.dtype)
        self.support_vectors_ = X[self.support_]
        self.n_support_ = svc.n_support_
        self.dual_coef_ = svc.dual_coef_
        self.intercept_ = svc.intercept_
        self.n_iter_ = svc.n_iter_
        # libsvm reads a precomputed test row at the columns ``support_``. Re-index the
        # support vectors 0..n_SV-1 so that rows of the (N, n_SV) cross-kernel suffice.
        compact = copy.copy(svc)
        n_sv = len(svc.support_)
        compact.support_ = np.arange(n_sv, dtype=svc.support_.dtype)
        compact.shape_fit_ = (n_sv, n_sv)
        compact.n_features_in_ = n_sv
        self._model: Any = compact
        logger.debug("TorchKernelSVC: %d support vectors of %d rows", n_sv, X.shape[0])

    def _fit_nystroem(self, X: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> None:
        count = int(check_positive(self.n_components, "n_components", integer=True))
        rng = check_random_state(self.random_state)
        index = np.sort(rng.choice(X.shape[0], size=min(count, X.shape[0]), replace=False))
        self.landmarks_ = X[index]
        u, s, vt = np.linalg.svd(self._gram(self.landmarks_, None))
        self._normalization = (u / np.sqrt(np.maximum(s, 1e-12))) @ vt
        linear: Any = LinearSVC(
            C=self.C, class_weight=self.class_weight, tol=self.tol, random_state=self.random_state
        )
        if self.probability:
            linear = CalibratedClassifierCV(linear, method="sigmoid", cv=5)
        self._model = linear.fit(self._nystroem_features(X), y, sample_weight=weight)
        self.classes_ = self._model.classes_
        fitted = [c.estimator for c in getattr(self._model, "calibrated_classifiers_", [])]
        self.n_iter_ = max(int(np.max(m.n_iter_)) for m in fitted or [self._model])

    def _nystroem_features(self, X: np.ndarray) -> np.ndarray:
        features: np.ndarray = self._gram(X, self.landmarks_) @ self._normalization.T
        return features

    def _apply(self, X: Any, method: str) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, to_host(X), dtype=np.float64, order="C", reset=False)
        size = int(check_positive(self.chunk_size, "chunk_size", integer=True))
        if self.solver_ == "exact":
            # libsvm needs writable buffers; a memory-mapped unpickled model has none.
            for name, value in vars(self._model).items():
                if isinstance(value, np.ndarray) and not value.flags.writeable:
                    setattr(self._model, name, value.copy())
        outputs = []
        for rows in row_chunks(X.shape[0], size):
            if self.solver_ == "exact":
                features = self._gram(X[rows], self.support_vectors_)
            else:
                features = self._nystroem_features(X[rows])
            outputs.append(np.asarray(getattr(self._model, method)(features)))
        return np.concatenate(outputs)

    def predict(self, X: Any) -> np.ndarray:
        """Class labels of ``X`` (libsvm's one-vs-one vote, as ``SVC``).

        Args:
            X: features, ``(N, D)``.

        Returns:
            ``(N,)`` labels drawn from ``classes_``.
        """
        return self._apply(X, "predict")

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed distances to the separating hyperplanes (as ``SVC.decision_function``).

        Args:
            X: features, ``(N, D)``.

        Returns:
            ``(N,)`` for two classes; ``(N, n_classes)`` (``"ovr"``) or
            ``(N, n_classes * (n_classes - 1) / 2)`` (``"ovo"``) otherwise.
        """
        return self._apply(X, "decision_function")

    def _check_proba(self) -> bool:
        if not self.probability:
            raise AttributeError("predict_proba is not available when probability=False")
        return True

    @available_if(_check_proba)  # type: ignore[untyped-decorator]
    def predict_proba(self, X: Any) -> np.ndarray:
        """Platt-scaled class probabilities (needs ``probability=True``).

        Args:
            X: features, ``(N, D)``.

        Returns:
            ``(N, n_classes)`` probabilities; rows sum to one.
        """
        return self._apply(X, "predict_proba")

    @available_if(_check_proba)  # type: ignore[untyped-decorator]
    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of [`predict_proba`][]."""
        log_proba: np.ndarray = np.log(self.predict_proba(X))
        return log_proba

    def score(self, X: Any, y: Any, sample_weight: np.ndarray | None = None) -> float:
        """Accuracy on the labelled rows of ``(X, y)`` (rows equal to ``unlabelled`` skipped).

        Args:
            X: features, ``(N, D)``.
            y: true labels, ``(N,)``.
            sample_weight: optional per-row weights.

        Returns:
            The mean accuracy.
        """
        if self.unlabelled is not None:
            X, y, sample_weight = labelled_rows(X, y, sample_weight, self.unlabelled)
        accuracy: float = super().score(X, y, sample_weight=sample_weight)
        return accuracy
