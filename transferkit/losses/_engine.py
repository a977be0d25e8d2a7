"""The blocked MMD/JMMD engine: one pass over the tiles of the pooled kernel matrix.

Also the input preparation shared by [`mmd`][transferkit.losses.mmd] and
[`joint_mmd`][transferkit.losses.joint_mmd] (weights, rescaling, kernel checks) and the
linear-time estimator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .._precision import as_compute
from .._validation import check_pair, check_positive, check_tensor
from ..kernels import GaussianKernel, Kernel
from ..kernels._distances import overflow_error, rescale_factor, screen_features

__all__ = [
    "CACHE_BLOCK_ELEMENTS",
    "ESTIMATORS",
    "MAX_BLOCK_ELEMENTS",
    "BlockedMMD",
    "Estimator",
    "assemble",
    "block_rows",
    "check_kernel",
    "check_pair_inputs",
    "check_result",
    "check_weights",
    "linear_mmd",
    "pooled_state",
    "rescaled",
    "stacked_weights",
    "tile_rows",
    "uniform_coefficients",
]

Estimator = Literal["biased", "unbiased", "linear"]
ESTIMATORS: tuple[Estimator, ...] = ("biased", "unbiased", "linear")

#: Largest kernel block (in elements) evaluated at once; 2**24 fp32 values are 64 MiB.
MAX_BLOCK_ELEMENTS = 2**24
#: Elementwise kernel work runs on sub-blocks of this many elements, which stay in cache.
CACHE_BLOCK_ELEMENTS = 2**16


# --------------------------------------------------------------------------- MMD core


def _tile_values(
    kernels: Sequence[Kernel],
    zs: Sequence[Tensor],
    squares: Sequence[Tensor | None],
    states: Sequence[Tensor],
    buffers: Sequence[Tensor],
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> tuple[Tensor, list[Tensor]]:
    """The joint kernel on one tile and, per layer, ``dK/dbase_l`` written into ``buffers``.

    The joint kernel ``K`` is the product of the layers' kernels (one layer: the
    kernel). Each layer's base matrix (squared distances or inner products) is formed
    with one GEMM into its buffer, then overwritten in place by the layer's kernel
    derivative times the other layers' kernel values.
    """
    (i0, i1), (j0, j1) = rows, cols
    values: list[Tensor] = []
    blocks: list[Tensor] = []
    for kernel, z, sq, state, buffer in zip(kernels, zs, squares, states, buffers, strict=True):
        block = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
        if sq is None:
            torch.mm(z[i0:i1], z[j0:j1].T, out=block)
        else:
            torch.addmm(sq[j0:j1].unsqueeze(0), z[i0:i1], z[j0:j1].T, alpha=-2.0, out=block)
            block.add_(sq[i0:i1].unsqueeze(1)).clamp_min_(0.0)
            if i0 == j0:
                block.diagonal().zero_()
        value, derivative = kernel.value_and_derivative(block, state)
        if derivative.data_ptr() != block.data_ptr():
            if value.data_ptr() == block.data_ptr():
                value = value.clone()  # e.g. the linear kernel returns its base
            block.copy_(derivative)
        values.append(value)
        blocks.append(block)
    joint = values[0]
    if len(values) > 1:
        for layer, block in enumerate(blocks):
            for other, value in enumerate(values):
                if other != layer:
                    block.mul_(value)
        joint = torch.mul(values[0], values[1])
        for value in values[2:]:
            joint.mul_(value)
    if i0 == j0:
        # A distance kernel's diagonal base is the constant ||z_i - z_i||^2 = 0: it adds
        # nothing to the gradient. Left in, its derivative (-1 / (2 m sigma^2) per
        # bandwidth) enters the reductions once as K'_ii w_i z_i and once as
        # z_i K'_ii w_i, which cancel only up to rounding: with a bandwidth small against
        # the distances that rounding is the whole gradient.
        for kernel, block in zip(kernels, blocks, strict=True):
            if kernel.family == "distance":
                block.diagonal().zero_()
    return joint, blocks


def _form_coefficients(c_ss: float, c_tt: float, c_st: float, like: Tensor) -> Tensor:
    """The symmetric 2 x 2 matrix ``[[c_ss, c_st / 2], [c_st / 2, c_tt]]`` like ``like``."""
    half = 0.5 * c_st
    return torch.tensor([[c_ss, half], [half, c_tt]], dtype=like.dtype, device=like.device)


def uniform_coefficients(
    n: int, m: int, estimator: Estimator
) -> tuple[float, float, float, float, float]:
    """`BlockedMMD` coefficients of the biased/unbiased estimate with weights 1/N, 1/M."""
    if estimator == "biased":
        return 1.0, 1.0, -2.0, 0.0, 0.0
    return n / (n - 1.0), m / (m - 1.0), -2.0, 1.0 / (n * (n - 1.0)), 1.0 / (m * (m - 1.0))


def _sides(start: int, stop: int, split: int) -> list[tuple[int, int, int]]:
    """``(side, first, last)`` parts of the rows ``start:stop`` (side 0: source rows)."""
    if stop <= split:
        return [(0, start, stop)]
    if start >= split:
        return [(1, start, stop)]
    return [(0, start, split), (1, split, stop)]


class BlockedMMD(torch.autograd.Function):
    """``A = M^T K M`` (2 x 2) and ``diag(K)`` for the pooled joint kernel ``K``.

    ``K = prod_l k_l(z_l, z_l)`` over one or more layers ``z_l`` (``(N + M, D_l)``,
    source rows first); ``M = [[w, 0], [0, v]]`` holds the source weights on the first
    ``split`` rows and the target weights on the rest.

    One pass over the tiles ``(I, J)``, ``I <= J``, of the symmetric matrix does all
    the ``O((N + M)^2)`` work, each tile once: per layer one GEMM forms the base matrix
    (distances or inner products), one elementwise sweep (the tile fits in cache) turns
    it into kernel values and, in place, the derivative ``K'_l = dK/dbase_l``; the tile
    and its transpose then add to ``K @ M`` and, when a gradient is wanted (``track``),
    to the reductions ``R_l = K'_l @ [m * z_l, m]`` split by the domain of the columns,
    which do not depend on the incoming gradient. So the forward costs half a Gram
    matrix plus one gradient GEMM per layer, the backward pass is ``O((N + M) D)`` (no
    tile is stored or recomputed) and memory stays ``O(L tile^2 + (N + M) D)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        weights: Tensor,
        split: int,
        kernels: Sequence[Kernel],
        states: Sequence[Tensor],
        tile: int,
        track: bool,
        coefficients: tuple[float, float, float, float, float] | None,
        *zs: Tensor,
    ) -> tuple[Tensor, Tensor] | Tensor:
        n = zs[0].shape[0]
        layers = len(zs)
        squares = [
            (z * z).sum(1) if k.family == "distance" else None
            for k, z in zip(kernels, zs, strict=True)
        ]
        mass = weights.sum(1)  # each row has one non-zero weight
        products = zs[0].new_zeros(2, n)  # (K @ M).T
        diagonal = zs[0].new_empty(n)
        derivative_diagonal = zs[0].new_empty(layers, n)
        tiles = [(start, min(start + tile, n)) for start in range(0, n, tile)]
        buffers = [z.new_empty(tile * tile) for z in zs]
        augmented = (
            [torch.cat([z * mass.unsqueeze(1), mass.unsqueeze(1)], 1) for z in zs] if track else []
        )
        reduced = [z.new_zeros(2, n, z.shape[1] + 1) for z in zs] if track else []
        for index, rows in enumerate(tiles):
            i0, i1 = rows
            for cols in tiles[index:]:
                j0, j1 = cols
                joint, blocks = _tile_values(kernels, zs, squares, states, buffers, rows, cols)
                for side, first, last in _sides(j0, j1, split):
                    part = slice(first - j0, last - j0)
                    products[side, i0:i1].addmv_(joint[:, part], mass[first:last])
                    for aug, out, block in zip(augmented, reduced, blocks, strict=False):
                        out[side, i0:i1].addmm_(block[:, part], aug[first:last])
                if i0 == j0:
                    diagonal[i0:i1] = joint.diagonal()
                    for layer, block in enumerate(blocks):
                        derivative_diagonal[layer, i0:i1] = block.diagonal()
                    continue
                for side, first, last in _sides(i0, i1, split):
                    part = slice(first - i0, last - i0)
                    products[side, j0:j1].addmv_(joint[part].T, mass[first:last])
                    for aug, out, block in zip(augmented, reduced, blocks, strict=False):
                        out[side, j0:j1].addmm_(block[part].T, aug[first:last])
        products = products.T
        ctx.save_for_backward(weights, products, derivative_diagonal, *zs, *reduced)
        ctx.kernels, ctx.layers, ctx.track = kernels, layers, track
        ctx.coefficients, ctx.split = coefficients, split
        forms = weights.T @ products
        if coefficients is None:
            return forms, diagonal
        # The estimate itself: sum_ab C_ab A_ab - d_s sum(diag_s) - d_t sum(diag_t).
        c_ss, c_tt, c_st, d_s, d_t = coefficients
        value = (forms * _form_coefficients(c_ss, c_tt, c_st, forms)).sum()
        if d_s or d_t:
            value -= d_s * diagonal[:split].sum() + d_t * diagonal[split:].sum()
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        weights, products, derivative_diagonal, *rest = ctx.saved_tensors
        layers: int = ctx.layers
        zs, reduced = rest[:layers], rest[layers:]
        if ctx.coefficients is None:
            grad_forms, grad_diagonal = grads
        else:
            (grad_value,) = grads
            assert grad_value is not None
            c_ss, c_tt, c_st, d_s, d_t = ctx.coefficients
            grad_forms = _form_coefficients(c_ss, c_tt, c_st, weights) * grad_value
            grad_diagonal = None
            if (d_s or d_t) and any(k.family == "inner" for k in ctx.kernels):
                grad_diagonal = weights.new_empty(weights.shape[0])
                grad_diagonal[: ctx.split] = -d_s * grad_value
                grad_diagonal[ctx.split :] = -d_t * grad_value
        if grad_forms is None:
            grad_forms = weights.new_zeros(2, 2)
        # Uniform coefficients give a symmetric gradient already.
        symmetric = (
            grad_forms if ctx.coefficients is not None else 0.5 * (grad_forms + grad_forms.T)
        )
        grad_weights = 2.0 * products @ symmetric if ctx.needs_input_grad[0] else None
        grads_z: list[Tensor | None] = [None] * layers
        if any(ctx.needs_input_grad[7:]):
            if not ctx.track:
                raise RuntimeError("mmd: the forward pass was run without gradient tracking")
            # H = (M S M^T) * K'_l (+ diag), so H @ z and H @ 1 come from R_l;
            # ``left = M S`` scales the rows.
            left = weights @ symmetric
            left_source, left_target = left[:, :1], left[:, 1:]
            for layer, (kernel, z, pq) in enumerate(zip(ctx.kernels, zs, reduced, strict=True)):
                if not ctx.needs_input_grad[7 + layer]:
                    continue
                dim = z.shape[1]
                out = pq[0, :, :dim] * left_source
                out.addcmul_(pq[1, :, :dim], left_target)  # out = H @ z
                if kernel.family == "distance":
                    h_sum = left_source * pq[0, :, dim:] + left_target * pq[1, :, dim:]
                    out.mul_(-4.0).addcmul_(z, h_sum, value=4.0)
                else:
                    out.mul_(2.0)
                    if grad_diagonal is not None:
                        own = derivative_diagonal[layer] * grad_diagonal
                        out.addcmul_(z, own.unsqueeze(1), value=2.0)
                grads_z[layer] = out
        return (grad_weights, None, None, None, None, None, None, *grads_z)


