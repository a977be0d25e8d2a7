"""scikit-learn estimators over deep features: kernel SVM, domain alignment, prototypes.

Every class here is a real scikit-learn estimator: it stores its constructor arguments
unchanged, learns in ``fit`` into ``name_`` attributes, and works with ``clone``,
``Pipeline`` and ``GridSearchCV``.

* [`DeepFeatures`][] -- a transformer that runs a torch model (samples in, deep
  features out) through [`transferkit.extract_features`][].
* [`TorchKernelSVC`][] -- a kernel SVM whose Gram matrices are computed by
  [`transferkit.kernels`][] in torch (chunked, on the GPU when present) and solved by
  libsvm through ``sklearn.svm.SVC(kernel="precomputed")``; a Nystroem + linear SVM path
  for large training sets.
* [`CORAL`][], [`TCA`][], [`SubspaceAlignment`][] -- feature-space domain
  alignment fitted on labelled source rows plus unlabelled target rows.
* [`PrototypeClassifier`][] -- nearest class mean, for few-shot targets.
* [`make_deep_svm_pipeline`][] -- model -> features -> (alignment) -> kernel SVM.

**How target data reaches ``fit``.** Domain-alignment transformers follow scikit-learn's
semi-supervised convention: ``fit(X, y)`` receives source and target rows stacked, and
the unlabelled target rows carry the label ``-1`` (the ``unlabelled`` parameter). The
classifiers take the same ``unlabelled`` parameter and skip those rows when fitting and
scoring, so one ``Pipeline.fit(X, y)`` call fits the whole chain. At prediction time
every row is taken to come from the target domain.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    ClassNamePrefixFeaturesOutMixin,
    OneToOneFeatureMixin,
    TransformerMixin,
)
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._validation import check_bool, check_not_meta, check_option, check_positive
from ..device import resolve_device
from ..features import PoolName, extract_features
from ..kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
    rescale_factor,
)

__all__ = [
    "CORAL",
    "TCA",
    "DeepFeatures",
    "PrototypeClassifier",
    "SubspaceAlignment",
    "TorchKernelSVC",
    "make_deep_svm_pipeline",
]

logger = logging.getLogger(__name__)

KernelName = Literal["rbf", "linear", "poly", "laplacian", "multi_rbf"]
KernelFunction = Callable[[Tensor, Tensor], Tensor]
KERNELS: tuple[KernelName, ...] = ("rbf", "linear", "poly", "laplacian", "multi_rbf")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --------------------------------------------------------------------------- kernels


def _host(data: Any) -> Any:
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


def _resolve_gamma(gamma: object, kernel: object, x: np.ndarray) -> float:
    """scikit-learn's ``gamma``: ``"scale"`` is ``1 / (D * X.var())``, ``"auto"`` ``1 / D``.

    For the Laplacian kernel, a function of the distance rather than the squared distance,
    ``"scale"`` is ``1 / sqrt(D * X.var())`` so that ``gamma * ||x - y||`` is of order one.
    """
    if isinstance(gamma, str):
        choice = check_option(gamma, "gamma", ("scale", "auto"))
        if choice == "auto":
            return 1.0 / float(x.shape[1])
        variance = float(x.var())
        value = 1.0 / (x.shape[1] * variance) if variance != 0 else 1.0
        return math.sqrt(value) if kernel == "laplacian" else value
    return float(check_positive(gamma, "gamma"))


class _GemmKernel:
    """The named kernels in GEMM form, element-wise steps in place, no per-block checks.

    Same formulas as [`transferkit.kernels`][] (``||x||^2 + ||y||^2 - 2 x y^T``, clamped
    at zero, for the distance kernels), but a Gram matrix is computed block by block, so
    the norms and the validation of [`transferkit.kernels.Kernel`][] calls would be
    paid once per block: this path costs one matrix multiplication and two passes over
    each block.
    """

    def __init__(
        self,
        name: KernelName,
        gamma: float,
        degree: int,
        coef0: float,
        multipliers: Sequence[float],
    ) -> None:
        self.name = name
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.multipliers = tuple(multipliers)
        # Distances do not change when both sides are shifted: _gram centres the data.
        self.translation_invariant = name in ("rbf", "laplacian", "multi_rbf")

    def __call__(
        self, x: Tensor, y: Tensor, *, diagonal: int | None = None, out: Tensor | None = None
    ) -> Tensor:
        """``k(x, y)``, written into ``out`` when given.

        ``diagonal=o`` says that row ``i`` of ``x`` is row ``i + o`` of ``y``: those
        self-distances are set to exactly zero instead of rounding noise.
        """
        if self.name == "rbf":
            # -gamma ||x - y||^2 = 2 gamma x.y - gamma ||x||^2 - gamma ||y||^2: the scaling
            # rides on the GEMM, leaving four in-place passes over the block.
            block = torch.mm(x * (2.0 * self.gamma), y.T, out=out)
            block.sub_((x * x).sum(1, keepdim=True) * self.gamma)
            block.sub_((y * y).sum(1) * self.gamma).clamp_(max=0.0)
            if diagonal is not None:
                block.diagonal(diagonal).zero_()
            return block.exp_()
        block = torch.mm(x, y.T, out=out)
        if self.name == "linear":
            return block
        if self.name == "poly":
            return block.mul_(self.gamma).add_(self.coef0).pow_(self.degree)
        block.mul_(-2.0).add_((x * x).sum(1, keepdim=True)).add_((y * y).sum(1)).clamp_(min=0.0)
        if diagonal is not None:
            block.diagonal(diagonal).zero_()  # the Laplacian's sqrt would amplify noise
        if self.name == "laplacian":
            return block.sqrt_().mul_(-self.gamma).exp_()
        total = torch.zeros_like(block)
        for m in self.multipliers:
            total.add_(torch.exp(block * (-self.gamma / m)))
        if out is not None:
            return out.copy_(total)
        return total


def _make_kernel(
    kernel: object, gamma: float, degree: int, coef0: float, multipliers: Sequence[float]
) -> KernelFunction:
    """The kernel callable behind a kernel name (scikit-learn's parameterisation).

    Named kernels are the [`transferkit.kernels`][] formulas: ``"rbf"`` and
    ``"multi_rbf"`` are [`GaussianKernel`][transferkit.kernels.GaussianKernel] with
    ``sigma^2 = 1 / (2 gamma)``, ``"laplacian"`` is
    [`LaplacianKernel`][transferkit.kernels.LaplacianKernel] with ``sigma = 1 / gamma``, ``"poly"``
    is [`PolynomialKernel`][transferkit.kernels.PolynomialKernel] (tests check the equalities).
    """
    if callable(kernel):
        if getattr(kernel, "bandwidth", 1.0) is None:
            raise ValueError(
                f"kernel: {kernel!r} picks its bandwidth from each batch, so the chunks of "
                "a Gram matrix would use different kernels; give it an explicit bandwidth"
            )
        return kernel
    name = check_option(kernel, "kernel", KERNELS)
    return _GemmKernel(name, gamma, degree, coef0, multipliers)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _to_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Squared norms of float32 rows overflow from |x| ~ 1e18 (and lose all precision below
    # ~1e-16): such Gram matrices came back NaN or silently wrong. float64 has the range.
    largest = float(np.abs(x).max()) if x.size else 0.0
    if dtype != torch.float64 and rescale_factor(largest, max(x.shape[1], 1), dtype) != 1.0:
        raise ValueError(
            f"X: values up to {largest:.1e} are outside what {dtype} Gram matrices resolve; "
            "use dtype='float64' (the default) or standardise the features"
        )
    # torch cannot wrap read-only arrays (e.g. memory-mapped after unpickling): copy those.
    array = x if x.flags.writeable else x.copy()
    return torch.as_tensor(array, device=device).to(dtype)


def _gram(
    kernel: KernelFunction,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> np.ndarray:
    """``kernel(x, y)`` (``y=None``: ``x``) as a float64 array, in row blocks of ``chunk_size``.

    On the CPU in float64, the named kernels write each block straight into the result
    (no copy). TCA's Gram matrices and kernel objects take this path; the SVC's named
    kernels take ``_kernel_gram`` (half the product,
    mirrored).
    """
    xt = _to_tensor(x, device, dtype)
    yt = xt if y is None else _to_tensor(y, device, dtype)
    if getattr(kernel, "translation_invariant", False):
        # Centring leaves distances unchanged and avoids cancellation in the GEMM form.
        centre = yt.mean(0)
        xt = xt - centre
        yt = xt if y is None else yt - centre
    out = np.empty((x.shape[0], yt.shape[0]), dtype=np.float64)
    direct = isinstance(kernel, _GemmKernel) and device.type == "cpu" and dtype == torch.float64
    target = torch.from_numpy(out) if direct else None
    with torch.inference_mode():
        for rows in _chunks(x.shape[0], chunk_size):
            if isinstance(kernel, _GemmKernel):
                block = kernel(
                    xt[rows],
                    yt,
                    diagonal=rows.start if y is None else None,
                    out=None if target is None else target[rows],
                )
            else:
                block = kernel(xt[rows], yt)
            if block.shape != (rows.stop - rows.start, yt.shape[0]):
                raise ValueError(
                    f"kernel: expected a ({rows.stop - rows.start}, {yt.shape[0]}) matrix, "
                    f"got shape {tuple(block.shape)}"
                )
            if target is None:
                out[rows] = block.to("cpu", torch.float64).numpy()
    return out


def _svc_kernel(
    name: KernelName, gamma: float, degree: int, coef0: float, multipliers: Sequence[float]
) -> Kernel:
    """The [`transferkit.kernels`][] object for a named kernel in scikit-learn's ``gamma``.

    ``exp(-gamma d)`` is a Gaussian with ``sigma^2 = 1 / (2 gamma)`` (``"multi_rbf"``: the
    same ``sigma`` with the multipliers on ``sigma^2``, i.e. ``exp(-gamma d / m)``),
    ``exp(-gamma ||x - y||)`` a Laplacian with ``sigma = 1 / gamma``, ``"poly"`` is
    ``(gamma x.y + coef0)^degree``. Kernel values agree with scikit-learn's to rounding
    (the bandwidth round trip costs an ulp or two of ``gamma``).
    """
    if name in ("rbf", "multi_rbf"):
        factors = (1.0,) if name == "rbf" else tuple(multipliers)
        return GaussianKernel(bandwidth=math.sqrt(0.5 / gamma), multipliers=factors)
    if name == "laplacian":
        return LaplacianKernel(bandwidth=1.0 / gamma)
    if name == "poly":
        return PolynomialKernel(degree=degree, gamma=gamma, coef0=coef0)
    return LinearKernel()


def _informative_columns(x: np.ndarray, y: np.ndarray | None, distance: bool) -> np.ndarray | None:
    """Columns that can change a kernel value, or ``None`` when every column can.

    A column that is constant over all rows adds exactly zero to every distance, and an
    all-zero column adds zero to every inner product: dropping them (dead ReLU units, the
    always-blank border pixels of MNIST) shrinks the matrix product and leaves the kernel
    unchanged.
    """
    rows = x if y is None else np.concatenate([x, y])
    keep = rows.min(0) != rows.max(0) if distance else (rows != 0).any(0)
    if keep.all():
        return None
    if not keep.any():
        keep[0] = True  # keep one column: the matrix product needs a width
    index: np.ndarray = np.flatnonzero(keep)
    return index


def _kernel_gram(
    kernel: Kernel,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> np.ndarray:
    """``kernel(x, y)`` (``y=None``: ``x``) as a float64 array, from the kernel's own formula.

    The base matrix (squared distances in GEMM form after centring, or inner products) is
    computed in row strips of ``chunk_size``; the kernel values come from
    ``kernel.from_base`` of [`transferkit.kernels`][], applied to cache-sized tiles (fresh
    allocations of whole strips cost more than the arithmetic on the CPU). For ``y=None``
    only the upper triangle is computed (the strip ``[a:b, a:]``) and mirrored: half the
    matrix product, an exactly symmetric matrix, self-distances exactly zero. On the CPU in
    float64 the strips are written straight into the result (no copies).
    """
    distance = kernel.family == "distance"
    columns = _informative_columns(x, y, distance)
    if columns is not None:
        x = x[:, columns]
        y = None if y is None else y[:, columns]
    xt = _to_tensor(x, device, dtype)
    yt = xt if y is None else _to_tensor(y, device, dtype)
    if distance:
        # Centring leaves distances unchanged and avoids cancellation in the GEMM form.
        centre = yt.mean(0)
        xt = xt - centre
        yt = xt if y is None else yt - centre
    n, m = xt.shape[0], yt.shape[0]
    # torch's allocator, not NumPy's: NumPy advises huge pages for large arrays, which made
    # the first touch of an (n, n) Gram matrix 4-5x slower on the sandboxed build machine
    # (5 s vs 1 s for 800 MB); libsvm reads the memory through the NumPy view either way.
    host = torch.empty((n, m), dtype=torch.float64)
    out: np.ndarray = host.numpy()
    direct = device.type == "cpu" and dtype == torch.float64
    with torch.inference_mode():
        state = kernel.prepare(xt[:1], yt[:1])  # fixed parameters: no data dependence
        x_norm = (xt * xt).sum(1)  # used by the distance kernels only
        y_norm = x_norm if y is None else (yt * yt).sum(1)
        tile = max(1, (1 << 18) // max(m, 1)) if device.type == "cpu" else chunk_size
        # Symmetric case: strips of at most 256 rows, so that the diagonal blocks (computed
        # whole, then overwritten by the mirror) add little to the matrix product.
        height = chunk_size if y is not None else min(chunk_size, 256)
        for rows in _chunks(n, height):
            start = rows.start if y is None else 0  # the upper triangle only
            # -2 is a power of two: scaling x first is exact and saves a pass.
            left = xt[rows] * -2.0 if distance else xt[rows]
            right = yt[start:].T
            if direct:
                strip = torch.mm(left, right, out=host[rows, start:])
            else:
                strip = torch.mm(left, right)
            if distance:
                strip.add_(x_norm[rows, None]).add_(y_norm[start:]).clamp_(min=0.0)
                if y is None:
                    strip.diagonal().zero_()
            for part in _chunks(strip.shape[0], tile):
                strip[part] = kernel.from_base(strip[part], state)
            if not direct:
                host[rows, start:] = strip.to("cpu", torch.float64)
            if y is None:
                _mirror_rows(host, rows)
    return out


def _mirror_rows(gram: Tensor, rows: slice, band: int = 256) -> None:
    """Copy the upper triangle of ``gram[rows]`` below the diagonal, in bands of rows.

    Band by band, the rows right of the band's diagonal tile become the columns below it
    (this also overwrites the matrix product's own lower triangle inside the diagonal
    block, so the result is exactly symmetric); only the small diagonal tiles need a mask.
    """
    for part in _chunks(rows.stop - rows.start, band):
        a, b = rows.start + part.start, rows.start + part.stop
        gram[b:, a:b] = gram[a:b, b:].T
        tile = gram[a:b, a:b]
        lower = torch.ones(b - a, b - a, dtype=torch.bool).tril_(-1)
        tile[lower] = tile.T[lower]


def _check_kernel_params(
    degree: object, coef0: object, multipliers: object
) -> tuple[int, float, tuple[float, ...]]:
    deg = int(check_positive(degree, "degree", integer=True))
    if isinstance(coef0, bool) or not isinstance(coef0, (int, float)) or not math.isfinite(coef0):
        raise ValueError(f"coef0: expected a finite number, got {coef0!r}")
    if not isinstance(multipliers, Sequence) or len(multipliers) == 0:
        raise ValueError(f"multipliers: expected a non-empty sequence, got {multipliers!r}")
    mults = tuple(check_positive(m, "multipliers") for m in multipliers)
    return deg, float(coef0), mults


def _drop_unlabelled(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray | None, unlabelled: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if unlabelled is None:
        return x, y, weight
    keep = np.asarray(y != unlabelled, dtype=bool)
    if not keep.any():
        raise ValueError(
            f"y: every row is marked unlabelled (y == {unlabelled!r}); a classifier needs "
            "labelled rows"
        )
    return x[keep], y[keep], None if weight is None else np.asarray(weight)[keep]


# --------------------------------------------------------------------------- kernel SVM


class TorchKernelSVC(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    r"""Kernel SVM whose Gram matrices are computed in torch and solved by libsvm.

    ``fit`` computes the training Gram matrix with the kernels of
    [`transferkit.kernels`][] in row strips of ``chunk_size`` (on the GPU when ``device``
    resolves to one): one matrix product per strip for the upper triangle only, mirrored
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
        multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
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

    def _gram(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        degree, coef0, multipliers = _check_kernel_params(self.degree, self.coef0, self.multipliers)
        device = resolve_device(self.device)
        dtype = _DTYPES[check_option(self.dtype, "dtype", tuple(_DTYPES))]
        chunk_size = int(check_positive(self.chunk_size, "chunk_size", integer=True))
        if callable(self.kernel):
            custom = _make_kernel(self.kernel, self.gamma_, degree, coef0, multipliers)
            return _gram(custom, x, y, device=device, dtype=dtype, chunk_size=chunk_size)
        # Named kernels: the formulas of transferkit.kernels on a symmetric, blocked Gram.
        name = check_option(self.kernel, "kernel", KERNELS)
        kernel = _svc_kernel(name, self.gamma_, degree, coef0, multipliers)
        return _kernel_gram(kernel, x, y, device=device, dtype=dtype, chunk_size=chunk_size)

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
        X, y = validate_data(self, _host(X), _host(y), dtype=np.float64, order="C")
        X, y, sample_weight = _drop_unlabelled(X, y, sample_weight, self.unlabelled)
        check_classification_targets(y)
        check_positive(self.C, "C")
        check_bool(self.probability, "probability")
        check_bool(self.break_ties, "break_ties")
        solver = check_option(self.solver, "solver", ("auto", "exact", "nystroem"))
        self.gamma_ = _resolve_gamma(self.gamma, self.kernel, X)
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
        X_grouped, y = X[order], y[order]
        gram = self._gram(X_grouped, None)
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
        with warnings.catch_warnings():
            # scikit-learn 1.9 deprecates SVC(probability=True) (libsvm's Platt scaling,
            # removal planned for 1.11); it is what ``probability=True`` means here.
            warnings.filterwarnings("ignore", "The `probability` parameter", FutureWarning)
            svc.fit(gram, y, sample_weight=weight)
        del gram
        self.classes_ = svc.classes_
        self.support_ = order[svc.support_].astype(svc.support_.dtype)
        self.support_vectors_ = X_grouped[svc.support_]
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
        X = validate_data(self, _host(X), dtype=np.float64, order="C", reset=False)
        size = int(check_positive(self.chunk_size, "chunk_size", integer=True))
        if self.solver_ == "exact":
            # libsvm needs writable buffers; a memory-mapped unpickled model has none.
            for name, value in vars(self._model).items():
                if isinstance(value, np.ndarray) and not value.flags.writeable:
                    setattr(self._model, name, value.copy())
        outputs = []
        for rows in _chunks(X.shape[0], size):
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
            X, y, sample_weight = _drop_unlabelled(
                np.asarray(X), np.asarray(y), sample_weight, self.unlabelled
            )
        accuracy: float = super().score(X, y, sample_weight=sample_weight)
        return accuracy


# --------------------------------------------------------------------------- prototypes


class PrototypeClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    r"""Nearest class mean: each class is the mean of its rows, a sample takes the closest.

    With ``metric="cosine"`` rows are L2-normalised before averaging and the scores are
    cosine similarities to the normalised class means; with ``"euclidean"`` the scores
    are negative squared distances $-\|x - \mu_c\|^2$. On deep features this is a
    strong few-shot classifier (one labelled sample per class suffices).
    ``predict_proba`` is the softmax of the scores divided by ``temperature``.

    Args:
        metric: ``"cosine"`` or ``"euclidean"``.
        temperature: softmax temperature of ``predict_proba`` (> 0); small values give
            sharper probabilities (cosine scores lie in ``[-1, 1]``).
        unlabelled: rows whose label equals this value are skipped by ``fit`` and
            ``score`` (see [`CORAL`][]).

    Attributes:
        classes_: the class labels.
        prototypes_: ``(n_classes, D)`` class means (normalised for ``"cosine"``).

    Examples:
        >>> X = np.array([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.2, 0.8]])
        >>> model = PrototypeClassifier(metric="cosine").fit(X, [0, 0, 1, 1])
        >>> model.predict(np.array([[2.0, 0.5], [0.1, 3.0]])).tolist()
        [0, 1]
    """

    def __init__(
        self,
        metric: Literal["cosine", "euclidean"] = "cosine",
        *,
        temperature: float = 1.0,
        unlabelled: Any = None,
    ) -> None:
        self.metric = metric
        self.temperature = temperature
        self.unlabelled = unlabelled

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            prepared: np.ndarray = X / np.maximum(norms, 1e-12)
            return prepared
        return X

    def fit(self, X: Any, y: Any) -> PrototypeClassifier:
        """Compute one prototype per class.

        Args:
            X: features, ``(N, D)``.
            y: labels, ``(N,)``.

        Returns:
            The fitted classifier.

        Raises:
            ValueError: for invalid input, an unknown metric or a single class.
        """
        X, y = validate_data(self, _host(X), _host(y), dtype=np.float64)
        X, y, _ = _drop_unlabelled(X, y, None, self.unlabelled)
        check_classification_targets(y)
        check_option(self.metric, "metric", ("cosine", "euclidean"))
        check_positive(self.temperature, "temperature")
        classes, index = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError("y: PrototypeClassifier needs at least 2 classes; got 1 class")
        onehot = np.eye(len(classes))[index]
        prepared = self._prepare(X)
        prototypes = (onehot.T @ prepared) / onehot.sum(0)[:, None]
        self.classes_ = classes
        self.prototypes_ = self._prepare(prototypes)
        return self

    def _scores(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = self._prepare(validate_data(self, _host(X), dtype=np.float64, reset=False))
        similarity: np.ndarray = X @ self.prototypes_.T
        if self.metric == "cosine":
            return similarity
        squared = (X**2).sum(1, keepdims=True) - 2 * similarity + (self.prototypes_**2).sum(1)
        distances: np.ndarray = np.maximum(squared, 0.0)
        return -distances

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores: cosine similarities or negative squared distances to the prototypes.

        Args:
            X: features, ``(N, D)``.

        Returns:
            ``(N, n_classes)``; for two classes ``(N,)``, the second score minus the first.
        """
        scores = self._scores(X)
        if len(self.classes_) == 2:
            difference: np.ndarray = scores[:, 1] - scores[:, 0]
            return difference
        return scores

    def predict(self, X: Any) -> np.ndarray:
        """The class of the closest prototype, ``(N,)``."""
        scores = self._scores(X)
        labels: np.ndarray = self.classes_[np.argmax(scores, axis=1)]
        return labels

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the scores divided by ``temperature``, ``(N, n_classes)``."""
        logits = self._scores(X) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        probabilities: np.ndarray = weights / weights.sum(axis=1, keepdims=True)
        return probabilities

    def score(self, X: Any, y: Any, sample_weight: np.ndarray | None = None) -> float:
        """Accuracy on the labelled rows (rows equal to ``unlabelled`` skipped)."""
        if self.unlabelled is not None:
            X, y, sample_weight = _drop_unlabelled(
                np.asarray(X), np.asarray(y), sample_weight, self.unlabelled
            )
        accuracy: float = super().score(X, y, sample_weight=sample_weight)
        return accuracy


# --------------------------------------------------------------------------- alignment


def _domains(
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
    labels = np.asarray(_host(y))
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"y: expected {n} labels to match X, got shape {labels.shape}")
    target = np.asarray(labels == unlabelled, dtype=bool).reshape(n)
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


class CORAL(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
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

    def __sklearn_tags__(self) -> Any:
        # Fitting needs y to tell source rows from target rows.
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X: Any, y: Any = None) -> CORAL:
        """Learn the source-to-target recolouring.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, _host(X), dtype=np.float64, ensure_min_samples=2)
        reg = check_positive(self.reg, "reg", strict=False)
        source, target = _domains(y, X.shape[0], self.unlabelled, "CORAL", minimum=2)
        self.source_mean_ = X[source].mean(0)
        self.target_mean_ = X[target].mean(0)
        self.matrix_ = _matrix_power(_regularised_covariance(X[source], reg), -0.5) @ (
            _matrix_power(_regularised_covariance(X[target], reg), 0.5)
        )
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        """Fit, then map the source rows; target rows are returned unchanged."""
        self.fit(X, y)
        X = validate_data(self, _host(X), dtype=np.float64, reset=False)
        source, _ = _domains(y, X.shape[0], self.unlabelled, "CORAL")
        out: np.ndarray = X.copy()
        out[source] = (X[source] - self.source_mean_) @ self.matrix_ + self.target_mean_
        return out

    def transform(self, X: Any) -> np.ndarray:
        """Target-domain rows: returned unchanged (a validated float64 copy)."""
        check_is_fitted(self)
        out: np.ndarray = validate_data(self, _host(X), dtype=np.float64, reset=False, copy=True)
        return out


class SubspaceAlignment(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
    r"""Subspace alignment (Fernando et al., 2013): align the source PCA basis to the target's.

    With $P_s, P_t$ the top ``n_components`` principal directions of each domain
    (``(D, k)``) and $M = P_s^\top P_t$, source rows map to
    $(x - \mu_s) P_s M$ and target rows to $(x - \mu_t) P_t$. Target rows are
    marked by ``y == unlabelled`` as for [`CORAL`][]; ``transform`` applies the target
    map. ``fit`` raises ``ValueError`` without ``y`` or without rows of both domains.

    Args:
        n_components: dimension ``k`` of the subspaces.
        unlabelled: the label that marks target rows.

    Attributes:
        source_mean_, target_mean_: domain means.
        source_components_, target_components_: the bases $P_s, P_t$, ``(D, k)``.
        alignment_: $M$, ``(k, k)``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(100, 5))
        >>> y = np.r_[np.zeros(50, dtype=int), -np.ones(50, dtype=int)]
        >>> SubspaceAlignment(n_components=2).fit_transform(X, y).shape
        (100, 2)
    """

    def __init__(self, n_components: int = 20, *, unlabelled: Any = -1) -> None:
        self.n_components = n_components
        self.unlabelled = unlabelled

    def __sklearn_tags__(self) -> Any:
        # Fitting needs y to tell source rows from target rows.
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    @staticmethod
    def _basis(x: np.ndarray, k: int) -> np.ndarray:
        _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        basis = vt[:k].T
        signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(k)])
        result: np.ndarray = basis * np.where(signs == 0, 1.0, signs)
        return result

    def fit(self, X: Any, y: Any = None) -> SubspaceAlignment:
        """Compute both PCA bases and the alignment matrix.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, _host(X), dtype=np.float64, ensure_min_samples=2)
        k = int(check_positive(self.n_components, "n_components", integer=True))
        source, target = _domains(y, X.shape[0], self.unlabelled, "SubspaceAlignment")
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
        X = validate_data(self, _host(X), dtype=np.float64, reset=False)
        source, _ = _domains(y, X.shape[0], self.unlabelled, "SubspaceAlignment")
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
        rows: np.ndarray = validate_data(self, _host(X), dtype=np.float64, reset=False)
        return self._target_map(rows)


class TCA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):  # type: ignore[misc]
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
            (as [`TorchKernelSVC`][]).
        mu: trade-off $\mu > 0$; smaller values weigh the MMD term more.
        gamma: kernel ``gamma`` (``"scale"``, ``"auto"`` or a number).
        degree: power of the ``"poly"`` kernel.
        coef0: constant of the ``"poly"`` kernel.
        unlabelled: the label that marks target rows.

    Attributes:
        components_: $W$, ``(n_fit, n_components)``.
        fit_data_: the rows the kernel is evaluated against, ``(n_fit, D)``.
        gamma_: the numeric ``gamma`` used.

    Examples:
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
        unlabelled: Any = -1,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.mu = mu
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.unlabelled = unlabelled

    def __sklearn_tags__(self) -> Any:
        # Fitting needs y to tell source rows from target rows.
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _kernel_matrix(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        degree, coef0, _ = _check_kernel_params(self.degree, self.coef0, (1.0,))
        function = _make_kernel(self.kernel, self.gamma_, degree, coef0, (0.5, 1.0, 2.0))
        return _gram(
            function, x, y, device=torch.device("cpu"), dtype=torch.float64, chunk_size=4096
        )

    def fit(self, X: Any, y: Any = None) -> TCA:
        """Solve the TCA eigenproblem on the stacked source and target rows.

        Args:
            X: source and target rows, ``(N, D)``.
            y: source labels, ``unlabelled`` for target rows.

        Returns:
            The fitted transformer.
        """
        X = validate_data(self, _host(X), dtype=np.float64, ensure_min_samples=2)
        k = int(check_positive(self.n_components, "n_components", integer=True))
        mu = check_positive(self.mu, "mu")
        if k > X.shape[0]:
            raise ValueError(f"n_components: expected at most n_samples = {X.shape[0]}, got {k}")
        check_option(self.kernel, "kernel", KERNELS)
        source, target = _domains(y, X.shape[0], self.unlabelled, "TCA")
        self.gamma_ = _resolve_gamma(self.gamma, self.kernel, X)
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
        signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(k)])
        self.components_ = vectors * np.where(signs == 0, 1.0, signs)
        self.eigenvalues_ = values[::-1]
        self.fit_data_ = X.copy()
        self._n_features_out = k
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Embed rows of either domain: $k(x, X_{fit}) W$, ``(N, n_components)``."""
        check_is_fitted(self)
        X = validate_data(self, _host(X), dtype=np.float64, reset=False)
        embedded: np.ndarray = self._kernel_matrix(X, self.fit_data_) @ self.components_
        return embedded


# --------------------------------------------------------------------------- deep features


class _TransformedRows(Dataset[Tensor]):
    """Rows of a tensor passed one by one through a per-sample ``transform``."""

    def __init__(self, rows: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(self.rows[index])


def _is_text(X: Any) -> bool:
    """Raw text: a non-empty list, tuple, 1-D array or pandas Series whose first item is a str."""
    if isinstance(X, (str, bytes, Mapping, Tensor)):
        return False
    if isinstance(X, np.ndarray):
        return X.ndim == 1 and X.size > 0 and X.dtype.kind in "UO" and isinstance(X[0], str)
    values = getattr(X, "values", None)  # a pandas Series
    if isinstance(values, np.ndarray) and hasattr(X, "iloc"):
        return _is_text(values)
    if isinstance(X, Sequence) and len(X) > 0:
        return isinstance(X[0], str)
    return False


def _texts(X: Any) -> list[str]:
    values = getattr(X, "values", X) if hasattr(X, "iloc") else X
    texts = values.tolist() if isinstance(values, np.ndarray) else list(values)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"X: expected only strings, got {type(text).__name__} at row {row}")
    return texts


class _Tokenized(Dataset[dict[str, list[int]]]):
    """Tokenizer output (unpadded lists) served one sample at a time, in ``order``."""

    def __init__(self, encoding: Mapping[str, Sequence[Any]], order: np.ndarray) -> None:
        self.columns = {key: list(value) for key, value in encoding.items()}
        self.order = order

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = int(self.order[index])
        return {key: value[row] for key, value in self.columns.items()}


class _PadBatch:
    """Collate a list of tokenised samples by the tokenizer's own ``pad`` (to the longest)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        padded = self.tokenizer.pad(samples, padding=True, return_tensors="pt")
        return {key: value for key, value in padded.items() if isinstance(value, Tensor)}


