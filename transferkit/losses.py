"""Discrepancy and regularisation losses for transfer learning, built on kernels.py.

Domain discrepancies take two feature batches, ``source: (N, D)`` and ``target: (M, D)``,
and return a scalar: [`mmd`][] / [`MMDLoss`][] (squared maximum mean discrepancy,
biased, unbiased or linear-time), [`JointMMDLoss`][] (JMMD over several layers) and
[`coral`][] / [`CORALLoss`][]. [`distillation`][] and [`entropy`][] work on
logits; [`L2SP`][] and [`bss`][] regularise fine-tuning.

Target regularisers need no source batch: [`mcc`][] / [`MCCLoss`][] (minimum class
confusion) and [`bnm`][] / [`BNMLoss`][] (batch nuclear-norm maximisation) act on
target logits, [`adaptive_feature_norm`][] / [`AdaptiveFeatureNormLoss`][] (AFN) on
features. MDD, which trains an adversarial head, is
[`MarginDisparityDiscrepancy`][transferkit.adversarial.MarginDisparityDiscrepancy].

Every loss validates its input (shapes, feature dimensions, NaN/inf, devices, dtypes)
and computes in fp32 when given fp16/bf16 tensors, also under `torch.autocast`.
Validation reads a few values back from the device (e.g. the NaN check); while
`torch.compile` traces (``torch.compiler.is_compiling()``) those data-dependent
checks are skipped (shapes, dtypes and options are still checked) and [`mmd`][] uses
plain autograd ops instead of its blocked custom function, so ``mmd`` (every estimator,
fixed or heuristic bandwidth), [`coral`][], [`entropy`][], [`distillation`][],
[`mcc`][], [`bnm`][] and [`adaptive_feature_norm`][] compile with
``fullgraph=True``. Unweighted calls only: explicit sample weights are still checked
with a read-back.

The quadratic MMD estimators (and JMMD) never build an autograd graph over the
``(N + M)^2`` kernel matrix: one custom autograd function walks the symmetric matrix
in cache-sized square tiles, each tile once, and keeps only ``O((N + M) D)`` sums: the
kernel products the estimate needs and the gradient reductions ``K' @ (w * z)``, which
one more matrix multiplication per tile gives already in the forward pass. The
backward pass is then ``O((N + M) D)`` and memory stays ``O(tile^2 + (N + M) D)`` at
any batch size. (The custom function supports first-order gradients, not double
backward.)
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._precision import as_compute, compute_dtype, no_autocast
from ._validation import (
    check_features,
    check_module_data,
    check_option,
    check_pair,
    check_positive,
    check_tensor,
    did_you_mean,
)
from .kernels import GaussianKernel, Kernel
from .kernels._distances import overflow_error, rescale_factor, screen_features

__all__ = [
    "L2SP",
    "AdaptiveFeatureNormLoss",
    "BNMLoss",
    "CORALLoss",
    "JointMMDLoss",
    "MCCLoss",
    "MMDLoss",
    "adaptive_feature_norm",
    "bnm",
    "bss",
    "coral",
    "distillation",
    "entropy",
    "joint_mmd",
    "mcc",
    "mmd",
]

logger = logging.getLogger(__name__)

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
    return joint, blocks


def _form_coefficients(c_ss: float, c_tt: float, c_st: float, like: Tensor) -> Tensor:
    """The symmetric 2 x 2 matrix ``[[c_ss, c_st / 2], [c_st / 2, c_tt]]`` like ``like``."""
    half = 0.5 * c_st
    return torch.tensor([[c_ss, half], [half, c_tt]], dtype=like.dtype, device=like.device)


def _uniform_coefficients(
    n: int, m: int, estimator: Estimator
) -> tuple[float, float, float, float, float]:
    """`_BlockedMMD` coefficients of the biased/unbiased estimate with weights 1/N, 1/M."""
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


class _BlockedMMD(torch.autograd.Function):
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


def _check_weights(weights: Tensor | None, name: str, count: int, like: Tensor) -> Tensor:
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
    weights = weights.to(like.dtype)
    return weights / weights.sum()


def _assemble(
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


def _stacked_weights(w: Tensor, v: Tensor) -> Tensor:
    """The ``(N + M, 2)`` matrix with columns ``[w; 0]`` and ``[0; v]``."""
    top = torch.stack([w, torch.zeros_like(w)], 1)
    bottom = torch.stack([torch.zeros_like(v), v], 1)
    return torch.cat([top, bottom])


def _check_pair_inputs(
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


def _rescaled(
    kernel: Kernel, source: Tensor, target: Tensor, largest: float, *, defer: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Compute-dtype inputs (divided by a power of two where needed) and the kernel state.

    Distance kernels on inputs of extreme magnitude get inputs divided by
    `transferkit.kernels.rescale_factor` (exact; the state is rescaled with them);
    anything else is unchanged. With ``defer=True`` the state is ``None`` where
    `_pooled_state` can compute it from the centred pooled rows instead.
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


def _pooled_state(centred: Tensor) -> Tensor:
    """`GaussianKernel`'s ``sigma^2`` from the centred pooled rows: ``2 sum ||z||^2 / (N - 1)``.

    The same mean off-diagonal squared distance as
    `transferkit.kernels.pooled_mean_squared_distance`, from the rows `mmd` centres anyway.
    """
    spread = centred.detach().square().sum()
    value = spread * (2.0 / (centred.shape[0] - 1))
    return value + (value == 0)  # all points equal: any bandwidth gives the same kernel


def _check_result(value: Tensor, names: str, largest: float, risky: bool) -> Tensor:
    """Raise instead of returning a NaN/inf that overflow (not bad input) produced."""
    if risky and not bool(torch.isfinite(value.detach()).all()):
        raise overflow_error(names, largest, value.dtype, "kernel values")
    return value


#: The kernel `mmd` uses when given none (never handed out: `MMDLoss` builds its own).
_DEFAULT_KERNEL = GaussianKernel()


def _check_kernel(kernel: object, name: str = "kernel", *, shared: bool = False) -> Kernel:
    if kernel is None:
        return _DEFAULT_KERNEL if shared else GaussianKernel()
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"{name}: expected a transferkit.kernels.Kernel (e.g. GaussianKernel()), "
            f"got {type(kernel).__name__}"
        )
    return kernel


def _block_rows(n: int, chunk_size: int | None, layers: int = 1) -> int:
    """Most rows of the pooled kernel matrix per block (``n``: one block).

    Each of the ``layers`` kernels holds one ``(rows, n)`` block at a time.
    """
    if chunk_size is not None:
        return min(n, int(check_positive(chunk_size, "chunk_size", integer=True)))
    if n * n * layers <= MAX_BLOCK_ELEMENTS:
        return n
    return max(1, MAX_BLOCK_ELEMENTS // (n * layers))


def _tile_rows(n: int, chunk_size: int | None, layers: int = 1) -> int:
    """Rows (and columns) of the square tiles the engine works on.

    Tiles hold at most `CACHE_BLOCK_ELEMENTS` values, so a tile's elementwise work
    stays in cache; ``chunk_size`` (or the `MAX_BLOCK_ELEMENTS` bound) caps them further.
    """
    return max(1, min(_block_rows(n, chunk_size, layers), math.isqrt(CACHE_BLOCK_ELEMENTS)))


def mmd(
    source: Tensor,
    target: Tensor,
    kernel: Kernel | None = None,
    estimator: Estimator = "unbiased",
    *,
    source_weights: Tensor | None = None,
    target_weights: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Squared maximum mean discrepancy between two feature batches.

    With ``K`` the kernel, ``s_i`` the ``N`` source and ``t_j`` the ``M`` target rows:

    - ``"biased"`` (V-statistic): $\frac{1}{N^2}\sum_{i,j} K(s_i, s_j) +
      \frac{1}{M^2}\sum_{i,j} K(t_i, t_j) - \frac{2}{NM}\sum_{i,j} K(s_i, t_j)$; always
      ``>= 0``.
    - ``"unbiased"`` (U-statistic, Gretton et al. 2012, eq. 3): the same with the
      diagonals ``i = j`` excluded from the within-domain sums, which are divided by
      ``N (N - 1)`` and ``M (M - 1)``; can be slightly negative. Needs ``N, M >= 2``.
    - ``"linear"`` (Gretton et al. 2012, Lemma 14): ``O((N + M) D)`` time and memory;
      consecutive samples are paired, $h_i = K(s_{2i}, s_{2i+1}) + K(t_{2i},
      t_{2i+1}) - K(s_{2i}, t_{2i+1}) - K(s_{2i+1}, t_{2i})$, and the estimate is the
      mean of the ``h_i``. Needs ``N == M >= 2``; with an odd size the last sample of each
      batch is left out. Higher variance than the quadratic estimators.

    Per-sample weights (normalised to sum to one per domain) replace the uniform
    ``1/N``, ``1/M``; the unbiased estimator then divides the within-domain sums by
    ``sum_{i != j} w_i w_j``. The quadratic estimators evaluate the kernel in square
    tiles of at most 256 x 256 entries, each tile of the symmetric matrix once, and
    form the gradient in the same pass, so memory stays ``O(256^2 + (N + M) D)`` at any
    batch size (``chunk_size`` caps the tile size further).

    Args:
        source: source features.
        target: target features.
        kernel: a kernel from [`transferkit.kernels`][]; default
            ``GaussianKernel()`` (5 bandwidths, mean heuristic).
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        source_weights: optional non-negative per-sample weights, ``(N,)``.
        target_weights: optional non-negative per-sample weights, ``(M,)``.
        chunk_size: at most this many rows (and columns) of the pooled kernel matrix
            per tile; ``None`` chooses (256).

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``; weights: ``(N,)`` and ``(M,)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite input, different feature dimensions, too few
            samples, an unknown estimator, unequal sizes for ``"linear"``, bad weights,
            or tensors on different devices.
        TypeError: non-floating input, mixed dtypes, or a kernel that is not a ``Kernel``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> source, target = torch.randn(64, 8), torch.randn(48, 8) + 1.0
        >>> bool(mmd(source, target) > mmd(source, torch.randn(48, 8)))
        True
        >>> x = torch.randn(16, 3)
        >>> float(mmd(x, x, estimator="biased"))
        0.0
    """
    estimator = check_option(estimator, "estimator", ESTIMATORS)
    kernel = _check_kernel(kernel, shared=True)
    largest = _check_pair_inputs(source, target, estimator, ("source", "target"))
    if estimator == "linear" and (source_weights is not None or target_weights is not None):
        raise ValueError("source_weights/target_weights: not supported by estimator='linear'")
    risky = kernel.may_overflow(largest, source.shape[1], source.dtype)
    with no_autocast(source.device):
        s, t, deferred = _rescaled(kernel, source, target, largest, defer=estimator != "linear")
        w = _check_weights(source_weights, "source_weights", s.shape[0], s)
        v = _check_weights(target_weights, "target_weights", t.shape[0], t)
        if estimator == "unbiased":
            weighted = source_weights is not None or target_weights is not None
            for weights, name in ((w, "source_weights"), (v, "target_weights")):
                if weighted and float((weights * weights).sum().detach()) >= 1.0 - 1e-12:
                    raise ValueError(
                        f"{name}: the unbiased estimator needs at least two samples "
                        "with positive weight"
                    )
        if estimator == "linear":
            assert deferred is not None
            linear = _linear_mmd([s], [t], [kernel], [deferred])
            return _check_result(linear, "source and target", largest, risky)
        z = torch.cat([s, t])
        if kernel.family == "distance":
            z = z - z.detach().mean(0)
        state = _pooled_state(z) if deferred is None else deferred
        uniform = source_weights is None and target_weights is None
        compiling = torch.compiler.is_compiling()
        if uniform and not compiling:  # three ops instead of seven
            weights = z.new_zeros(z.shape[0], 2)
            weights[: s.shape[0], 0] = 1.0 / s.shape[0]
            weights[s.shape[0] :, 1] = 1.0 / t.shape[0]
        else:
            weights = _stacked_weights(w, v)
        if compiling:  # plain autograd ops: traceable without breaks
            base = kernel.base(z, z, state)
            if kernel.family == "distance":
                base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
            matrix = kernel.from_base(base, state)
            return _assemble(weights.T @ matrix @ weights, matrix.diagonal(), w, v, estimator)
        rows = _tile_rows(z.shape[0], chunk_size)
        track = torch.is_grad_enabled() and (z.requires_grad or weights.requires_grad)
        if uniform:
            coefficients = _uniform_coefficients(s.shape[0], t.shape[0], estimator)
            value = _BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights, s.shape[0], (kernel,), (state,), rows, track, coefficients, z
            )
        else:
            forms, diagonal = _BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights, s.shape[0], (kernel,), (state,), rows, track, None, z
            )
            value = _assemble(forms, diagonal, w, v, estimator)
        return _check_result(value, "source and target", largest, risky)


