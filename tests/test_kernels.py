from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import transferkit as tk
from transferkit.kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
    pairwise_squared_distances,
)

MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _pooled_mean_sqdist(x: np.ndarray, y: np.ndarray) -> float:
    z = np.concatenate([x, y])
    d = cdist(z, z, "sqeuclidean")
    return float(d[~np.eye(len(z), dtype=bool)].mean())


def reference_kernel(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Float64 NumPy/SciPy kernels written from their formulas."""
    d2 = cdist(x, y, "sqeuclidean")
    if name == "gaussian-fixed":
        return sum(np.exp(-d2 / (2 * m * 1.5**2)) for m in MULTIPLIERS)
    if name == "gaussian-uneven":
        return sum(np.exp(-d2 / (2 * m * 1.5**2)) for m in (0.3, 1.0, 3.0))
    if name == "gaussian-heuristic":
        sigma2 = _pooled_mean_sqdist(x, y)
        return sum(np.exp(-d2 / (2 * m * sigma2)) for m in MULTIPLIERS)
    if name == "laplacian":
        return np.exp(-np.sqrt(d2) / 2.0)
    if name == "laplacian-heuristic":
        return np.exp(-np.sqrt(d2) / np.sqrt(_pooled_mean_sqdist(x, y)))
    if name == "linear":
        return x @ y.T
    if name == "polynomial":
        return (x @ y.T / x.shape[1] + 1.0) ** 3
    raise AssertionError(name)


KERNELS: dict[str, Kernel] = {
    "gaussian-fixed": GaussianKernel(bandwidth=1.5),
    "gaussian-heuristic": GaussianKernel(),
    "gaussian-uneven": GaussianKernel(bandwidth=1.5, multipliers=(0.3, 1.0, 3.0)),
    "laplacian": LaplacianKernel(bandwidth=2.0),
    "laplacian-heuristic": LaplacianKernel(),
    "linear": LinearKernel(),
    "polynomial": PolynomialKernel(degree=3),
}
FIXED = ["gaussian-fixed", "gaussian-uneven", "laplacian", "linear", "polynomial"]


def test_pairwise_squared_distances_match_scipy_far_from_origin() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 7)) + 1e3
    y = rng.normal(size=(13, 7)) + 1e3
    got = pairwise_squared_distances(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, cdist(x, y, "sqeuclidean"), rtol=1e-6, atol=1e-8)


def test_pairwise_squared_distances_of_one_set_are_symmetric_nonnegative_zero_diagonal() -> None:
    x = torch.randn(50, 8) * 100 + 5
    d = pairwise_squared_distances(x)
    assert torch.equal(d.diagonal(), torch.zeros(50))
    assert bool((d >= 0).all())
    torch.testing.assert_close(d, d.T, rtol=1e-5, atol=1e-2)


def test_pairwise_squared_distances_compute_in_fp32_under_bf16_autocast() -> None:
    x, y = torch.randn(16, 4), torch.randn(9, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_squared_distances(x, y)
        d_half = pairwise_squared_distances(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32 and d_half.dtype == torch.float32
    torch.testing.assert_close(d, torch.cdist(x, y) ** 2, rtol=1e-4, atol=1e-4)


def test_pairwise_squared_distances_gradcheck_float64() -> None:
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pairwise_squared_distances, (x, y))


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_matches_numpy_reference(name: str) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(17, 5)), rng.normal(size=(11, 5)) + 0.3
    got = KERNELS[name](torch.from_numpy(x), torch.from_numpy(y))
    assert got.shape == (17, 11) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference_kernel(name, x, y), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_of_one_set_is_symmetric(name: str) -> None:
    x = torch.randn(12, 4, dtype=torch.float64)
    k = KERNELS[name](x, x)
    torch.testing.assert_close(k, k.T)


@pytest.mark.parametrize("name", FIXED)
def test_every_fixed_kernel_passes_gradcheck(name: str) -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(KERNELS[name], (x, y))


@pytest.mark.parametrize("name", list(KERNELS))
def test_value_and_derivative_agree_with_autograd(name: str) -> None:
    kernel = KERNELS[name]
    x = torch.randn(9, 3, dtype=torch.float64)
    state = kernel.prepare(x)
    base = kernel.base(x, x, state).detach().clamp_min(1e-3).requires_grad_()
    values = kernel.from_base(base, state)
    (grad,) = torch.autograd.grad(values.sum(), base)
    fast_value, fast_derivative = kernel.value_and_derivative(base.detach().clone(), state)
    torch.testing.assert_close(fast_value, values.detach())
    torch.testing.assert_close(fast_derivative, grad)


def test_gaussian_heuristic_is_the_detached_pooled_mean_squared_distance() -> None:
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 3, dtype=torch.float64)
    sigma = _pooled_mean_sqdist(x.detach().numpy(), y.numpy()) ** 0.5
    heuristic, fixed = GaussianKernel()(x, y), GaussianKernel(bandwidth=sigma)(x, y)
    torch.testing.assert_close(heuristic, fixed)
    (g1,) = torch.autograd.grad(heuristic.sum(), x)
    (g2,) = torch.autograd.grad(fixed.sum(), x)
    torch.testing.assert_close(g1, g2)  # no gradient through the bandwidth


def test_gaussian_multipliers_scale_sigma_squared() -> None:
    x, y = torch.zeros(1, 1), torch.ones(1, 1)
    k = GaussianKernel(bandwidth=1.0, multipliers=(4.0,))(x, y)
    torch.testing.assert_close(k, torch.tensor([[float(np.exp(-1 / 8))]]))


def test_laplacian_gradient_is_finite_at_zero_distance() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    LaplacianKernel(bandwidth=1.0)(x, x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_kernels_are_exported_through_tk() -> None:
    assert tk.kernels.GaussianKernel is GaussianKernel


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: GaussianKernel(bandwidth=0.0), ValueError),
        (lambda: GaussianKernel(bandwidth=-1.0), ValueError),
        (lambda: GaussianKernel(multipliers=()), ValueError),
        (lambda: GaussianKernel(multipliers=(1.0, -2.0)), ValueError),
        (lambda: GaussianKernel(bandwidth="1"), TypeError),
        (lambda: LaplacianKernel(bandwidth=0), ValueError),
        (lambda: PolynomialKernel(degree=0), ValueError),
        (lambda: PolynomialKernel(degree=2.5), TypeError),
        (lambda: PolynomialKernel(gamma=-1.0), ValueError),
        (lambda: PolynomialKernel(coef0=float("nan")), ValueError),
    ],
)
def test_invalid_kernel_arguments_raise(make: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_inputs_are_validated(name: str) -> None:
    kernel = KERNELS[name]
    with pytest.raises(ValueError, match="same feature shape"):
        kernel(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        kernel(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="finite"):
        kernel(torch.tensor([[float("nan")]]), torch.ones(1, 1))
    with pytest.raises(TypeError, match="dtype"):
        kernel(torch.randn(3, 2), torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        kernel(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))


# ----------------------------------------------------------------- extreme magnitudes

FP32_MAX = float(torch.finfo(torch.float32).max)
MAGNITUDES = {
    "1e20": (1e20, 1e20),
    "1e30": (1e30, 1e30),
    "1e-20": (1e-20, 1e-20),
    "1e-30": (1e-30, 1e-30),
    "mixed": (1.0, 1e20),  # x of order one, y of order 1e20
}


def _extreme_points(magnitude: str, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """fp32-representable points (as float64) at the given magnitudes."""
    rng = np.random.default_rng(seed)
    sx, sy = MAGNITUDES[magnitude]
    x = (rng.normal(size=(9, 4)) * sx).astype(np.float32).astype(np.float64)
    y = ((rng.normal(size=(7, 4)) + 0.5) * sy).astype(np.float32).astype(np.float64)
    return x, y


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp16-autocast"])
@pytest.mark.parametrize("magnitude", list(MAGNITUDES))
@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_at_extreme_magnitudes_matches_float64_or_raises_clearly(
    name: str, magnitude: str, precision: str
) -> None:
    # Finite inputs of magnitude 1e20 used to give NaN (inf - inf in the GEMM form) and
    # 1e-20 lost all precision in subnormal squares. Now the result matches the float64
    # formula, and a ValueError comes only when the true values do not fit in fp32.
    x, y = _extreme_points(magnitude)
    expected = reference_kernel(name, x, y)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    context = torch.autocast(
        "cpu",
        dtype=torch.float16 if precision == "fp16-autocast" else torch.bfloat16,
        enabled=precision != "fp32",
    )
    fits = np.abs(expected).max() * 16 < FP32_MAX
    with context:
        if not fits:
            with pytest.raises(ValueError, match=r"x and y: expected features whose .* fit"):
                KERNELS[name](tx, ty)
            return
        got = KERNELS[name](tx, ty)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    scale = np.abs(expected).max()
    np.testing.assert_allclose(
        got.double().numpy(), expected, rtol=2e-5, atol=max(2e-5 * scale, 1e-44)
    )


@pytest.mark.parametrize("magnitude", ["1e20", "1e30", "1e-20", "1e-30"])
def test_heuristic_kernels_are_scale_free_at_any_finite_magnitude(magnitude: str) -> None:
    x, y = _extreme_points(magnitude)
    scale = MAGNITUDES[magnitude][0]
    unit_x, unit_y = torch.from_numpy(x / scale).float(), torch.from_numpy(y / scale).float()
    for kernel in (GaussianKernel(), LaplacianKernel()):
        big = kernel(torch.from_numpy(x).float(), torch.from_numpy(y).float())
        torch.testing.assert_close(big, kernel(unit_x, unit_y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian-heuristic", "laplacian-heuristic", "gaussian-fixed"])
def test_kernel_gradients_at_magnitude_1e20_are_finite_and_rescaled(name: str) -> None:
    x, y = _extreme_points("1e20")
    tx = torch.from_numpy(x).float().requires_grad_(True)
    KERNELS[name](tx, torch.from_numpy(y).float()).sum().backward()
    assert tx.grad is not None and bool(torch.isfinite(tx.grad).all())
    if name != "gaussian-fixed":  # scale-free kernels: d k(c x) / d(c x) = (1 / c) d k(x) / dx
        ux = torch.from_numpy(x / 1e20).float().requires_grad_(True)
        KERNELS[name](ux, torch.from_numpy(y / 1e20).float()).sum().backward()
        torch.testing.assert_close(tx.grad * 1e20, ux.grad, rtol=1e-4, atol=1e-6)


def test_pairwise_squared_distances_at_1e18_match_float64_and_raise_beyond_fp32() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 3)) * 1e18).astype(np.float32).astype(np.float64)
    y = (rng.normal(size=(5, 3)) * 1e18).astype(np.float32).astype(np.float64)
    got = pairwise_squared_distances(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    np.testing.assert_allclose(got.double().numpy(), cdist(x, y, "sqeuclidean"), rtol=1e-5)
    same = pairwise_squared_distances(torch.from_numpy(x).float())
    assert torch.equal(same.diagonal(), torch.zeros(6))
    with pytest.raises(ValueError, match="x and y: expected features whose squared distances"):
        pairwise_squared_distances(torch.from_numpy(x * 100).float())


def test_ordinary_magnitudes_take_exactly_the_unscaled_path() -> None:
    # The rescaling is confined to extreme inputs: ordinary ones are bit-identical to the
    # formula without it.
    from transferkit.kernels import rescale_factor

    assert rescale_factor(1e6, 512, torch.float32) == 1.0
    assert rescale_factor(1e-12, 512, torch.float32) == 1.0
    assert rescale_factor(1e20, 4, torch.float64) == 1.0
    for largest in (1e20, 1e30, 1e-20, 1e-30):
        scale = rescale_factor(largest, 4, torch.float32)
        assert math.frexp(scale)[0] == 0.5  # a power of two: the division is exact
        assert rescale_factor(largest / scale, 4, torch.float32) == 1.0
