"""Gram matrices for the estimators: kernel names in scikit-learn's terms, one engine.

[`TorchKernelSVC`][transferkit.sklearn.TorchKernelSVC] and [`TCA`][transferkit.sklearn.TCA]
turn a kernel name into the [`transferkit.kernels`][] object with the matching bandwidth
(`named_kernel`, one definition per name) and compute every Gram matrix, named kernel or
user callable, with [`transferkit.kernels.gram`][] (`gram_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .._validation import check_option, check_positive
from ..kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
    gram,
    rescale_factor,
)

KernelName = Literal["rbf", "linear", "poly", "laplacian", "multi_rbf"]
KernelFunction = Callable[[Tensor, Tensor], Tensor]
KERNELS: tuple[KernelName, ...] = ("rbf", "linear", "poly", "laplacian", "multi_rbf")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# The bandwidth multipliers of "multi_rbf": those of transferkit.kernels.GaussianKernel.
MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def resolve_gamma(gamma: object, kernel: object, x: np.ndarray) -> float:
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


def check_kernel_params(
    degree: object, coef0: object, multipliers: object
) -> tuple[int, float, tuple[float, ...]]:
    """``degree``, ``coef0`` and ``multipliers`` checked and normalised."""
    deg = int(check_positive(degree, "degree", integer=True))
    if isinstance(coef0, bool) or not isinstance(coef0, (int, float)) or not math.isfinite(coef0):
        raise ValueError(f"coef0: expected a finite number, got {coef0!r}")
    if not isinstance(multipliers, Sequence) or len(multipliers) == 0:
        raise ValueError(f"multipliers: expected a non-empty sequence, got {multipliers!r}")
    mults = tuple(check_positive(m, "multipliers") for m in multipliers)
    return deg, float(coef0), mults


def named_kernel(
    name: object, gamma: float, degree: int, coef0: float, multipliers: Sequence[float]
) -> Kernel:
    """The [`transferkit.kernels`][] object for a kernel name in scikit-learn's ``gamma``.

    ``exp(-gamma d)`` is a Gaussian with ``sigma^2 = 1 / (2 gamma)`` (``"multi_rbf"``: the
    same ``sigma`` with the multipliers on ``sigma^2``, i.e. ``exp(-gamma d / m)``),
    ``exp(-gamma ||x - y||)`` a Laplacian with ``sigma = 1 / gamma``, ``"poly"`` is
    ``(gamma x.y + coef0)^degree``. Kernel values agree with scikit-learn's to rounding
    (the bandwidth round trip costs an ulp or two of ``gamma``).
    """
    kind = check_option(name, "kernel", KERNELS)
    if kind in ("rbf", "multi_rbf"):
        factors = (1.0,) if kind == "rbf" else tuple(multipliers)
        return GaussianKernel(bandwidth=math.sqrt(0.5 / gamma), multipliers=factors)
    if kind == "laplacian":
        return LaplacianKernel(bandwidth=1.0 / gamma)
    if kind == "poly":
        return PolynomialKernel(degree=degree, gamma=gamma, coef0=coef0)
    return LinearKernel()


def check_custom_kernel(kernel: KernelFunction) -> KernelFunction:
    """A user's kernel callable, refused when it picks its bandwidth from each batch."""
    if getattr(kernel, "bandwidth", 1.0) is None:
        raise ValueError(
            f"kernel: {kernel!r} picks its bandwidth from each batch, so the chunks of "
            "a Gram matrix would use different kernels; give it an explicit bandwidth"
        )
    return kernel


def _to_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Squared norms of float32 rows overflow from |x| ~ 1e18 (and lose all precision below
    # ~1e-16): such Gram matrices came back NaN or silently wrong. float64 has the range
    # (and transferkit.kernels.gram rescales what it cannot square).
    largest = float(np.abs(x).max()) if x.size and dtype != torch.float64 else 0.0
    if rescale_factor(largest, max(x.shape[1], 1), dtype) != 1.0:
        raise ValueError(
            f"X: values up to {largest:.1e} are outside what {dtype} Gram matrices resolve; "
            "use dtype='float64' (the default) or standardise the features"
        )
    # torch cannot wrap read-only arrays (e.g. memory-mapped after unpickling): copy those.
    array = x if x.flags.writeable else x.copy()
    return torch.as_tensor(array, device=device).to(dtype)


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


def _column_free(kernel: object) -> bool:
    """Whether ``kernel``'s parameters are fixed, independent of the data and its width."""
    if isinstance(kernel, (GaussianKernel, LaplacianKernel)):
        return kernel.bandwidth is not None
    if isinstance(kernel, PolynomialKernel):
        return kernel.gamma is not None
    return isinstance(kernel, LinearKernel)


def gram_matrix(
    kernel: Kernel | KernelFunction,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """``kernel(x[rows], y)`` (``y=None``: ``x[rows]``) as a float64 ``(N, M)`` array.

    The matrix is [`transferkit.kernels.gram`][]'s (row strips on ``device`` in
    ``dtype``, written into a float64 host matrix; for ``y=None`` the upper triangle,
    mirrored). For kernels with fixed parameters, columns that cannot change a kernel
    value are left out of the matrix products first (see `_informative_columns`). The
    row selection ``rows`` (``None``: all, in order) and the columns cost one copy of
    ``x`` together: each fresh temporary of ``x``'s size costs page faults.
    """
    columns = None
    if _column_free(kernel):
        distance = getattr(kernel, "family", "") == "distance"
        columns = _informative_columns(x, y, distance)  # the same for any row order
        if columns is not None and y is not None:
            y = np.take(y, columns, axis=1)
    if rows is not None and columns is not None:
        x = x[np.ix_(rows, columns)]
    elif rows is not None:
        x = x[rows]
    elif columns is not None:
        x = np.take(x, columns, axis=1)
    xt = _to_tensor(x, device, dtype)
    yt = None if y is None else _to_tensor(y, device, dtype)
    # torch's allocator, not NumPy's: NumPy advises huge pages for large arrays, which made
    # the first touch of an (n, n) Gram matrix 4-5x slower on the sandboxed build machine
    # (5 s vs 1 s for 800 MB); libsvm reads the memory through the NumPy view either way.
    host = torch.empty((x.shape[0], x.shape[0] if y is None else y.shape[0]), dtype=torch.float64)
    gram(xt, yt, kernel, chunk_size=chunk_size, out=host)
    out: np.ndarray = host.numpy()
    return out
