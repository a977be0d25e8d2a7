"""``make_deep_svm_pipeline`` (transferkit/sklearn/_pipeline.py) and the estimators in
scikit-learn pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import transferkit as tk
from tests.sklearn._reference import small_net, two_domains
from transferkit.sklearn import CORAL, DeepFeatures, TorchKernelSVC, make_deep_svm_pipeline


def test_deep_svm_pipeline_works_in_grid_search():
    task = tk.datasets.digits(None, seed=0)
    x = task.source_x[:200].flatten(1).numpy()
    y = task.source_y[:200].numpy()
    pipe = make_deep_svm_pipeline(
        small_net(), layers="neck", feature_params={"input_shape": (1, 16, 16)}
    )
    search = GridSearchCV(pipe, {"svc__C": [1.0, 10.0]}, cv=2).fit(x, y)
    assert search.best_params_["svc__C"] in (1.0, 10.0)
    assert search.predict(x[:5]).shape == (5,)


@pytest.mark.parametrize("align", ["coral", "tca", "subspace"])
def test_aligned_pipeline_fits_on_source_plus_unlabelled_target(align):
    task = tk.datasets.digits("noise", seed=0).flat()
    x = np.vstack([task.source_x[:300].numpy(), task.target_x[:200].numpy()])
    y = np.r_[task.source_y[:300].numpy(), -np.ones(200, dtype=int)]
    params = {"input_shape": (1, 16, 16)}
    pipe = make_deep_svm_pipeline(small_net(), layers="neck", align=align, feature_params=params)
    if align == "subspace":
        pipe.set_params(align__n_components=8)
    pipe.fit(x, y)
    assert pipe.named_steps["svc"].unlabelled == -1
    assert -1 not in pipe.classes_
    accuracy = pipe.score(task.target_test_x.numpy(), task.target_test_y.numpy())
    assert accuracy > 0.3  # random-init features, 10 classes: far above chance


def test_aligners_compose_with_plain_sklearn_pipelines():
    x, y, _, target = two_domains()
    pipe = make_pipeline(StandardScaler(), CORAL(), TorchKernelSVC(unlabelled=-1)).fit(x, y)
    assert pipe.predict(target).shape == (len(target),)
    assert set(pipe.classes_) == {0, 1}


def test_the_svm_skips_the_rows_an_aligner_with_its_own_marker_takes_as_target():
    # The SVM's unlabelled marker was always -1: with CORAL(unlabelled="target") the target
    # rows were learnt as a class "target", which the pipeline then predicted.
    rng = np.random.default_rng(0)
    source = rng.normal(size=(60, 4))
    labels = np.where(source[:, 0] > 0, "pos", "neg")
    target = rng.normal(size=(40, 4)) + 1.0
    x = np.vstack([source, target]).astype(np.float32)
    y = np.r_[labels, ["target"] * 40]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
    pipe = make_deep_svm_pipeline(net, align=CORAL(unlabelled="target"), device="cpu")
    pipe.fit(x, y)
    assert pipe.named_steps["svc"].unlabelled == "target"
    assert set(pipe.classes_) == {"neg", "pos"}
    assert set(pipe.predict(target)) <= {"neg", "pos"}
    # the same pipeline built by hand with the marker given to both steps agrees
    manual = make_pipeline(
        DeepFeatures(net),
        StandardScaler(),
        CORAL(unlabelled="target"),
        TorchKernelSVC(unlabelled="target", device="cpu"),
    ).fit(x, y)
    np.testing.assert_array_equal(manual.predict(target), pipe.predict(target))
    with pytest.raises(ValueError, match="differs from the aligner"):
        make_deep_svm_pipeline(net, align=CORAL(unlabelled="target"), unlabelled=-1)
    numeric = make_deep_svm_pipeline(net, align=tk.sklearn.TCA(unlabelled=-2))
    assert numeric.named_steps["svc"].unlabelled == -2
    assert make_deep_svm_pipeline(net, align="tca").named_steps["svc"].unlabelled == -1


@pytest.mark.parametrize("solver", ["exact", "nystroem"])
def test_sample_weights_reach_the_svm_and_follow_its_labelled_rows(solver):
    # Pipeline(..., align) + svc__sample_weight: the weights of the unlabelled target
    # rows must be dropped with those rows (not shifted onto other rows), for both paths.
    x, y, _, target = two_domains()
    xs = np.vstack([x[y != -1], target])
    ys = np.r_[y[y != -1], -np.ones(len(target), dtype=int)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ys))  # target rows interleaved with source rows
    xs, ys = xs[order], ys[order]
    weight = rng.uniform(0.1, 3.0, len(ys))
    params = {"device": "cpu", "solver": solver, "n_components": 30, "random_state": 0}
    pipe = make_pipeline(StandardScaler(), CORAL(), TorchKernelSVC(unlabelled=-1, **params))
    pipe.fit(xs, ys, torchkernelsvc__sample_weight=weight)
    # the same SVM fitted by hand on the aligned labelled rows and their weights
    aligned = make_pipeline(StandardScaler(), CORAL()).fit_transform(xs, ys)
    keep = ys != -1
    manual = TorchKernelSVC(**params).fit(aligned[keep], ys[keep], sample_weight=weight[keep])
    probe = make_pipeline(StandardScaler(), CORAL()).fit(xs, ys).transform(target)
    np.testing.assert_allclose(
        pipe.decision_function(target), manual.decision_function(probe), rtol=1e-7, atol=1e-9
    )
    unweighted = make_pipeline(StandardScaler(), CORAL(), TorchKernelSVC(unlabelled=-1, **params))
    unweighted.fit(xs, ys)
    assert not np.allclose(pipe.decision_function(target), unweighted.decision_function(target))
