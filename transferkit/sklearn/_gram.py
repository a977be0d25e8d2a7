"""Gram matrices for the estimators: named kernels in scikit-learn's terms, computed in torch.

One engine for every estimator ([`TorchKernelSVC`][transferkit.sklearn.TorchKernelSVC]
and [`TCA`][transferkit.sklearn.TCA]): a named kernel is the
[`transferkit.kernels`][] object with the matching bandwidth (`named_kernel`),
and `gram_matrix` evaluates it, or any user kernel callable, in row blocks.
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
    rescale_factor,
)
from ._inputs import row_chunks

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


def gram_matrix(
    kernel: Kernel | KernelFunction,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    chunk_size: int,
) -> np.ndarray:
    """``kernel(x, y)`` (``y=None``: ``x``) as a float64 ``(N, M)`` array, in row blocks.

    A [`transferkit.kernels`][] object made by `named_kernel` takes the blocked
    path of `_kernel_gram`; any other callable is evaluated on row blocks of
    ``chunk_size`` rows against all of ``y`` and must return ``(rows, M)`` blocks.
    """
    if isinstance(kernel, (GaussianKernel, LaplacianKernel, LinearKernel, PolynomialKernel)):
        return _kernel_gram(kernel, x, y, device=device, dtype=dtype, chunk_size=chunk_size)
    xt = _to_tensor(x, device, dtype)
    yt = xt if y is None else _to_tensor(y, device, dtype)
    out = np.empty((x.shape[0], yt.shape[0]), dtype=np.float64)
    with torch.inference_mode():
        for rows in row_chunks(x.shape[0], chunk_size):
            block = kernel(xt[rows], yt)
            if block.shape != (rows.stop - rows.start, yt.shape[0]):
                raise ValueError(
                    f"kernel: expected a ({rows.stop - rows.start}, {yt.shape[0]}) matrix, "
                    f"got shape {tuple(block.shape)}"
                )
            out[rows] = block.to("cpu", torch.float64).numpy()
    return out


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
    with torch.inference_mode():
        # fixed parameters (no data dependence), from inputs of the full width
        state = kernel.prepare(torch.as_tensor(x[:1]).to(device, dtype))
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
        x_norm = (xt * xt).sum(1)  # used by the distance kernels only
        y_norm = x_norm if y is None else (yt * yt).sum(1)
        tile = max(1, (1 << 18) // max(m, 1)) if device.type == "cpu" else chunk_size
        # Symmetric case: strips of at most 256 rows, so that the diagonal blocks (computed
        # whole, then overwritten by the mirror) add little to the matrix product.
        height = chunk_size if y is not None else min(chunk_size, 256)
        for rows in row_chunks(n, height):
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
            for part in row_chunks(strip.shape[0], tile):
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
    for part in row_chunks(rows.stop - rows.start, band):
        a, b = rows.start + part.start, rows.start + part.stop
        gram[b:, a:b] = gram[a:b, b:].T
        tile = gram[a:b, a:b]
        lower = torch.ones(b - a, b - a, dtype=torch.bool).tril_(-1)
        tile[lower] = tile.T[lower]
