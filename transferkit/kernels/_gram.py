"""A chunked Gram matrix: ``kernel(x, y)`` in row strips, for estimators without autograd."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .._precision import as_compute, no_autocast
from .._validation import check_pair, check_positive
from ._distances import overflow_error, rescale_factor, screen_features
from ._kernels import GaussianKernel, Kernel, LinearKernel

__all__ = ["gram"]

#: Elements of a base-matrix tile that one ``from_base`` call transforms on the CPU
#: (2 MiB of float64: fresh allocations of whole strips cost more than the arithmetic).
_CPU_TILE_ELEMENTS = 1 << 18
#: Row strips of a symmetric Gram matrix are at most this high, so that the diagonal
#: blocks (computed whole, then overwritten by the mirror) add little to the work.
_SYMMETRIC_STRIP = 256


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _mirror_rows(matrix: Tensor, rows: slice, band: int = 256) -> None:
    """Copy the upper triangle of ``matrix[rows]`` below the diagonal, in bands of rows.

    Band by band, the rows right of the band's diagonal tile become the columns below it
    (this also overwrites the matrix product's own lower triangle inside the diagonal
    block, so the result is exactly symmetric); only the small diagonal tiles need a mask.
    """
    for part in _chunks(rows.stop - rows.start, band):
        a, b = rows.start + part.start, rows.start + part.stop
        matrix[b:, a:b] = matrix[a:b, b:].T
        tile = matrix[a:b, a:b]
        lower = torch.ones(b - a, b - a, dtype=torch.bool, device=matrix.device).tril_(-1)
        tile[lower] = tile.T[lower]


def _values_in_place(kernel: Kernel, base: Tensor, state: Tensor) -> None:
    """Overwrite ``base`` with ``kernel.from_base(base, state)``, bit for bit.

    ``from_base`` stays out of place (the losses differentiate through it); without
    autograd the Gaussian sum needs no fresh tile per term (``0 + exp(v)`` is ``exp(v)``
    exactly, and the other terms are added in the same order), the linear kernel none.
    """
    if isinstance(kernel, LinearKernel):
        return
    if isinstance(kernel, GaussianKernel):
        first, *rest = kernel.multipliers
        scratch = base.clone() if rest else base
        base.mul_(-0.5 / (first * state)).exp_()
        for m in rest:
            base.add_(torch.mul(scratch, -0.5 / (m * state)).exp_())
        return
    base.copy_(kernel.from_base(base, state))


def _check_out(out: object, shape: tuple[int, int]) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out: expected shape {shape}, got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"out: expected a floating tensor, got {out.dtype}")
    if out.device.type == "meta":
        raise ValueError("out: expected a tensor with data, got one on the meta device")
    if out.requires_grad:
        raise ValueError("out: expected a tensor that does not require grad")
    return out


def gram(
    x: Tensor,
    y: Tensor | None,
    kernel: Kernel | Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int = 1024,
    out: Tensor | None = None,
) -> Tensor:
    """The kernel matrix ``kernel(x, y)`` computed in row strips, memory-bounded, no autograd.

    For the estimators of [`transferkit.sklearn`][] and other users of whole Gram matrices
    (an SVM, kernel PCA, TCA): the values equal ``kernel(x, y)`` to rounding, but the
    matrix is built strip by strip (at most ``chunk_size`` rows), so that besides the
    result only one ``(chunk_size, M)`` strip is alive, and without an autograd graph.

    A [`Kernel`][] takes the fast path: its parameters (e.g. a heuristic bandwidth, from
    the pooled rows of ``x`` and ``y`` as in ``kernel(x, y)``) are set once for the whole
    matrix; the base matrix (squared distances in GEMM form after centring, or inner
    products) is one matrix multiplication per strip, turned into kernel values in place
    on cache-sized tiles. With ``y=None`` only the upper triangle is computed (half the
    matrix product) and mirrored: the result is exactly symmetric, with exact zero
    self-distances. Any other callable ``f(a, b) -> (len(a), len(b))`` is called once per
    strip, ``f(x[rows], y)``.

    The strips are computed in the dtype of ``x`` (fp32 for fp16/bf16) and written into
    ``out``, which may have another dtype or device: float32 inputs with a float64
    ``out`` give float32 strips accumulated into a float64 matrix (the strips land in
    ``out`` directly when it has the compute dtype and device).

    Args:
        x: ``(N, D)`` rows.
        y: ``(M, D)`` columns; ``None`` means ``x`` (a symmetric matrix).
        kernel: a [`Kernel`][] or a callable returning the kernel block of two row sets.
        chunk_size: rows per strip (a positive integer).
        out: optional ``(N, M)`` floating tensor to write the matrix into.

    Returns:
        The ``(N, M)`` kernel matrix: ``out`` when given, else a new tensor in the compute
        dtype on ``x``'s device.

    Shape:
        - x: ``(N, D)``; y: ``(M, D)``.
        - Output: ``(N, M)``.

    Raises:
        ValueError: if an input is not a finite, non-empty 2-D tensor, the feature
            dimensions or devices differ, ``out`` has the wrong shape, a callable returns
            a block of the wrong shape, or kernel values overflow the dtype.
        TypeError: for non-floating inputs, mixed dtypes, a ``kernel`` that is not
            callable, or a ``chunk_size`` that is not a positive integer.

    Examples:
        >>> from transferkit.kernels import GaussianKernel, LinearKernel, gram
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
        >>> gram(x, None, LinearKernel(), chunk_size=2)
        tensor([[ 0.,  0.,  0.],
                [ 0., 25.,  4.],
                [ 0.,  4.,  1.]])
        >>> out = torch.empty(3, 3, dtype=torch.float64)
        >>> _ = gram(x, None, GaussianKernel(bandwidth=5.0), chunk_size=2, out=out)
        >>> bool(torch.equal(out, out.T)), out.dtype
        (True, torch.float64)
    """
    largest = screen_features(x, "x")
    symmetric = y is None or y is x
    if y is not None and not symmetric:
        largest = max(largest, screen_features(y, "y"))
        check_pair(x, y, ("x", "y"))
    if not isinstance(kernel, Kernel) and not callable(kernel):
        raise TypeError(
            f"kernel: expected a transferkit.kernels.Kernel or a callable "
            f"f(a, b) -> (len(a), len(b)), got {type(kernel).__name__}"
        )
    rows_per_strip = int(check_positive(chunk_size, "chunk_size", integer=True))
    n = x.shape[0]
    m = n if symmetric or y is None else y.shape[0]
    with torch.no_grad(), no_autocast(x.device):
        xc = as_compute(x.detach())
        yc = xc if symmetric or y is None else as_compute(y.detach())
        result = (
            torch.empty((n, m), dtype=xc.dtype, device=xc.device)
            if out is None
            else _check_out(out, (n, m))
        )
        if isinstance(kernel, Kernel):
            _kernel_strips(kernel, xc, yc, symmetric, largest, rows_per_strip, result)
        else:
            _callable_strips(kernel, xc, yc, rows_per_strip, result)
    return result


def _kernel_strips(
    kernel: Kernel,
    x: Tensor,
    y: Tensor,
    symmetric: bool,
    largest: float,
    chunk_size: int,
    out: Tensor,
) -> None:
    """Fill ``out`` with ``kernel(x, y)`` from the base matrix, strip by strip."""
    distance = kernel.family == "distance"
    dim = x.shape[1]
    scale = rescale_factor(largest, dim, x.dtype)
    if distance:
        if scale != 1.0:
            x = x / scale
            y = x if symmetric else y / scale
        # Centring leaves distances unchanged and avoids cancellation in the GEMM form.
        centre = y.mean(0)
        x = x - centre
        y = x if symmetric else y - centre
    state = kernel.prepare_rescaled(x, y, scale)
    check = kernel.may_overflow(largest, dim, x.dtype)
    n, m = x.shape[0], y.shape[0]
    direct = out.dtype == x.dtype and out.device == x.device
    x_norm = (x * x).sum(1)  # used by the distance kernels only
    y_norm = x_norm if symmetric else (y * y).sum(1)
    tile = max(1, _CPU_TILE_ELEMENTS // max(m, 1)) if x.device.type == "cpu" else chunk_size
    height = min(chunk_size, _SYMMETRIC_STRIP) if symmetric else chunk_size
    for rows in _chunks(n, height):
        start = rows.start if symmetric else 0  # the upper triangle only
        # -2 is a power of two: scaling x first is exact and saves a pass.
        left = x[rows] * -2.0 if distance else x[rows]
        right = y[start:].T
        strip = torch.mm(left, right, out=out[rows, start:]) if direct else torch.mm(left, right)
        if distance:
            strip.add_(x_norm[rows, None]).add_(y_norm[start:]).clamp_(min=0.0)
            if symmetric:
                strip.diagonal().zero_()
        for part in _chunks(strip.shape[0], tile):
            _values_in_place(kernel, strip[part], state)
        if check and not bool(torch.isfinite(strip).all()):
            raise overflow_error("x and y", largest, strip.dtype, f"{kernel!r} values")
        if not direct:
            out[rows, start:].copy_(strip)  # converts in one pass, no temporary
        if symmetric:
            _mirror_rows(out, rows)


def _callable_strips(
    kernel: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    chunk_size: int,
    out: Tensor,
) -> None:
    """Fill ``out`` with ``kernel(x[rows], y)``, checking each block's shape."""
    m = y.shape[0]
    for rows in _chunks(x.shape[0], chunk_size):
        block = kernel(x[rows], y)
        expected = (rows.stop - rows.start, m)
        if not isinstance(block, Tensor) or tuple(block.shape) != expected:
            got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise ValueError(f"kernel: expected a {expected} matrix, got {got}")
        out[rows] = block.to(device=out.device, dtype=out.dtype)
