"""``DeepFeatures`` (transferkit/sklearn/_deep_features.py) on array inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

import transferkit as tk
from tests.sklearn._reference import small_net
from transferkit.sklearn import DeepFeatures


def test_deep_features_returns_the_model_features_and_clones():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:20]
    flat = images.flatten(1).numpy()
    features = DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)).fit_transform(flat)
    with torch.no_grad():
        expected = net.eval().forward_features(images).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    copy = clone(DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)))
    assert copy.model is not net
    np.testing.assert_allclose(copy.transform(flat), features, rtol=1e-5, atol=1e-6)


def test_deep_features_concatenates_layers_and_applies_the_input_transform():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:8]
    both = DeepFeatures(net, layers=["neck", "fc"]).fit_transform(images)
    assert both.shape == (8, 16 + 10)
    flipped = DeepFeatures(net, layers="fc", input_transform=lambda t: t.flip(-1))
    with torch.no_grad():
        expected = net.eval()(images.flip(-1)).numpy()
    np.testing.assert_allclose(flipped.fit_transform(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_shape"):
        DeepFeatures(net, input_shape=(1, 8, 8)).fit_transform(images.flatten(1))


@pytest.mark.parametrize("kind", ["requires_grad", "bfloat16"])
def test_deep_features_take_grad_and_bfloat16_tensors(kind):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    rows = torch.randn(10, 4)
    given = rows.clone().requires_grad_(True) if kind == "requires_grad" else rows.bfloat16()
    expected = DeepFeatures(net, device="cpu", progress=False).fit_transform(
        given.detach().float().numpy()
    )
    got = DeepFeatures(net, device="cpu", progress=False).fit_transform(given)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


class _Runs:
    """Counts forward calls, also those of deep copies of the model (``clone`` in a grid
    search copies the model and its hooks: the copies count here too)."""

    def __init__(self) -> None:
        self.n = 0

    def __deepcopy__(self, memo: dict[int, object]) -> _Runs:
        return self

    def __call__(self, *args: object) -> None:
        self.n += 1


def test_each_distinct_dataframe_or_row_list_gets_its_own_cache_folder(tmp_path, caplog):
    # The cache folder was named after iter(X): a DataFrame's column names, str() of
    # NumPy rows (which elides long rows). Every DataFrame with the same columns shared
    # one folder, so cross-validation folds recomputed and overwrote each other's rows.
    pd = pytest.importorskip("pandas")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    rng = np.random.default_rng(0)
    frames = [pd.DataFrame(rng.normal(size=(12, 4)), columns=list("abcd")) for _ in range(2)]
    runs = _Runs()
    handle = net.register_forward_hook(runs)
    try:
        features = DeepFeatures(net, cache=tmp_path, device="cpu", batch_size=4)
        first = [features.fit_transform(frame) for frame in frames]
        calls = runs.n
        with caplog.at_level("WARNING", logger="transferkit.features"):
            again = [features.transform(frame) for frame in frames]
        assert runs.n == calls, "a DataFrame's features were recomputed"
        assert "recomputing" not in caplog.text and "changed" not in caplog.text
        for a, b, frame in zip(first, again, frames, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(
                a, net(torch.tensor(frame.to_numpy(), dtype=torch.float32)).detach(), atol=1e-6
            )
        # rows given as a list of long NumPy rows: two lists that differ in one value
        long_rows = [rng.normal(size=(1, 40, 40)).astype(np.float32) for _ in range(3)]
        changed = [row.copy() for row in long_rows]
        changed[1][0, 20, 20] += 1.0
        conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
        cached = DeepFeatures(conv, cache=tmp_path / "rows", device="cpu")
        cached.fit_transform(long_rows)
        cached.fit_transform(changed)
        assert len(list((tmp_path / "rows").iterdir())) == 2
    finally:
        handle.remove()


def test_a_bfloat16_tensor_can_be_cached(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    rows = torch.randn(10, 4).bfloat16()
    cached = DeepFeatures(net, cache=tmp_path, device="cpu").fit_transform(rows)
    plain = DeepFeatures(net, device="cpu").fit_transform(rows)
    np.testing.assert_array_equal(cached, plain)
    other = DeepFeatures(net, cache=tmp_path, device="cpu").fit_transform(rows.float())
    np.testing.assert_array_equal(other, plain)  # bf16 values, exact in float32
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_an_in_place_input_transform_or_model_never_changes_the_callers_rows(tmp_path):
    # input_transform got views of the caller's rows: t.mul_(2) rewrote the user's array
    # (and on a read-only memory map would crash the process).
    torch.manual_seed(0)

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.linear(x.add_(1.0))
            return out

    net = InPlace()
    rows = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    given = rows.copy()
    features = DeepFeatures(net, device="cpu", input_transform=lambda t: t.mul_(2.0))
    out = features.fit_transform(given)
    np.testing.assert_array_equal(given, rows)
    expected = net.linear(torch.from_numpy(rows) * 2 + 1).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.save(tmp_path / "rows.npy", rows)
    mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")  # read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor torch's "array is not writable" warning
        np.testing.assert_allclose(features.transform(mapped), expected, rtol=1e-6, atol=1e-6)
        plain = DeepFeatures(net, device="cpu").fit_transform(mapped)
    np.testing.assert_allclose(plain, net.linear(torch.from_numpy(rows) + 1).detach(), atol=1e-6)
    np.testing.assert_array_equal(mapped, rows)


def test_a_grid_search_over_layers_with_a_cache_runs_the_model_once_per_candidate(tmp_path):
    # Every candidate's features went to one folder per input: candidates with other
    # layers or pooling discarded each other's rows, so re-running the search (or the
    # next candidate on the same fold) recomputed everything, with warnings.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    task = tk.datasets.digits(None, seed=0)
    x = task.source_x[:60].flatten(1).numpy()
    y = task.source_y[:60].numpy()
    net = small_net()
    runs = _Runs()
    handle = net.register_forward_hook(runs)
    try:
        pipe = Pipeline(
            [
                ("features", DeepFeatures(net, input_shape=(1, 16, 16), cache=tmp_path)),
                ("clf", LogisticRegression(max_iter=300)),
            ]
        )
        grid = {"features__layers": ["neck", "fc"], "features__pool": ["avg", "max"]}
        search = GridSearchCV(pipe, grid, cv=2, refit=False).fit(x, y)
        first = runs.n
        assert first > 0
        again = GridSearchCV(pipe, grid, cv=2, refit=False).fit(x, y)
        assert runs.n == first, "a cached candidate was recomputed"
        np.testing.assert_array_equal(
            search.cv_results_["mean_test_score"], again.cv_results_["mean_test_score"]
        )
    finally:
        handle.remove()


class _FailsOnce:
    """An input_transform that raises at one call (an interrupted extraction)."""

    def __init__(self, at: int) -> None:
        self.calls, self.at = 0, at

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return row


def test_an_interrupted_cached_extraction_of_a_training_batchnorm_model_resumes_exactly(
    tmp_path,
):
    # DeepFeatures + cache + a model left in training mode (BatchNorm), interrupted half
    # way: the model keeps its mode and statistics, and the resumed call returns exactly
    # the uninterrupted features (eval-mode BatchNorm), never a partial or zero row.
    net = small_net().train()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    x = tk.datasets.digits(None, seed=0).source_x[:40].numpy()
    reference = DeepFeatures(net, layers="neck", batch_size=8).fit_transform(x)
    assert net.training
    failing = _FailsOnce(at=25)
    features = DeepFeatures(net, layers="neck", batch_size=8, cache=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        features.set_params(input_transform=failing).fit_transform(x)
    assert all(m.training for m in net.modules())
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())
    failing.at = -1
    resumed = features.transform(x)
    np.testing.assert_array_equal(resumed, reference)
    assert failing.calls == 25 + 40  # every row loaded again (digests), none skipped
    with torch.no_grad():
        evaluated = net.eval().forward_features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(resumed, evaluated, rtol=1e-5, atol=1e-6)


class AnyWidth(torch.nn.Module):
    """A model that takes rows of any width (mean and max of each row), as a global
    pooling network takes images of any size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True), x[:, :1]], 1)


