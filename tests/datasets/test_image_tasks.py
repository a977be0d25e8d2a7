"""Tasks between image data sets: MNIST -> MNIST-M-lite and MNIST -> digits."""

from __future__ import annotations

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