def check_weights(weights: Tensor | None, name: str, count: int, like: Tensor) -> Tensor:
    """Normalised per-sample weights (uniform when ``weights`` is None)."""
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=like.dtype, device=like.device)
    check_tensor(weights, name, ndim=1, floating=True)
    if weights.shape[0] != count:
        raise ValueError(
            f"{name}: expected {count} weights (one per sample), got {weights.shape[0]}"
        )
    if weights.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {weights.device}")
    if bool((weights < 0).any()) or not bool((weights > 0).any()):
        raise ValueError(f"{name}: expected non-negative weights with a positive sum")
    cast = weights.to(like.dtype)
    info = torch.finfo(like.dtype)
    if not info.tiny * 2.0**24 <= float(cast.amax()) <= info.max / count:
        # The cast to the compute dtype (float64 weights of 1e-50 or 1e40 under fp32
        # features) or the sum (fp32 weights near 3e38) would underflow or overflow into
        # 0 / 0 or x / inf: divide by the largest weight first, in the weights' own
        # dtype, so that the values are in [0, 1] with a 1 among them. Weights of
        # ordinary magnitude keep the plain (bit-identical) path.
        cast = (weights / weights.amax()).to(like.dtype)
    return cast / cast.sum()


def assemble(
    forms: Tensor,
    diagonal: Tensor,
    w: Tensor,
    v: Tensor,
    estimator: Estimator,
) -> Tensor:
    """Combine ``M^T K M`` and ``diag(K)`` into the biased or unbiased estimate."""
    if estimator == "biased":
        return forms[0, 0] + forms[1, 1] - 2.0 * forms[0, 1]
    n = w.shape[0]
    w2, v2 = w * w, v * v
    source = (forms[0, 0] - (w2 * diagonal[:n]).sum()) / (1.0 - w2.sum())
    target = (forms[1, 1] - (v2 * diagonal[n:]).sum()) / (1.0 - v2.sum())
    return source + target - 2.0 * forms[0, 1]


