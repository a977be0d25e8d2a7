from __future__ import annotations

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