def _linear_mmd(
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


class MMDLoss(nn.Module):
    """Squared MMD as a module; see [`mmd`][] for the estimators and options.

    Args:
        kernel: a kernel from [`transferkit.kernels`][]; default ``GaussianKernel()``.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        chunk_size: rows of the pooled kernel matrix evaluated at once; ``None`` chooses.

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> loss = MMDLoss(estimator="biased")
        >>> round(float(loss(torch.zeros(4, 2), torch.zeros(5, 2))), 4)
        0.0
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        estimator: Estimator = "unbiased",
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel = _check_kernel(kernel)
        self.estimator: Estimator = check_option(estimator, "estimator", ESTIMATORS)
        if chunk_size is not None:
            check_positive(chunk_size, "chunk_size", integer=True)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"kernel={self.kernel!r}, estimator={self.estimator!r}"

    def forward(
        self,
        source: Tensor,
        target: Tensor,
        *,
        source_weights: Tensor | None = None,
        target_weights: Tensor | None = None,
    ) -> Tensor:
        """Squared MMD between ``source`` and ``target`` (see [`mmd`][])."""
        return mmd(
            source,
            target,
            self.kernel,
            self.estimator,
            source_weights=source_weights,
            target_weights=target_weights,
            chunk_size=self.chunk_size,
        )


# --------------------------------------------------------------------------- JMMD


def joint_mmd(
    source: Sequence[Tensor],
    target: Sequence[Tensor],
    kernels: Sequence[Kernel],
    estimator: Estimator = "unbiased",
) -> Tensor:
    r"""Joint MMD (Long et al. 2017) over several layers.

    The joint kernel is the product of per-layer kernels,
    $K(i, j) = \prod_l k_l(z^l_i, z^l_j)$, and the estimate is the MMD of
    [`mmd`][] with that kernel. It runs on the same tiled engine as [`mmd`][]: no
    ``(N + M)^2`` matrix is formed, each tile of the symmetric joint matrix is evaluated
    once (one distance GEMM and one gradient GEMM per layer), and memory stays
    ``O(L tile^2 + (N + M) sum_l D_l)``.

    Args:
        source: per-layer source tensors, e.g. ``[features, softmax(logits)]``.
        target: per-layer target tensors, in the same order.
        kernels: one kernel per layer.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.

    Returns:
        A 0-d tensor.

    Shape:
        - source[l]: ``(N, D_l)``; target[l]: ``(M, D_l)``.
        - Output: ``()``.

    Raises:
        ValueError: different numbers of layers and kernels, different batch sizes across
            layers, or any problem [`mmd`][] reports for a layer.
        TypeError: a kernel that is not a ``Kernel``, or mixed dtypes.

    Examples:
        >>> from transferkit.kernels import GaussianKernel
        >>> _ = torch.manual_seed(0)
        >>> feats, probs = torch.randn(8, 4), torch.softmax(torch.randn(8, 3), 1)
        >>> kernels = [GaussianKernel(), GaussianKernel(bandwidth=0.92, multipliers=(1.0,))]
        >>> float(joint_mmd([feats, probs], [feats, probs], kernels, estimator="biased"))
        0.0
    """
    estimator = check_option(estimator, "estimator", ESTIMATORS)
    for given, name in ((source, "source"), (target, "target"), (kernels, "kernels")):
        if isinstance(given, Tensor) or not isinstance(given, Sequence):
            raise TypeError(
                f"{name}: expected a list of per-layer values, got {type(given).__name__}"
            )
    if not (len(source) == len(target) == len(kernels)) or len(kernels) == 0:
        raise ValueError(
            f"source, target and kernels: expected the same positive number of layers, got "
            f"{len(source)}, {len(target)} and {len(kernels)}"
        )
    checked = [_check_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels)]
    largest: list[float] = []
    for layer, (s, t) in enumerate(zip(source, target, strict=True)):
        names = (f"source[{layer}]", f"target[{layer}]")
        largest.append(_check_pair_inputs(s, t, estimator, names))
        if s.shape[0] != source[0].shape[0] or t.shape[0] != target[0].shape[0]:
            raise ValueError(
                f"{names[0]} and {names[1]}: expected the batch sizes of layer 0 "
                f"({source[0].shape[0]}, {target[0].shape[0]}), got {s.shape[0]}, {t.shape[0]}"
            )
        check_pair(s, source[0], (names[0], "source[0]"), same_dim=False)
    # The joint kernel is a product: a layer may be safe alone and the product not.
    risky = any(
        k.may_overflow(big, s.shape[1], s.dtype)
        for k, big, s in zip(checked, largest, source, strict=True)
    )
    if not risky and len(checked) > 1 and not math.isnan(largest[0]):
        bound = math.prod(
            k.value_bound(big, s.shape[1])
            for k, big, s in zip(checked, largest, source, strict=True)
        )
        risky = not bound * 16.0 < torch.finfo(compute_dtype(source[0])).max
    with no_autocast(source[0].device):
        defer = estimator != "linear"
        layers = [
            _rescaled(k, s, t, big, defer=defer)
            for k, s, t, big in zip(checked, source, target, largest, strict=True)
        ]
        srcs = [s for s, _, _ in layers]
        tgts = [t for _, t, _ in layers]
        top = max(largest)
        if estimator == "linear":
            linear_states: list[Tensor] = []
            for _, _, state in layers:
                assert state is not None  # not deferred
                linear_states.append(state)
            linear = _linear_mmd(srcs, tgts, checked, linear_states)
            return _check_result(linear, "source and target", top, risky)
        zs: list[Tensor] = []
        states: list[Tensor] = []
        for kernel, (s, t, deferred) in zip(checked, layers, strict=True):
            z = torch.cat([s, t])
            zs.append(z - z.detach().mean(0) if kernel.family == "distance" else z)
            states.append(_pooled_state(zs[-1]) if deferred is None else deferred)
        n, m = srcs[0].shape[0], tgts[0].shape[0]
        w = torch.full((n,), 1.0 / n, dtype=zs[0].dtype, device=zs[0].device)
        v = torch.full((m,), 1.0 / m, dtype=zs[0].dtype, device=zs[0].device)
        weights = _stacked_weights(w, v)
        if torch.compiler.is_compiling():  # plain autograd ops: traceable without breaks
            joint: Tensor | None = None
            for kernel, z, state in zip(checked, zs, states, strict=True):
                base = kernel.base(z, z, state)
                if kernel.family == "distance":
                    base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
                layer_value = kernel.from_base(base, state)
                joint = layer_value if joint is None else joint * layer_value
            assert joint is not None
            forms, diagonal = weights.T @ joint @ weights, joint.diagonal()
        else:
            rows = _tile_rows(n + m, None, len(zs))
            track = torch.is_grad_enabled() and any(z.requires_grad for z in zs)
            value = _BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights,
                n,
                tuple(checked),
                tuple(states),
                rows,
                track,
                _uniform_coefficients(n, m, estimator),
                *zs,
            )
            return _check_result(value, "source and target", top, risky)
        value = _assemble(forms, diagonal, w, v, estimator)
        return _check_result(value, "source and target", top, risky)


class JointMMDLoss(nn.Module):
    """Joint MMD (JMMD, Long et al. 2017) as a module; see [`joint_mmd`][].

    Args:
        kernels: one kernel per layer, e.g. ``[GaussianKernel(), GaussianKernel(
            bandwidth=0.92, multipliers=(1.0,))]`` for bottleneck features and softmax
            outputs as in JAN.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.

    Shape:
        - source: a sequence of ``(N, D_l)``; target: a sequence of ``(M, D_l)``.
        - Output: ``()``.

    Examples:
        >>> from transferkit.kernels import GaussianKernel, LinearKernel
        >>> _ = torch.manual_seed(0)
        >>> loss = JointMMDLoss([GaussianKernel(), LinearKernel()], estimator="biased")
        >>> s = [torch.randn(6, 4), torch.softmax(torch.randn(6, 3), 1)]
        >>> float(loss(s, s))
        0.0
    """

    def __init__(self, kernels: Sequence[Kernel], estimator: Estimator = "unbiased") -> None:
        super().__init__()
        if isinstance(kernels, Kernel) or not isinstance(kernels, Sequence) or not kernels:
            raise TypeError("kernels: expected a non-empty list of kernels, one per layer")
        self.kernels = [_check_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels)]
        self.estimator: Estimator = check_option(estimator, "estimator", ESTIMATORS)

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"kernels={self.kernels!r}, estimator={self.estimator!r}"

    def forward(self, source: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        """Joint MMD between per-layer ``source`` and ``target`` tensors."""
        return joint_mmd(source, target, self.kernels, self.estimator)


# --------------------------------------------------------------------------- CORAL


def coral(source: Tensor, target: Tensor) -> Tensor:
    r"""Deep CORAL loss (Sun & Saenko 2016).

    $$
    \frac{1}{4 d^2} \| C_S - C_T \|_F^2
    $$

    with unbiased (``n - 1``) covariance matrices $C_S$, $C_T$ of the two
    batches and ``d`` the feature dimension.

    Args:
        source: source features (at least 2 samples).
        target: target features (at least 2 samples).

    Returns:
        A 0-d tensor.

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite input, fewer than 2 samples, different feature
            dimensions or devices, or a loss beyond the dtype's range (features of
            magnitude ``1e10`` and more in fp32; smaller ones are rescaled exactly).
        TypeError: non-floating input or mixed dtypes.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(32, 4)
        >>> float(coral(x, x + 3.0))  # a shift leaves the covariance unchanged
        0.0
        >>> bool(coral(x, 2.0 * x) > 0)
        True
    """
    largest = max(screen_features(source, "source", 2), screen_features(target, "target", 2))
    check_pair(source, target, ("source", "target"))
    with no_autocast(source.device):
        s, t = as_compute(source), as_compute(target)
        dim = s.shape[1]
        # Covariance products grow as |x|^4 (fp32 overflows from |x| ~ 1e9): extreme
        # magnitudes are computed in float64 (a D x D problem, cheap) and the result is
        # checked to fit the input's precision.
        extreme = rescale_factor(largest, dim, s.dtype, power=4) != 1.0
        if extreme:
            s, t = s.double(), t.double()
        loss = ((_covariance(s) - _covariance(t)) ** 2).sum() / (4.0 * dim * dim)
        if extreme:
            loss = loss.to(compute_dtype(source))
            if not bool(torch.isfinite(loss.detach())):
                raise overflow_error("source and target", largest, loss.dtype, "CORAL loss")
        return loss


def _covariance(x: Tensor) -> Tensor:
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


class CORALLoss(nn.Module):
    """Deep CORAL loss as a module; see [`coral`][].

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Examples:
        >>> x = torch.randn(10, 3)
        >>> float(CORALLoss()(x, x))
        0.0
    """

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        """CORAL loss between ``source`` and ``target``."""
        return coral(source, target)


# --------------------------------------------------------------------------- logits


def _check_logits(x: object, name: str) -> Tensor:
    logits = check_tensor(x, name, ndim=2, floating=True, min_samples=1)
    if logits.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one class column, got shape (N, 0)")
    return logits


def distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0
) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al. 2015).

    $$
    T^2\, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)
    $$

    averaged over the batch. The ``T^2`` factor keeps gradient magnitudes comparable
    across temperatures. Gradients flow into both inputs: pass ``teacher_logits.detach()``
    (or compute them under ``torch.no_grad()``) for a fixed teacher.

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        temperature: softmax temperature ``T > 0``.

    Returns:
        A 0-d tensor.

    Shape:
        - student_logits, teacher_logits: ``(N, C)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, different shapes or devices, or a
            non-positive temperature.
        TypeError: non-floating input or mixed dtypes.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(distillation(logits, logits))
        0.0
        >>> round(float(distillation(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), 1.0)), 4)
        0.6031
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits: expected the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    temp = check_positive(temperature, "temperature")
    with no_autocast(student_logits.device):
        log_student = F.log_softmax(as_compute(student_logits) / temp, dim=1)
        log_teacher = F.log_softmax(as_compute(teacher_logits) / temp, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return kl * (temp * temp)


def entropy(logits: Tensor) -> Tensor:
    r"""Mean prediction entropy $-\sum_c p_c \log p_c$, ``p = softmax(logits)``.

    Natural logarithm; the mean is over the batch. Minimising it on unlabelled target
    data pushes decision boundaries away from dense regions.

    Args:
        logits: class logits.

    Returns:
        A 0-d tensor.

    Shape:
        - logits: ``(N, C)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits.
        TypeError: non-floating logits.

    Examples:
        >>> round(float(entropy(torch.zeros(3, 4))), 4)  # uniform: log(4)
        1.3863
    """
    _check_logits(logits, "logits")
    with no_autocast(logits.device):
        log_p = F.log_softmax(as_compute(logits), dim=1)
        return -(log_p.exp() * log_p).sum(1).mean()


# --------------------------------------------------------------------------- target regularisers


def _check_class_logits(x: object, name: str) -> Tensor:
    """``(B, C)`` finite floating logits with ``B >= 2`` samples and ``C >= 2`` classes."""
    logits = check_tensor(x, name, ndim=2, floating=True, min_samples=2)
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name}: expected logits over at least 2 classes, got shape {tuple(logits.shape)}"
        )
    return logits


def mcc(target_logits: Tensor, temperature: float = 2.5) -> Tensor:
    r"""Minimum class confusion (MCC, Jin et al. 2020) of a batch of target logits.

    With ``B`` samples, ``C`` classes and temperature ``T``:

    $$
    p_i = \mathrm{softmax}(z_i / T), \qquad
    H_i = -\sum_c p_{ic} \log p_{ic}, \qquad
    w_i = \frac{B\,(1 + e^{-H_i})}{\sum_k (1 + e^{-H_k})}
    $$

    $$
    M = P^\top \mathrm{diag}(w)\, P \in \mathbb{R}^{C \times C}, \qquad
    \tilde M_{jk} = \frac{M_{jk}}{\sum_l M_{lk}}, \qquad
    \mathrm{MCC} = \frac{1}{C} \sum_{j \ne k} \tilde M_{jk}
    $$

    ``M`` is the class-confusion matrix (how much mass the batch puts on class ``j`` and
    ``k`` at once); category normalisation divides each column by its sum so that rare
    classes count as much as frequent ones. The value lies in ``[0, (C - 1) / C]``: the
    upper end for uniform predictions, 0 when every sample is confidently one class. The
    entropy weights ``w`` are detached, as in the reference implementation, so the
    gradient reaches the logits through ``P`` only.

    Category normalisation makes a class that no sample predicts count as fully confused
    (its column of $\tilde M$ is all off-diagonal), so the value is near 0 only
    when the batch is confident *and* covers every class; use batches of at least ``C``
    samples. A class whose softmax mass underflows to exactly 0 gets that limit, 1, not
    NaN.

    Add ``mcc_weight * mcc(target_logits)`` (the paper uses 1.0) to the source
    cross-entropy; it needs no source batch and no extra network.

    Args:
        target_logits: class logits of a target batch.
        temperature: softmax temperature ``T > 0`` (2.5 in the paper; 2-3 work well).

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - target_logits: ``(B, C)`` with ``B >= 2`` and ``C >= 2``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, fewer than 2 samples or classes, or a
            non-positive temperature.
        TypeError: non-tensor or non-floating logits, or a non-numeric temperature.

    Examples:
        >>> round(float(mcc(torch.zeros(4, 3))), 4)  # uniform predictions: (C - 1) / C
        0.6667
        >>> confident = 100.0 * torch.eye(3)  # each sample sure of a different class
        >>> float(mcc(confident)) < 1e-6
        True
        >>> round(float(mcc(100.0 * torch.eye(3)[[0, 0, 1]])), 4)  # class 2 never predicted
        0.3333
    """
    _check_class_logits(target_logits, "target_logits")
    temp = check_positive(temperature, "temperature")
    with no_autocast(target_logits.device):
        logits = as_compute(target_logits)
        batch, classes = logits.shape
        log_p = F.log_softmax(logits / temp, dim=1)
        p = log_p.exp()
        with torch.no_grad():
            certainty = 1.0 + torch.exp((p * log_p).sum(1))  # 1 + exp(-H)
            weights = batch * certainty / certainty.sum()
        confusion = (p * weights.unsqueeze(1)).T @ p
        # sum_{j != k} M~_jk = sum_k (1 - M_kk / sum_l M_lk); a column without mass is
        # given its limit, 1, instead of 0 / 0.
        column_sums = confusion.sum(0)
        massless = column_sums <= 0
        own_share = confusion.diagonal() / torch.where(massless, 1.0, column_sums)
        return (1.0 - torch.where(massless, 0.0, own_share)).sum() / classes


class MCCLoss(nn.Module):
    """Minimum class confusion as a module; see [`mcc`][].

    Args:
        temperature: softmax temperature ``T > 0`` (2.5 in the paper).

    Shape:
        - target_logits: ``(B, C)`` with ``B, C >= 2``.
        - Output: ``()``.

    Examples:
        >>> loss = MCCLoss(temperature=2.5)
        >>> round(float(loss(torch.zeros(5, 2))), 4)
        0.5
    """

    def __init__(self, temperature: float = 2.5) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"temperature={self.temperature:g}"

    def forward(self, target_logits: Tensor) -> Tensor:
        """MCC of ``target_logits``."""
        return mcc(target_logits, self.temperature)


def bnm(logits: Tensor) -> Tensor:
    r"""Batch nuclear-norm maximisation (BNM, Cui et al. 2020), as a loss to minimise.

    $$
    \mathcal{L}_{bnm} = -\frac{1}{B} \|A\|_\star, \qquad
        A = \mathrm{softmax}(z) \in \mathbb{R}^{B \times C}
    $$

    where $\|A\|_\star = \sum_k \sigma_k(A)$ is the nuclear norm (sum of singular
    values). Maximising it raises both prediction confidence (the Frobenius norm) and
    prediction diversity (the rank), which counters the collapse onto a few majority
    classes that plain entropy minimisation causes. Bounds:
    $-\sqrt{\min(B, C) / B} \le \mathcal{L}_{bnm} \le -1/\sqrt{BC}$; the lower
    bound is reached by confident predictions spread evenly over ``min(B, C)`` classes.
    The paper's code divides by ``min(B, C)`` (``-mean(svd(A))``) instead of ``B``; with
    ``B <= C`` the two agree.

    Add ``bnm_weight * bnm(target_logits)`` (1.0 in the paper) to the source
    cross-entropy. The gradient is that of ``torch.linalg.svdvals`` (``U V^T``), which is
    well defined unless singular values are exactly zero.

    Args:
        logits: class logits, usually of a target batch.

    Returns:
        A 0-d tensor, always negative (fp32 for half-precision inputs).

    Shape:
        - logits: ``(B, C)`` with ``B >= 2`` and ``C >= 2``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, or fewer than 2 samples or classes.
        TypeError: non-tensor or non-floating logits.

    Examples:
        >>> round(float(bnm(100.0 * torch.eye(3))), 4)  # confident and diverse: -1
        -1.0
        >>> round(float(bnm(torch.zeros(4, 2))), 4)  # uniform: rank 1, -sqrt(2) / 4
        -0.3536
    """
    _check_class_logits(logits, "logits")
    with no_autocast(logits.device):
        probs = F.softmax(as_compute(logits), dim=1)
        singular: Tensor = torch.linalg.svdvals(probs)
        return -singular.sum() / probs.shape[0]


class BNMLoss(nn.Module):
    """Batch nuclear-norm maximisation as a module; see [`bnm`][].

    Shape:
        - logits: ``(B, C)`` with ``B, C >= 2``.
        - Output: ``()``.

    Examples:
        >>> round(float(BNMLoss()(100.0 * torch.eye(2))), 4)
        -1.0
    """

    def forward(self, logits: Tensor) -> Tensor:
        """The negative batch nuclear norm of ``softmax(logits)``, divided by ``B``."""
        return bnm(logits)


def _check_afn_options(delta: object, radius: object) -> tuple[float | None, float | None]:
    if delta is not None and radius is not None:
        raise ValueError(
            "delta and radius: pass delta= for the stepwise AFN or radius= for the hard "
            "AFN, not both"
        )
    if radius is not None:
        return None, check_positive(radius, "radius")
    return check_positive(1.0 if delta is None else delta, "delta"), None


def adaptive_feature_norm(
    features: Tensor, *, delta: float | None = None, radius: float | None = None
) -> Tensor:
    r"""Adaptive feature norm (AFN, Xu et al. 2019): push feature norms up.

    Larger feature norms on the target domain make the classifier transfer better (the
    "smaller-norm" hypothesis of the paper). Two variants, with
    $h_i = \|f_i\|_2$:

    - stepwise AFN (SAFN, the default; ``delta`` = $\Delta r$, 1.0 in the paper):

      $$
      \mathcal{L} = \frac{1}{N} \sum_i \big(\mathrm{sg}(h_i) + \Delta r -
          h_i\big)^2
      $$

      with ``sg`` stop-gradient. Its value is always $\Delta r^2$; its gradient
      enlarges every norm by a step of $\Delta r$ per update.
    - hard AFN (HAFN; pass ``radius`` = ``R``, 25 in the paper):

      $$
      \mathcal{L} = \Big(\frac{1}{N} \sum_i h_i - R\Big)^2
      $$

      the squared distance of the batch's mean norm to ``R``, as in the paper's eq. 2
      and code. Call it once per domain and add the two terms.

    Add ``0.05 * adaptive_feature_norm(features)`` (the paper's weight for SAFN on
    Office-31; HAFN used 0.05 as well) for source and target features, on the
    bottleneck features before the last linear layer. The norm has a zero gradient at
    ``f_i = 0`` (no NaN), and norms are computed scaled by each row's largest entry, so
    fp32 features of magnitude 1e20 or 1e-20 give the float64 result; a hard-AFN value
    that does not fit in the dtype raises instead of returning ``inf``.

    Args:
        features: a feature batch (source and target concatenated, or one domain).
        delta: the step $\Delta r > 0$ of SAFN; default 1.0 when ``radius`` is not
            given.
        radius: the target norm ``R > 0`` of HAFN; selects the hard variant.

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - features: ``(N, D)``, ``N >= 1``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D, empty or non-finite features, non-positive ``delta`` /
            ``radius``, both given, or a hard-AFN penalty that overflows the dtype.
        TypeError: non-tensor or non-floating features, or non-numeric options.

    Examples:
        >>> f = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
        >>> float(adaptive_feature_norm(f, delta=0.5))  # always delta ** 2
        0.25
        >>> float(adaptive_feature_norm(f, radius=5.0))  # (mean(5, 1) - 5) ** 2
        4.0
    """
    check_features(features, "features")
    step, target_norm = _check_afn_options(delta, radius)
    with no_autocast(features.device):
        norms = _row_norms(as_compute(features))
        if target_norm is None:
            assert step is not None
            # (sg(h) + delta - h)^2 written as (delta - (h - sg(h)))^2: h - sg(h) is exactly
            # 0, so the value is delta^2 even where h + delta rounds to h (h ~ 1e20).
            return ((step - (norms - norms.detach())) ** 2).mean()
        penalty = (norms.mean() - target_norm) ** 2
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(penalty)):
            raise ValueError(
                f"features: the hard AFN penalty (mean norm - radius)^2 overflows "
                f"{penalty.dtype} (mean feature norm {float(norms.mean().detach()):.3g}, "
                f"radius {target_norm:g}); scale the features down or pass float64"
            )
        return penalty


def _row_norms(x: Tensor) -> Tensor:
    """Euclidean row norms, scaled so that squares of 1e20 or 1e-20 stay in fp32 range.

    Each row is divided by its largest entry (detached) before the norm and the norm is
    multiplied back; zero rows keep a zero gradient.
    """
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norms: Tensor = torch.linalg.vector_norm(x / scale, dim=1) * scale.squeeze(1)
    return norms


class AdaptiveFeatureNormLoss(nn.Module):
    """Adaptive feature norm as a module; see [`adaptive_feature_norm`][].

    Args:
        delta: the step of stepwise AFN (default 1.0 when ``radius`` is not given).
        radius: the target norm ``R`` of hard AFN; selects the hard variant.

    Shape:
        - features: ``(N, D)``.
        - Output: ``()``.

    Examples:
        >>> float(AdaptiveFeatureNormLoss()(torch.randn(4, 3)))  # SAFN, delta = 1
        1.0
        >>> AdaptiveFeatureNormLoss(radius=25.0)
        AdaptiveFeatureNormLoss(radius=25)
    """

    def __init__(self, *, delta: float | None = None, radius: float | None = None) -> None:
        super().__init__()
        self.delta, self.radius = _check_afn_options(delta, radius)

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        if self.radius is not None:
            return f"radius={self.radius:g}"
        return f"delta={self.delta:g}"

    def forward(self, features: Tensor) -> Tensor:
        """The AFN penalty of ``features``."""
        if self.radius is not None:
            return adaptive_feature_norm(features, radius=self.radius)
        return adaptive_feature_norm(features, delta=self.delta)


# --------------------------------------------------------------------------- fine-tuning


def bss(features: Tensor, k: int = 1) -> Tensor:
    """Batch spectral shrinkage (Chen et al. 2019): the ``k`` smallest squared singular values.

    Adding ``eta * bss(features)`` to the fine-tuning loss shrinks the feature directions
    with the smallest singular values, which carry the least transferable knowledge.

    Args:
        features: the batch feature matrix.
        k: how many of the smallest singular values to penalise, ``1 <= k <= min(N, D)``.

    Returns:
        A 0-d tensor: ``sum_{i=1..k} sigma_{-i}^2``.

    Shape:
        - features: ``(N, D)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite features, or ``k`` out of range.
        TypeError: non-floating features or non-integer ``k``.

    Examples:
        >>> float(bss(torch.diag(torch.tensor([3.0, 2.0, 1.0])), k=2))
        5.0
    """
    check_features(features, "features")
    count = int(check_positive(k, "k", integer=True))
    limit = min(features.shape)
    if count > limit:
        raise ValueError(f"k: expected at most min(N, D) = {limit}, got {count}")
    with no_autocast(features.device):
        singular: Tensor = torch.linalg.svdvals(as_compute(features))
        return (singular[-count:] ** 2).sum()


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns
    )


class L2SP(nn.Module):
    r"""L2-SP regulariser (Li et al. 2018): keep fine-tuned weights near the pretrained ones.

    $$
    \frac{\alpha}{2} \sum_{w \in S} \|w - w^0\|^2 + \frac{\beta}{2}
    \sum_{w \in \bar S} \|w\|^2
    $$

    At construction every trainable (``requires_grad``) parameter of ``model`` is
    anchored at its current value ``w^0`` unless its name matches ``exclude``; the
    excluded trainable parameters (typically the new head) get plain weight decay
    ``beta``. Frozen parameters are ignored. The anchors are registered buffers, so they
    move with ``.to()`` and save/load with ``state_dict()``; their names are the
    parameter names with ``.`` replaced by ``__``. The module keeps a reference to
    ``model`` (not as a submodule: its parameters are not this module's parameters).

    Args:
        model: the network being fine-tuned, with its pretrained weights loaded.
        alpha: strength of the pull towards the anchors.
        beta: weight decay of the excluded parameters.
        exclude: glob patterns on parameter names (``"fc*"``, ``"head.*"``); a pattern also
            matches everything under a module name (``"fc"`` matches ``fc.weight``).

    Shape:
        - Output: ``()`` from ``l2sp()`` (no inputs).

    Raises:
        ValueError: negative ``alpha``/``beta`` or an ``exclude`` pattern that matches no
            trainable parameter.
        TypeError: ``model`` is not a module or ``exclude`` holds non-strings.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> reg = L2SP(net, alpha=0.1, beta=0.0, exclude=["1.*"])
        >>> reg().item()
        0.0
        >>> with torch.no_grad():
        ...     _ = net[0].weight.add_(1.0)
        >>> float(reg())  # alpha / 2 * 4 entries * 1^2
        0.2
        >>> sorted(reg.state_dict())
        ['0__bias', '0__weight']
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.01,
        beta: float = 0.01,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.alpha = check_positive(alpha, "alpha", strict=False)
        self.beta = check_positive(beta, "beta", strict=False)
        if isinstance(exclude, str):
            exclude = [exclude]
        if exclude is not None and (
            not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude)
        ):
            raise TypeError(
                f"exclude: expected a glob pattern or a list of them (strings such as 'fc*'), "
                f"got {exclude!r}"
            )
        patterns = list(exclude or [])
        check_module_data(model, "model")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in trainable]
        for pattern in patterns:
            if not any(_matches(n, [pattern]) for n in names):
                raise ValueError(
                    f"exclude: pattern {pattern!r} matches no trainable parameter of "
                    f"{type(model).__name__}{did_you_mean(pattern, names)}"
                )
        self._model = [model]  # a list, so that nn.Module does not register it
        self.anchored: list[str] = []
        self.excluded: list[str] = []
        self._buffer_names: dict[str, str] = {}
        for name, param in trainable:
            if _matches(name, patterns):
                self.excluded.append(name)
                continue
            buffer = name.replace(".", "__")
            if buffer in self._buffer_names.values():
                raise ValueError(f"model: parameter names collide as buffer name {buffer!r}")
            self.register_buffer(buffer, param.detach().clone())
            self._buffer_names[name] = buffer
            self.anchored.append(name)
        logger.debug("L2SP anchors %d tensors, excludes %d", len(self.anchored), len(self.excluded))

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return (
            f"alpha={self.alpha}, beta={self.beta}, anchored={len(self.anchored)}, "
            f"excluded={len(self.excluded)}"
        )

    def forward(self) -> Tensor:
        """The penalty for the model's current parameters (a 0-d fp32/fp64 tensor)."""
        params = dict(self._model[0].named_parameters())
        missing = [n for n in self.anchored + self.excluded if n not in params]
        if missing:
            raise ValueError(f"model: parameters {missing[:3]} disappeared since construction")
        terms: list[Tensor] = []
        for name in self.anchored:
            param = params[name]
            anchor: Tensor = getattr(self, self._buffer_names[name])
            if anchor.device != param.device:
                raise ValueError(
                    f"L2SP: parameter {name!r} is on {param.device} but its anchor is on "
                    f"{anchor.device}; move the loss module too (l2sp.to(device))"
                )
            diff = as_compute(param) - anchor.to(compute_dtype(param))
            terms.append(0.5 * self.alpha * (diff * diff).sum())
        for name in self.excluded:
            weight = as_compute(params[name])
            terms.append(0.5 * self.beta * (weight * weight).sum())
        if not terms:
            return torch.zeros(())
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()