@parametrize_with_checks([DeepFeatures(AnyWidth())])
def test_passes_sklearn_estimator_checks(estimator, check):
    # Failed on main: width and column names were never checked in transform, and NaN,
    # complex, empty, sparse and object inputs gave unclear errors or went through.
    check(estimator)


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_a_dataframe_with_its_columns_in_another_order_raises_like_sklearn():
    # transform ran any DataFrame through the model: one whose columns came in another
    # order than in fit gave other features (and predictions) with no error, where every
    # scikit-learn transformer raises. A reversed column order crashed in torch instead.
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(30, 4)), columns=list("abcd"))
    features = DeepFeatures(AnyWidth(), device="cpu").fit(frame)
    assert list(features.feature_names_in_) == list("abcd")
    np.testing.assert_array_equal(features.transform(frame), features.transform(frame.to_numpy()))
    for order in ("badc", "dcba"):
        with pytest.raises(ValueError, match="feature names"):
            features.transform(frame[list(order)])
    with pytest.raises(ValueError, match="X has 3 features, but DeepFeatures is expecting 4"):
        features.transform(frame.to_numpy()[:, :3])
    with pytest.raises(ValueError, match="NaN or infinity"):
        features.transform(np.where(np.eye(30, 4) > 0, np.nan, frame.to_numpy()))
    # image rows: the width is the product of the per-sample shape
    images = DeepFeatures(AnyWidth(), device="cpu").fit(rng.normal(size=(5, 2, 3)))
    assert images.n_features_in_ == 6 and not hasattr(images, "feature_names_in_")
    with pytest.raises(ValueError, match="X has 8 features"):
        images.transform(rng.normal(size=(5, 2, 4)))
    # refitting on texts or tokens forgets the array width
    tokens = {"input_ids": np.ones((3, 4), dtype=np.int64)}
    embed = torch.nn.Embedding(2, 3)
    refit = DeepFeatures(embed, device="cpu").fit(np.ones((3, 4), dtype=np.int64))
    assert refit.n_features_in_ == 4
    assert not hasattr(refit.fit(tokens), "n_features_in_")