def stacked_weights(w: Tensor, v: Tensor) -> Tensor:
    """The ``(N + M, 2)`` matrix with columns ``[w; 0]`` and ``[0; v]``."""
    top = torch.stack([w, torch.zeros_like(w)], 1)
    bottom = torch.stack([torch.zeros_like(v), v], 1)
    return torch.cat([top, bottom])


def check_pair_inputs(
    source: Tensor, target: Tensor, estimator: Estimator, names: tuple[str, str]
) -> float:
    """Validate one layer's pair; return ``max |value|`` over both (``nan`` while compiling)."""
    minimum = 1 if estimator == "biased" else 2
    largest = screen_features(source, names[0], minimum)
    largest = max(largest, screen_features(target, names[1], minimum))
    check_pair(source, target, names)
    if estimator == "linear" and source.shape[0] != target.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]}: the 'linear' estimator pairs samples and needs "
            f"equal batch sizes, got {source.shape[0]} and {target.shape[0]}; use "
            "estimator='unbiased' for unequal sizes"
        )
    return largest


def rescaled(
    kernel: Kernel, source: Tensor, target: Tensor, largest: float, *, defer: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Compute-dtype inputs (divided by a power of two where needed) and the kernel state.

    Distance kernels on inputs of extreme magnitude get inputs divided by
    `transferkit.kernels.rescale_factor` (exact; the state is rescaled with them);
    anything else is unchanged. With ``defer=True`` the state is ``None`` where
    `pooled_state` can compute it from the centred pooled rows instead.
    """
    s, t = as_compute(source), as_compute(target)
    scale = 1.0
    if kernel.family == "distance":
        scale = rescale_factor(largest, s.shape[1], s.dtype)
        if scale != 1.0:
            s, t = s / scale, t / scale
    if defer and _is_mean_heuristic(kernel):
        return s, t, None
    return s, t, kernel.prepare_rescaled(s, t, scale)


def _is_mean_heuristic(kernel: Kernel) -> bool:
    """Whether ``kernel`` is a plain `GaussianKernel` with the mean-distance bandwidth."""
    return type(kernel) is GaussianKernel and kernel.bandwidth is None


def pooled_state(centred: Tensor) -> Tensor:
    """`GaussianKernel`'s ``sigma^2`` from the centred pooled rows: ``2 sum ||z||^2 / (N - 1)``.

    The same mean off-diagonal squared distance as
    `transferkit.kernels.pooled_mean_squared_distance`, from the rows `mmd` centres anyway.
    """
    spread = centred.detach().square().sum()
    value = spread * (2.0 / (centred.shape[0] - 1))
    return value + (value == 0)  # all points equal: any bandwidth gives the same kernel


def check_result(value: Tensor, names: str, largest: float, risky: bool) -> Tensor:
    """Raise instead of returning a NaN/inf that overflow (not bad input) produced."""
    if risky and not bool(torch.isfinite(value.detach()).all()):
        raise overflow_error(names, largest, value.dtype, "kernel values")
    return value


#: The kernel `mmd` uses when given none (never handed out: `MMDLoss` builds its own).
_DEFAULT_KERNEL = GaussianKernel()


def check_kernel(kernel: object, name: str = "kernel", *, shared: bool = False) -> Kernel:
    if kernel is None:
        return _DEFAULT_KERNEL if shared else GaussianKernel()
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"{name}: expected a transferkit.kernels.Kernel (e.g. GaussianKernel()), "
            f"got {type(kernel).__name__}"
        )
    return kernel


def block_rows(n: int, chunk_size: int | None, layers: int = 1) -> int:
    """Most rows of the pooled kernel matrix per block (``n``: one block).

    Each of the ``layers`` kernels holds one ``(rows, n)`` block at a time.
    """
    if chunk_size is not None:
        return min(n, int(check_positive(chunk_size, "chunk_size", integer=True)))
    if n * n * layers <= MAX_BLOCK_ELEMENTS:
        return n
    return max(1, MAX_BLOCK_ELEMENTS // (n * layers))


def tile_rows(n: int, chunk_size: int | None, layers: int = 1) -> int:
    """Rows (and columns) of the square tiles the engine works on.

    Tiles hold at most `CACHE_BLOCK_ELEMENTS` values, so a tile's elementwise work
    stays in cache; ``chunk_size`` (or the `MAX_BLOCK_ELEMENTS` bound) caps them further.
    """
    return max(1, min(block_rows(n, chunk_size, layers), math.isqrt(CACHE_BLOCK_ELEMENTS)))


def linear_mmd(
    source: Sequence[Tensor],
    target: Sequence[Tensor],
    kernels: Sequence[Kernel],
    states: Sequence[Tensor],
) -> Tensor:
    """Linear-time MMD; the per-layer paired kernel values are multiplied (JMMD)."""
    half = source[0].shape[0] // 2

    def term(first: tuple[int, int], second: tuple[int, int]) -> Tensor:
        """Joint kernel of (domain, parity) sample sets, e.g. ((0, 0), (1, 1)) = k(s_2i, t_2i+1)."""
        product = source[0].new_ones(half)
        for s, t, kernel, state in zip(source, target, kernels, states, strict=True):
            domains = (s, t)
            a = domains[first[0]][first[1] : 2 * half : 2]
            b = domains[second[0]][second[1] : 2 * half : 2]
            product = product * kernel.paired(a, b, state)
        return product

    within = term((0, 0), (0, 1)) + term((1, 0), (1, 1))
    return (within - term((0, 0), (1, 1)) - term((0, 1), (1, 0))).mean()
