"""Tasks between image data sets: MNIST -> MNIST-M-lite and MNIST -> digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transferkit as tk
from tests.datasets.offline import needs_mnist


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


def _index_of(images: torch.Tensor) -> dict[bytes, int]:
    return {bytes(row): i for i, row in enumerate(images[:, 0].flatten(1).numpy())}


def _rows(x: torch.Tensor, index: dict[bytes, int]) -> list[int]:
    grey = (x[:, 0] * 255).round().to(torch.uint8).flatten(1).numpy()
    return [index[bytes(row)] for row in grey]


@needs_mnist
def test_image_tasks_pair_each_mnist_image_with_its_own_label_and_never_reuse_it() -> None:
    # source parts are MNIST images: find each one in MNIST and compare the labels; the
    # source and its test split come from MNIST's train and test splits, no row twice
    data = tk.datasets.mnist()
    train_index, test_index = _index_of(data.train_images), _index_of(data.test_images)
    for task in (
        tk.datasets.mnist_to_mnist_m_lite(source_size=300, target_size=200, test_size=100, seed=3),
        tk.datasets.mnist_to_digits(source_size=300, source_test_size=100, seed=3),
    ):
        rows = _rows(task.source_x, train_index)
        assert task.source_y.tolist() == data.train_labels[rows].tolist()
        assert len(set(rows)) == len(rows)
        test_rows = _rows(task.source_test_x, test_index)
        assert task.source_test_y.tolist() == data.test_labels[test_rows].tolist()
        assert len(set(test_rows)) == len(test_rows)


@needs_mnist
def test_mnist_to_digits_target_parts_are_disjoint_labelled_digits() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    reference = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear")
    key = {
        bytes(r.clamp(0, 1).flatten().numpy()): int(y)
        for r, y in zip(reference, bunch.target, strict=True)
    }
    task = tk.datasets.mnist_to_digits(source_size=50, source_test_size=20, seed=2)
    train = [bytes(r.flatten().numpy()) for r in task.target_x]
    test = [bytes(r.flatten().numpy()) for r in task.target_test_x]
    assert [key[k] for k in train] == task.target_y.tolist()
    assert [key[k] for k in test] == task.target_test_y.tolist()
    assert set(train).isdisjoint(test) and len(set(train)) + len(set(test)) == 1797


@needs_mnist
def test_mnist_m_tasks_accept_the_largest_seed() -> None:
    # fails before the fix: the test split's crops used seed + 1, which check_seed refused
    # for seed = 2**64 - 1 ("seed: expected an integer in [0, 2**64 - 1], got 2**64")
    top = 2**64 - 1
    data = tk.datasets.mnist_m_lite(seed=top, train_size=20, test_size=10)
    assert data.test_images.shape == (10, 3, 28, 28)
    task = tk.datasets.mnist_to_mnist_m_lite(source_size=20, target_size=20, test_size=10, seed=top)
    assert task.target_test_x.shape == (10, 3, 28, 28)
    # and the test crops stay those of seed + 1 for every other seed
    again = tk.datasets.mnist_m_lite(seed=4, train_size=20, test_size=10)
    blend = tk.datasets.mnist_m_blend
    digits = tk.datasets.mnist()
    rng = np.random.default_rng(4)
    rng.choice(60_000, size=20, replace=False)
    test = np.sort(rng.choice(10_000, size=10, replace=False))
    assert torch.equal(again.test_images, blend(digits.test_images[test], seed=5))
