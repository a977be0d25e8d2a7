"""``TCA`` (transferkit/sklearn/_tca.py): the transfer components of Pan et al. (2011)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from tests.sklearn._reference import LIBRARY_MULTIPLIERS, numpy_kernel, two_domains
from transferkit import kernels
from transferkit.sklearn import TCA, TorchKernelSVC

# The generic checks label rows 0, 1, ...: rows labelled 0 play the target domain, and
# these checks draw labels in which no row carries it (the aligners reject that).
ONE_DOMAIN = "the check's labels hold no target row (label 0 here), which the aligners reject"


@parametrize_with_checks(
    [TCA(n_components=2, unlabelled=0)],
    expected_failed_checks=lambda estimator: {
        "check_estimators_dtypes": ONE_DOMAIN,
        "check_fit2d_1feature": ONE_DOMAIN,
    },
)
def test_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def tca_reference(kernel, source_count, k, mu):
    """Pan et al. (2011), written literally: eig of (K L K + mu I)^-1 K H K."""
    n = len(kernel)
    e = np.r_[
        np.full(source_count, 1 / source_count), np.full(n - source_count, -1 / (n - source_count))
    ]
    mmd = np.outer(e, e)
    centre = np.eye(n) - np.ones((n, n)) / n
    matrix = np.linalg.solve(kernel @ mmd @ kernel + mu * np.eye(n), kernel @ centre @ kernel)
    values, vectors = np.linalg.eig(matrix)
    order = np.argsort(-values.real)[:k]
    return kernel @ vectors[:, order].real


def assert_same_span(ours, reference, tol=1e-6):
    """The columns span the same space (cosines of the principal angles are one)."""
    q1, _ = np.linalg.qr(ours)
    q2, _ = np.linalg.qr(reference)
    cosines = np.linalg.svd(q1.T @ q2, compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=tol)


def test_tca_spans_the_reference_transfer_components():
    x, y, source, _ = two_domains(n_source=40, n_target=30, dim=3)
    tca = TCA(n_components=2, mu=0.5, gamma=0.1).fit(x, y)
    ours = tca.transform(x)
    reference = tca_reference(numpy_kernel("rbf", x, x, 0.1), len(source), 2, 0.5)
    for j in range(2):
        cosine = abs(ours[:, j] @ reference[:, j]) / (
            np.linalg.norm(ours[:, j]) * np.linalg.norm(reference[:, j])
        )
        assert cosine == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(tca.fit_transform(x, y), ours, atol=1e-9)


@pytest.mark.parametrize("name", ["rbf", "multi_rbf", "laplacian", "poly", "linear"])
def test_tca_kernels_are_the_library_kernels(name):
    # One bandwidth definition: TCA's "multi_rbf" has the multipliers of the SVM and of
    # transferkit.kernels.GaussianKernel (it used to be fixed at (0.5, 1, 2)).
    x, y, source, _ = two_domains(n_source=40, n_target=30, dim=3)
    tca = TCA(n_components=2, kernel=name, mu=0.5, gamma=0.1).fit(x, y)
    gram = numpy_kernel(name, x, x, 0.1, multipliers=LIBRARY_MULTIPLIERS, coef0=1.0)
    assert_same_span(tca.transform(x), tca_reference(gram, len(source), 2, 0.5))


def test_tca_multi_rbf_is_gaussian_kernel_and_the_svm_kernel():
    x, y, _, _ = two_domains(n_source=30, n_target=30, dim=3)
    gamma = 0.2
    library = kernels.GaussianKernel(bandwidth=math.sqrt(0.5 / gamma))  # default multipliers
    rows = torch.from_numpy(x)
    expected = library(rows, rows).numpy()
    np.testing.assert_allclose(
        numpy_kernel("multi_rbf", x, x, gamma, multipliers=LIBRARY_MULTIPLIERS), expected
    )
    tca = TCA(n_components=3, kernel="multi_rbf", gamma=gamma).fit(x, y)
    svm = TorchKernelSVC(kernel="multi_rbf", gamma=gamma, device="cpu").fit(x, np.abs(y))
    assert tca.multipliers == svm.multipliers == library.multipliers
    source = y != -1
    reference = tca_reference(expected, int(source.sum()), 3, 1.0)
    assert_same_span(tca.transform(x), reference)


def test_tca_multipliers_give_the_former_kernel_back():
    x, y, source, _ = two_domains(n_source=40, n_target=30, dim=3)
    former = TCA(n_components=2, kernel="multi_rbf", gamma=0.1, multipliers=(0.5, 1.0, 2.0))
    gram = numpy_kernel("multi_rbf", x, x, 0.1, multipliers=(0.5, 1.0, 2.0))
    ours = former.fit(x, y).transform(x)
    assert_same_span(ours, tca_reference(gram, len(source), 2, 1.0))
    with pytest.raises(ValueError, match="multipliers"):
        TCA(kernel="multi_rbf", multipliers=()).fit(x, y)


def test_tca_with_small_mu_brings_the_domain_means_closer():
    x, y, _, _ = two_domains(n_source=60, n_target=60)

    def mean_gap(mu):
        out = TCA(n_components=3, mu=mu).fit_transform(x, y)
        gap = out[y != -1].mean(0) - out[y == -1].mean(0)
        return np.linalg.norm(gap) / np.linalg.norm(out.std(0))

    assert mean_gap(1e-3) < 0.5 * mean_gap(1e3)
