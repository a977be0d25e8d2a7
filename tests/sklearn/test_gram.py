"""The Gram matrices of the estimators (transferkit/sklearn/_gram.py), through the SVM.

libsvm solves the dual problem on the Gram matrix it is given, so a fit equal to
``SVC(kernel="precomputed")`` on an independent NumPy Gram matrix means equal training
Gram matrices; decision values equal to ``K(X, support vectors) @ dual_coef_ +
intercept_`` with a NumPy ``K`` mean equal cross-kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.svm import SVC

from tests.sklearn._reference import numpy_kernel
from transferkit import kernels
from transferkit.sklearn import TorchKernelSVC

KERNEL_CASES = ["rbf", "linear", "poly", "laplacian", "multi_rbf"]
MULTIPLIERS = (0.5, 1.0, 2.0)


def binary_rows(n: int, m: int, dim: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    x, x_test = rng.normal(size=(n, dim)) + shift, rng.normal(size=(m, dim)) + shift
    y = np.arange(n) % 2  # both classes present for any n >= 2
    return x, y, x_test


def svm(name: str, gamma: float, **params) -> TorchKernelSVC:
    return TorchKernelSVC(
        kernel=name,
        gamma=gamma,
        degree=3,
        coef0=0.5,
        multipliers=MULTIPLIERS,
        device="cpu",
        **params,
    )


def reference_decision(model, name, x_test, gamma):
    """Binary decision values from a NumPy cross-kernel with the fitted support vectors."""
    cross = numpy_kernel(name, x_test, model.support_vectors_, gamma, multipliers=MULTIPLIERS)
    return cross @ model.dual_coef_[0] + model.intercept_[0], cross


@pytest.mark.parametrize("name", KERNEL_CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_svc_gram_matches_numpy_reference_for_every_kernel(name, dtype):
    x, y, x_test = binary_rows(37, 23, 6, seed=0, shift=3.0)
    x[:, 2] = x_test[:, 2] = 1.5  # a constant column (dropped for distances, kept for products)
    x[:, 4] = x_test[:, 4] = 0.0  # an all-zero column (dropped for every kernel)
    gamma = 0.2
    for chunk in (1, 8, 100):
        ours = svm(name, gamma, dtype=dtype, chunk_size=chunk).fit(x, y)
        expected, cross = reference_decision(ours, name, x_test, gamma)
        tolerance = 1e-10 if dtype == "float64" else 2e-5
        scale = np.abs(ours.dual_coef_).sum() * np.abs(cross).max() + 1.0
        np.testing.assert_allclose(
            ours.decision_function(x_test), expected, rtol=0, atol=tolerance * scale
        )
        if dtype == "float64":  # the training Gram matrix: libsvm's solution on NumPy's
            gram = numpy_kernel(name, x, x, gamma, multipliers=MULTIPLIERS)
            theirs = SVC(kernel="precomputed").fit(gram, y)
            np.testing.assert_array_equal(ours.support_, theirs.support_)
            np.testing.assert_allclose(ours.dual_coef_, theirs.dual_coef_, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("rbf", lambda g: kernels.GaussianKernel(math.sqrt(0.5 / g), multipliers=(1.0,))),
        ("multi_rbf", lambda g: kernels.GaussianKernel(math.sqrt(0.5 / g), MULTIPLIERS)),
        ("laplacian", lambda g: kernels.LaplacianKernel(bandwidth=1.0 / g)),
        ("poly", lambda g: kernels.PolynomialKernel(degree=3, gamma=g, coef0=0.5)),
        ("linear", lambda g: kernels.LinearKernel()),
    ],
)
def test_named_kernels_are_the_transferkit_kernels(name, reference):
    # Kernel objects are called block by block as they are; names take the blocked path.
    x, y, x_test = binary_rows(30, 20, 4, seed=1)
    named = svm(name, 0.3, chunk_size=7).fit(x, y)
    custom = TorchKernelSVC(kernel=reference(0.3), device="cpu", chunk_size=7).fit(x, y)
    np.testing.assert_array_equal(named.support_, custom.support_)
    np.testing.assert_allclose(named.dual_coef_, custom.dual_coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        named.decision_function(x_test), custom.decision_function(x_test), rtol=0, atol=1e-9
    )


@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(2, 40),
    m=st.integers(1, 30),
    chunk=st.integers(1, 50),
    name=st.sampled_from(KERNEL_CASES),
)
def test_svm_does_not_depend_on_chunk_size(n, m, chunk, name):
    x, y, x_test = binary_rows(n, m, 3, seed=n * 100 + m)
    whole = svm(name, 0.5, chunk_size=10_000).fit(x, y)
    pieces = svm(name, 0.5, chunk_size=chunk).fit(x, y)
    np.testing.assert_array_equal(pieces.support_, whole.support_)
    np.testing.assert_allclose(pieces.dual_coef_, whole.dual_coef_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        pieces.decision_function(x_test), whole.decision_function(x_test), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("chunk", [1, 100, 300, 1000])
def test_training_gram_in_strips_and_bands_gives_svc_on_digits(digits, chunk):
    # 1000 rows: several strips and mirror bands, and a strip taller than the band.
    x_train, y_train, x_test, _ = digits
    ours = TorchKernelSVC(device="cpu", chunk_size=chunk).fit(x_train, y_train)
    theirs = SVC().fit(x_train, y_train)
    np.testing.assert_array_equal(ours.support_, theirs.support_)
    np.testing.assert_allclose(ours.dual_coef_, theirs.dual_coef_, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ours.predict(x_test), theirs.predict(x_test))


def test_gram_does_not_modify_its_inputs():
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(20, 4)), rng.normal(size=(9, 4))
    x[:, 1] = 2.0
    y = np.arange(20) % 2
    x_copy, test_copy = x.copy(), x_test.copy()
    for name in KERNEL_CASES:
        svm(name, 0.5, chunk_size=3).fit(x, y).decision_function(x_test)
        svm(name, 0.5, chunk_size=3, dtype="float32").fit(x, y).decision_function(x_test)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(x_test, test_copy)


def test_user_kernel_blocks_of_the_wrong_shape_are_refused():
    x, y, _ = binary_rows(10, 1, 2, seed=0)
    with pytest.raises(ValueError, match=r"kernel: expected a \(4, 10\) matrix"):
        TorchKernelSVC(kernel=lambda a, b: a @ a.T, device="cpu", chunk_size=4).fit(x, y)
    with torch.no_grad():
        model = TorchKernelSVC(kernel=lambda a, b: a @ b.T, device="cpu").fit(x, y)
    linear = svm("linear", 1.0).fit(x, y)
    np.testing.assert_allclose(model.dual_coef_, linear.dual_coef_, rtol=0, atol=1e-9)


def test_user_kernel_values_are_still_checked_for_nan_and_inf():
    # Named kernels skip scikit-learn's finiteness pass over the n^2 Gram values (they are
    # bounded, or transferkit.kernels.gram raises on overflow); user callables do not.
    x, y, _ = binary_rows(10, 1, 2, seed=0)

    def broken(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.full((a.shape[0], b.shape[0]), float("inf"), dtype=a.dtype)

    with pytest.raises(ValueError, match="infinity"):
        TorchKernelSVC(kernel=broken, device="cpu").fit(x, y)
