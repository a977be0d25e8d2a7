"""``CORAL`` and ``SubspaceAlignment`` (transferkit/sklearn/_align.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.utils.estimator_checks import parametrize_with_checks

from tests.sklearn._reference import two_domains
from transferkit.sklearn import CORAL, TCA, SubspaceAlignment

# The aligners need rows of both domains; the generic checks label rows 0, 1, ...,
# so rows labelled 0 play the target domain.
ONE_DOMAIN = "the check's labels hold no target row (label 0 here), which the aligners reject"


ALIGNER_XFAIL = {
    "check_estimators_dtypes": ONE_DOMAIN,
    "check_fit2d_1feature": ONE_DOMAIN,
}
# fit_transform maps source rows to the target domain, transform (prediction time) takes
# every row as target data, so the two differ by design once both domains are present.
SOURCE_MAP = "fit_transform maps the source rows, transform treats rows as target rows"


TRANSFORM_XFAIL = {
    "check_transformer_general": SOURCE_MAP,
    "check_transformer_general(readonly_memmap=True)": SOURCE_MAP,
    "check_transformer_data_not_an_array": SOURCE_MAP,
}


@parametrize_with_checks(
    [CORAL(unlabelled=0), SubspaceAlignment(n_components=1, unlabelled=0)],
    expected_failed_checks=lambda estimator: {**ALIGNER_XFAIL, **TRANSFORM_XFAIL},
)
def test_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_coral_gives_source_rows_the_target_mean_and_covariance():
    x, y, source, target = two_domains()
    out = CORAL(reg=0.0).fit_transform(x, y)
    aligned = out[: len(source)]
    np.testing.assert_allclose(aligned.mean(0), target.mean(0), atol=1e-9)
    np.testing.assert_allclose(np.cov(aligned.T), np.cov(target.T), rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(out[len(source) :], target)


def test_coral_transform_is_the_identity_on_target_data():
    x, y, _, target = two_domains()
    coral = CORAL().fit(x, y)
    np.testing.assert_array_equal(coral.transform(target), target)


def test_subspace_alignment_matches_pca_reference():
    x, y, source, target = two_domains(dim=6)
    out = SubspaceAlignment(n_components=3).fit_transform(x, y)
    ps = PCA(3).fit(source).components_.T
    pt = PCA(3).fit(target).components_.T
    # Sign-invariant comparison: multiply back by the (sign-ambiguous) target basis.
    expected_source = (source - source.mean(0)) @ ps @ ps.T @ pt @ pt.T
    expected_target = (target - target.mean(0)) @ pt @ pt.T
    sa = SubspaceAlignment(n_components=3).fit(x, y)
    basis = sa.target_components_
    np.testing.assert_allclose(out[: len(source)] @ basis.T, expected_source, atol=1e-8)
    np.testing.assert_allclose(out[len(source) :] @ basis.T, expected_target, atol=1e-8)
    np.testing.assert_allclose(sa.transform(target), out[len(source) :], atol=1e-10)


def test_aligners_reject_too_many_components_and_too_few_rows():
    x, y, _, _ = two_domains(dim=3)
    with pytest.raises(ValueError, match="n_components"):
        SubspaceAlignment(n_components=4).fit(x, y)
    with pytest.raises(ValueError, match="n_components"):
        TCA(n_components=1000).fit(x, y)
    with pytest.raises(ValueError, match="2 target rows"):
        CORAL().fit(x[:151], np.r_[y[:150], -1])