def _token_inputs(X: Mapping[str, Any]) -> dict[str, Tensor]:
    """A tokenizer's output (dict or ``BatchEncoding`` of arrays/tensors) as tensors."""
    if len(X) == 0:
        raise ValueError("X: expected a non-empty dict of token arrays, e.g. input_ids")
    out: dict[str, Tensor] = {}
    for key, value in X.items():
        if isinstance(value, Tensor):
            tensor = value.detach().cpu()
        else:
            try:
                tensor = torch.as_tensor(np.asarray(value))
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"X[{key!r}]: expected an array or tensor (pad the tokenizer's output, "
                    f"e.g. padding=True), got {type(value).__name__}"
                ) from error
        if tensor.dim() < 1:
            raise ValueError(f"X[{key!r}]: expected an (N, ...) array, got a scalar")
        out[str(key)] = tensor
    lengths = {key: int(t.shape[0]) for key, t in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"X: every entry needs the same number of rows, got {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError("X: expected at least 1 sample, got 0")
    mask = out.get("attention_mask")
    ids = out.get("input_ids")
    if mask is not None and ids is not None and mask.shape != ids.shape:
        raise ValueError(
            f"X['attention_mask']: expected the shape of input_ids {tuple(ids.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return out


def _fingerprint(X: Any) -> str:
    """A short hash of the inputs, naming their cache folder."""
    digest = hashlib.sha256()
    if isinstance(X, Mapping):
        for key in sorted(X):
            digest.update(str(key).encode() + b"\x00")
            digest.update(_fingerprint(X[key]).encode())
    elif isinstance(X, (Tensor, np.ndarray)) and not (
        isinstance(X, np.ndarray) and X.dtype.kind == "O"
    ):
        array = X.detach().cpu().numpy() if isinstance(X, Tensor) else X
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    else:  # text
        for text in X:
            digest.update(str(text).encode("utf-8", errors="replace") + b"\x00")
    return digest.hexdigest()[:24]


class DeepFeatures(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Transformer: samples in, deep features of a torch model out.

    ``transform`` calls [`transferkit.extract_features`][] (inference mode, batched,
    on ``device``). Several ``layers`` are flattened and concatenated in the given order,
    so the output is always a 2-D array. ``fit`` learns nothing (it records
    ``n_features_in_`` for array inputs); the model is used as it is. ``clone`` (and so
    ``GridSearchCV``) deep-copies the model (and the tokenizer).

    Three kinds of ``X``:

    * an ``(N, ...)`` array or tensor: the model's input;
    * **raw text** (a list, tuple, 1-D array or pandas Series of strings) with
      ``tokenizer`` set, e.g. a Hugging Face ``AutoTokenizer``: the texts are tokenised
      (``truncation=True``, ``max_length``), batched by length and padded per batch
      (``tokenizer.pad``), and the model (e.g. ``AutoModel``) is called with
      ``input_ids``, ``attention_mask``, ... as keyword arguments. This is the form to use
      in a ``Pipeline`` with cross-validation or ``GridSearchCV``, which index ``X``
      by rows;
    * a **tokenizer's output**: a dict or ``BatchEncoding`` of equally long
      ``(N, T)`` arrays or tensors (pad it, e.g. ``padding=True``), passed as keyword
      arguments.

    With token inputs the model's ``(N, T, D)`` output (for a Hugging Face model, the
    first tensor of its output: ``last_hidden_state``) is reduced by ``pool``; the default
    ``"avg"`` is the mean over the tokens that ``attention_mask`` marks as real
    (padding ignored: the sentence-transformers recipe), ``"token"`` takes the first
    token (``[CLS]``).

    Args:
        model: a ``torch.nn.Module`` (or a [`transferkit.FeatureExtractor`][]).
        layers: module name(s) whose outputs are the features; ``None`` for the model's
            output.
        pool: how [`transferkit.extract_features`][] reduces ``(N, C, H, W)`` / ``(N, T,
            D)`` layer outputs (``"avg"``, ...; ``None`` keeps them, flattened here).
        batch_size: samples per forward pass.
        device: where the model runs (``"auto"``: CUDA when available).
        input_transform: optional per-sample callable applied to each input row (a torch
            tensor) before the model, like a torchvision ``transform``. (Named so because
            ``transform`` is the transformer's method.) Array inputs only.
        input_shape: reshape each flat input row to this shape, e.g. ``(1, 16, 16)``, so
            that image models work on 2-D scikit-learn arrays. Array inputs only.
        amp: run the model under autocast.
        progress: show a progress bar.
        tokenizer: turns raw-text ``X`` into model inputs: a Hugging Face tokenizer or
            any callable ``tokenizer(texts, truncation=True, max_length=...)`` returning
            a dict of per-text token lists, with a ``pad`` method like Hugging Face's.
        max_length: tokens kept per text (``None``: the tokenizer's limit).
        cache: a folder for the features. Each distinct ``X`` (hashed) gets its own
            sub-folder, handed to [`transferkit.extract_features`][] as its ``cache``:
            features are reused while the model's weights, the data and the settings
            match, and recomputed (with a warning) when they do not. So fitting and
            predicting on the same rows, or re-running a grid search, runs the model
            once per distinct input.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> DeepFeatures(net, progress=False).fit_transform(np.ones((5, 4))).shape
        (5, 8)
        >>> class Embed(torch.nn.Module):  # stands in for a Hugging Face encoder
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = torch.nn.Embedding(10, 3)
        ...     def forward(self, input_ids, attention_mask):
        ...         return self.embed(input_ids)  # (N, T, 3)
        >>> tokens = {"input_ids": np.array([[1, 2, 0], [3, 0, 0]]),
        ...           "attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
        >>> DeepFeatures(Embed()).fit_transform(tokens).shape  # masked mean over tokens
        (2, 3)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: str | Sequence[str] | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = "auto",
        input_transform: Callable[[Tensor], Tensor] | None = None,
        *,
        pool: PoolName | None = "avg",
        input_shape: Sequence[int] | None = None,
        amp: bool = False,
        progress: bool = False,
        tokenizer: Any = None,
        max_length: int | None = None,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.batch_size = batch_size
        self.device = device
        self.input_transform = input_transform
        self.pool = pool
        self.input_shape = input_shape
        self.amp = amp
        self.progress = progress
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache = cache

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.allow_nan = False
        tags.input_tags.string = self.tokenizer is not None
        return tags

    @staticmethod
    def _as_tensor(X: Any) -> Tensor:
        tensor = X.detach().cpu() if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
        if tensor.dim() < 2 or tensor.shape[0] == 0:
            raise ValueError(
                f"X: expected an (N, ...) array with N >= 1, got shape {tuple(tensor.shape)}"
            )
        return tensor.float() if not tensor.is_floating_point() else tensor

    def _kind(self, X: Any) -> Literal["array", "text", "tokens"]:
        if isinstance(X, Mapping):
            return "tokens"
        if _is_text(X):
            if self.tokenizer is None:
                raise TypeError(
                    "X: got text; pass tokenizer= (e.g. transformers.AutoTokenizer."
                    "from_pretrained(...)) to turn it into model inputs"
                )
            return "text"
        if isinstance(X, str):
            raise TypeError("X: expected a list of texts, got a single string")
        return "array"

    def _check_params(self, kind: str) -> None:
        check_positive(self.batch_size, "batch_size", integer=True)
        if self.max_length is not None:
            check_positive(self.max_length, "max_length", integer=True)
        if not isinstance(self.amp, bool):
            raise TypeError(f"amp: expected a bool, got {type(self.amp).__name__}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress: expected a bool, got {type(self.progress).__name__}")
        if self.tokenizer is not None and not callable(self.tokenizer):
            raise TypeError(
                f"tokenizer: expected a callable tokenizer, got {type(self.tokenizer).__name__}"
            )
        if kind == "text" and not callable(getattr(self.tokenizer, "pad", None)):
            raise TypeError(
                "tokenizer: needs a pad() method (as Hugging Face tokenizers have) to batch "
                "texts of different lengths"
            )
        if kind != "array" and (self.input_shape is not None or self.input_transform is not None):
            raise ValueError(
                "input_shape/input_transform: apply to array inputs only, not to "
                f"{'text' if kind == 'text' else 'token dict'} inputs"
            )
        if self.cache is not None and not isinstance(self.cache, (str, os.PathLike)):
            raise TypeError(
                f"cache: expected a folder path or None, got {type(self.cache).__name__}"
            )

    def fit(self, X: Any, y: Any = None) -> DeepFeatures:
        """Check the inputs and record ``n_features_in_`` (array inputs); no training.

        Args:
            X: inputs: an ``(N, ...)`` array, raw texts (with ``tokenizer``) or a dict of
                token arrays.
            y: ignored.

        Returns:
            self.
        """
        kind = self._kind(X)
        self._check_params(kind)
        if kind == "array":
            self.n_features_in_ = int(np.prod(self._as_tensor(X).shape[1:]))
        elif kind == "tokens":
            _token_inputs(X)
        else:
            _texts(X)
        return self

    def _cache_dir(self, X: Any) -> str | None:
        if self.cache is None:
            return None
        return os.path.join(os.fspath(self.cache), f"inputs-{_fingerprint(X)}")

    def transform(self, X: Any) -> np.ndarray:
        """Deep features of ``X``, ``(N, F)``.

        Args:
            X: inputs: an ``(N, ...)`` array or tensor, raw texts (with ``tokenizer``) or a
                tokenizer's output (dict of ``(N, T)`` arrays).

        Returns:
            The features of every requested layer, flattened and concatenated.
        """
        kind = self._kind(X)
        self._check_params(kind)
        data: Any
        order: np.ndarray | None = None
        if kind == "text":
            texts = _texts(X)
            encoding = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            ids = encoding["input_ids"]
            # batches of similar length, each padded to its own longest text only
            order = np.argsort([len(row) for row in ids], kind="stable")
            data = DataLoader(
                _Tokenized(encoding, order),
                batch_size=int(self.batch_size),
                shuffle=False,
                collate_fn=_PadBatch(self.tokenizer),
            )
            n = len(texts)
        elif kind == "tokens":
            data = _token_inputs(X)
            n = int(next(iter(data.values())).shape[0])
        else:
            rows = self._as_tensor(X)
            n = int(rows.shape[0])
            if self.input_shape is not None:
                shape = tuple(int(s) for s in self.input_shape)
                if int(np.prod(rows.shape[1:])) != int(np.prod(shape)):
                    raise ValueError(
                        f"input_shape: {shape} holds {int(np.prod(shape))} values but the "
                        f"input rows have {int(np.prod(rows.shape[1:]))}"
                    )
                rows = rows.reshape(rows.shape[0], *shape)
            data = (
                rows
                if self.input_transform is None
                else _TransformedRows(rows, self.input_transform)
            )
        features = extract_features(
            self.model,
            data,
            layers=self.layers,
            batch_size=self.batch_size,
            device=self.device,
            amp=self.amp,
            cache=self._cache_dir(X),
            progress=self.progress,
            pool=self.pool,
        )
        if isinstance(features, tuple):
            features = features[0]
        if isinstance(features, dict):
            names = [self.layers] if isinstance(self.layers, str) else list(self.layers or [])
            keys = names if set(names) == set(features) else list(features)
            parts = [np.asarray(features[name]).reshape(n, -1) for name in keys]
            out = np.concatenate(parts, axis=1)
        else:
            out = np.asarray(features).reshape(n, -1)
        if order is not None:  # back from length order to the input order
            unsorted = np.empty_like(out)
            unsorted[order] = out
            out = unsorted
        return out


# --------------------------------------------------------------------------- pipeline

_ALIGNERS: dict[str, Callable[[], BaseEstimator]] = {
    "coral": CORAL,
    "tca": TCA,
    "subspace": SubspaceAlignment,
}


def make_deep_svm_pipeline(
    model: torch.nn.Module,
    *,
    layers: str | Sequence[str] | None = None,
    align: Literal["coral", "tca", "subspace"] | BaseEstimator | None = None,
    scale: bool = True,
    feature_params: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    **svc_params: Any,
) -> Pipeline:
    """Model -> deep features -> (standardise) -> (domain alignment) -> kernel SVM.

    The steps are named ``"features"`` ([`DeepFeatures`][]), ``"scale"``
    (``StandardScaler``), ``"align"`` and ``"svc"`` ([`TorchKernelSVC`][]), so grid
    searches address ``svc__C``, ``align__mu``, ... With ``align``, fit the pipeline on
    source and target rows stacked, target rows labelled ``-1`` (the SVM then gets
    ``unlabelled=-1`` and learns from the labelled rows only).

    Args:
        model: the torch feature extractor.
        layers: layer name(s) to take features from (``None``: the model's output).
        align: ``"coral"``, ``"tca"``, ``"subspace"``, a transformer, or ``None``.
        scale: standardise the features (fitted on all rows, both domains).
        feature_params: more [`DeepFeatures`][] arguments (``batch_size``,
            ``device``, ``input_shape``, ``input_transform``, ``pool``, ...).
        tokenizer: [`DeepFeatures`][]' ``tokenizer``: with it the pipeline takes raw
            texts (a Hugging Face encoder + SVM in one pipeline).
        max_length: [`DeepFeatures`][]' ``max_length`` (tokens kept per text).
        cache: [`DeepFeatures`][]' ``cache`` folder (features computed once per input).
        **svc_params: [`TorchKernelSVC`][] arguments (``C``, ``kernel``, ...).

    Returns:
        An unfitted ``sklearn.pipeline.Pipeline``.

    Raises:
        ValueError: for an unknown ``align`` name, or a [`DeepFeatures`][] argument
            given both by keyword and in ``feature_params``.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> pipe = make_deep_svm_pipeline(net, align="coral", C=10.0)
        >>> [name for name, _ in pipe.steps]
        ['features', 'scale', 'align', 'svc']

        With a Hugging Face encoder: ``make_deep_svm_pipeline(AutoModel.from_pretrained(
        path), tokenizer=AutoTokenizer.from_pretrained(path), cache="features/")`` takes
        a list of texts in ``fit``/``predict`` (see ``docs/guides/sklearn.md``).
    """
    check_bool(scale, "scale")
    extra = dict(feature_params or {})
    named = {"tokenizer": tokenizer, "max_length": max_length, "cache": cache}
    for key, value in named.items():
        if value is not None:
            if key in extra:
                raise ValueError(f"{key}: given both as a keyword and in feature_params")
            extra[key] = value
    steps: list[tuple[str, Any]] = [("features", DeepFeatures(model, layers=layers, **extra))]
    if scale:
        steps.append(("scale", StandardScaler()))
    if align is not None:
        aligner = (
            _ALIGNERS[check_option(align, "align", tuple(_ALIGNERS))]()
            if isinstance(align, str)
            else align
        )
        steps.append(("align", aligner))
        svc_params.setdefault("unlabelled", -1)
    steps.append(("svc", TorchKernelSVC(**svc_params)))
    return Pipeline(steps)
