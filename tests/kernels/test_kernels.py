"""Tests of transferkit/kernels/_kernels.py: the kernel classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transferkit as tk
from transferkit.kernels import GaussianKernel, LaplacianKernel, PolynomialKernel

from .references import (
    FIXED,
    FP32_MAX,
    KERNELS,
    MAGNITUDES,
    extreme_points,
    pooled_mean_sqdist,
    reference_kernel,
)


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
    sigma = pooled_mean_sqdist(x.detach().numpy(), y.numpy()) ** 0.5
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


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp16-autocast"])
@pytest.mark.parametrize("magnitude", list(MAGNITUDES))
@pytest.mark.parametrize("name", list(KERNELS))
def test_every_kernel_at_extreme_magnitudes_matches_float64_or_raises_clearly(
    name: str, magnitude: str, precision: str
) -> None:
    # Finite inputs of magnitude 1e20 used to give NaN (inf - inf in the GEMM form) and
    # 1e-20 lost all precision in subnormal squares. Now the result matches the float64
    # formula, and a ValueError comes only when the true values do not fit in fp32.
    x, y = extreme_points(magnitude)
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
    x, y = extreme_points(magnitude)
    scale = MAGNITUDES[magnitude][0]
    unit_x, unit_y = torch.from_numpy(x / scale).float(), torch.from_numpy(y / scale).float()
    for kernel in (GaussianKernel(), LaplacianKernel()):
        big = kernel(torch.from_numpy(x).float(), torch.from_numpy(y).float())
        torch.testing.assert_close(big, kernel(unit_x, unit_y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian-heuristic", "laplacian-heuristic", "gaussian-fixed"])
def test_kernel_gradients_at_magnitude_1e20_are_finite_and_rescaled(name: str) -> None:
    x, y = extreme_points("1e20")
    tx = torch.from_numpy(x).float().requires_grad_(True)
    KERNELS[name](tx, torch.from_numpy(y).float()).sum().backward()
    assert tx.grad is not None and bool(torch.isfinite(tx.grad).all())
    if name != "gaussian-fixed":  # scale-free kernels: d k(c x) / d(c x) = (1 / c) d k(x) / dx
        ux = torch.from_numpy(x / 1e20).float().requires_grad_(True)
        KERNELS[name](ux, torch.from_numpy(y / 1e20).float()).sum().backward()
        torch.testing.assert_close(tx.grad * 1e20, ux.grad, rtol=1e-4, atol=1e-6)


def test_public_objects_report_the_package_and_pickle_through_it() -> None:
    import pickle

    for name in tk.kernels.__all__:
        assert getattr(tk.kernels, name).__module__ == "transferkit.kernels", name
    kernel = GaussianKernel(bandwidth=2.0, multipliers=(1.0, 2.0))
    data = pickle.dumps(kernel)
    assert b"transferkit.kernels._" not in data
    x = torch.randn(4, 3)
    torch.testing.assert_close(pickle.loads(data)(x, x), kernel(x, x))


@pytest.mark.parametrize(
    "kernel",
    [GaussianKernel(bandwidth=1e-25), LaplacianKernel(bandwidth=1e-46)],
    ids=["gaussian-1e-25", "laplacian-1e-46"],
)
def test_a_fixed_bandwidth_below_the_fp32_range_gives_the_float64_values(
    kernel: GaussianKernel | LaplacianKernel,
) -> None:
    # sigma^2 (Gaussian) or sigma (Laplacian) used to become 0 in fp32, so the zero
    # distance on the diagonal gave 0 * -inf = NaN, and mmd returned NaN without error.
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = x[:4] + 1.0
    got, exact = kernel(x, x), kernel(x.double(), x.double())
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), exact)
    for estimator in ("biased", "unbiased"):
        value = tk.losses.mmd(x, y, kernel, estimator)
        assert float(value) == pytest.approx(
            float(tk.losses.mmd(x.double(), y.double(), kernel, estimator)), abs=1e-6
        )


def test_gaussian_multipliers_reassigned_after_construction_are_the_ones_used() -> None:
    # The tiled MMD engine used to decide at construction whether one exp serves every
    # bandwidth (multipliers halving each other): after `kernel.multipliers = (1, 3)` it
    # kept that shortcut with the new largest multiplier and returned a wrong MMD
    # (0.3225 instead of 0.3161), while kernel(x, y) used the new multipliers.
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(15, 4, generator=gen, dtype=torch.float64) + 0.5
    kernel = GaussianKernel(bandwidth=1.0)  # the default multipliers halve each other
    kernel.multipliers = (1.0, 3.0)
    fresh = GaussianKernel(bandwidth=1.0, multipliers=(1.0, 3.0))
    for estimator in ("biased", "unbiased"):
        torch.testing.assert_close(
            tk.losses.mmd(s, t, kernel, estimator), tk.losses.mmd(s, t, fresh, estimator)
        )
    torch.testing.assert_close(kernel(s, t), fresh(s, t))