def test_clones_searching_in_parallel_threads_share_one_cache_without_corrupting_it(tmp_path):
    # GridSearchCV clones the pipeline (and deep-copies the model) per candidate and fold;
    # with n_jobs=2 threads the clones read and write the same cache folders at once.
    from joblib import parallel_backend
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    task = tk.datasets.digits(None, seed=0)
    x = task.source_x[:80].flatten(1).numpy()
    y = task.source_y[:80].numpy()

    def search(cache):
        pipe = Pipeline(
            [
                ("features", DeepFeatures(small_net(), input_shape=(1, 16, 16), cache=cache)),
                ("clf", LogisticRegression(max_iter=300)),
            ]
        )
        grid = {"features__layers": ["neck", "fc"], "clf__C": [0.1, 1.0, 10.0]}
        with parallel_backend("threading", n_jobs=2):
            return GridSearchCV(pipe, grid, cv=3, n_jobs=2).fit(x, y)

    plain = search(None)
    cached = [search(tmp_path) for _ in range(2)]  # cold, then warm
    for result in cached:
        np.testing.assert_allclose(
            result.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"]
        )
        np.testing.assert_array_equal(result.predict(x), plain.predict(x))
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 2 * 6 + 1  # 2 layer settings x 6 fold parts, + the refit on all
    for folder in folders:
        header = (folder / "header.json").read_text()
        assert '"complete":true' in header
