"""Conventions every estimator shares (transferkit/sklearn/_inputs.py): tensors as arrays,
unlabelled rows (skipped by classifiers, the target domain of aligners), inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from tests.sklearn._reference import two_domains
from transferkit.sklearn import CORAL, TCA, PrototypeClassifier, SubspaceAlignment, TorchKernelSVC


@pytest.mark.parametrize(
    "aligner",
    [CORAL(), TCA(n_components=2), SubspaceAlignment(n_components=2)],
    ids=lambda e: type(e).__name__,
)
def test_aligners_refuse_to_fit_without_both_domains(aligner):
    # Fitted on one domain only, CORAL would be the identity and TCA/SubspaceAlignment
    # plain (kernel) PCA: a silent no-op alignment instead of an error.
    x, y, _, _ = two_domains()
    with pytest.raises(ValueError, match=r"y: .* at least \d target rows"):
        aligner.fit(x, np.abs(y))
    with pytest.raises(ValueError, match=r"y: .* at least \d source rows"):
        aligner.fit(x, -np.ones_like(y))
    with pytest.raises(ValueError, match="y: .*requires y"):
        aligner.fit(x)


@pytest.mark.parametrize(
    "estimator",
    [
        TorchKernelSVC(device="cpu"),
        PrototypeClassifier(),
        CORAL(),
        TCA(n_components=2),
        SubspaceAlignment(n_components=2),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("kind", ["requires_grad", "bfloat16", "float16"])
def test_estimators_take_grad_and_half_precision_tensors(estimator, kind):
    x, y, _, _ = two_domains()
    rows = torch.from_numpy(x).float()
    given = {
        "requires_grad": rows.clone().requires_grad_(True),
        "bfloat16": rows.bfloat16(),
        "float16": rows.half(),
    }[kind]
    expected_rows = given.detach().float().numpy().astype(np.float64)
    labels = torch.from_numpy(y)
    fitted = estimator.fit(given, labels)
    reference = clone(estimator).fit(expected_rows, y)
    method = "predict" if hasattr(estimator, "predict") else "transform"
    np.testing.assert_allclose(
        getattr(fitted, method)(given), getattr(reference, method)(expected_rows), atol=1e-9
    )


def test_input_data_is_not_modified(digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:100].copy(), y_train[:100].copy()
    for estimator in (TorchKernelSVC(), PrototypeClassifier()):
        estimator.fit(x, y).predict(x)
    for transformer in (CORAL(), TCA(n_components=3), SubspaceAlignment(n_components=3)):
        transformer.fit_transform(x, np.r_[y[:50], -np.ones(50, dtype=int)])
    np.testing.assert_array_equal(x, x_train[:100])
    np.testing.assert_array_equal(y, y_train[:100])


@pytest.mark.parametrize("make", ["svc", "prototype", "coral"])
def test_a_label_list_mixing_class_names_and_the_marker_skips_the_marked_rows(make):
    # ["cat", -1, "dog"] becomes a NumPy string array, where -1 is the text "-1": the
    # classifiers learnt a class "-1" (and predicted it), the aligners found no target row.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y: list[object] = ["cat" if v > 0 else "dog" for v in x[:, 0]]
    for i in range(0, 40, 4):
        y[i] = -1
    marked = np.array([label == -1 for label in y])
    as_object = np.array(y, dtype=object)  # the unambiguous form: the reference
    if make == "coral":
        ours = CORAL().fit_transform(x, y)
        np.testing.assert_array_equal(ours, CORAL().fit_transform(x, as_object))
        np.testing.assert_array_equal(ours[marked], x[marked])  # target rows: unchanged
        return
    build = {
        "svc": lambda: TorchKernelSVC(device="cpu", unlabelled=-1),
        "prototype": lambda: PrototypeClassifier(unlabelled=-1),
    }[make]
    model = build().fit(x, y)
    assert list(model.classes_) == ["cat", "dog"]
    np.testing.assert_array_equal(model.predict(x), build().fit(x, as_object).predict(x))
    assert model.score(x, y) == build().fit(x, as_object).score(x, as_object)
    # a string class "None" is no marker when unlabelled is None
    named = np.where(marked, "None", np.array(y, dtype=str))
    assert "None" in PrototypeClassifier().fit(x, named).classes_
