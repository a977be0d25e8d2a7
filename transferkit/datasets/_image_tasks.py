"""Domain-shift tasks between the image data sets: MNIST -> digits, MNIST -> MNIST-M-lite."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_in_range, check_positive, check_seed
from ._images import ImageSplits, mnist, mnist_m_blend
from ._task import DomainTask, Pair, make_task, seeded_subset, split_pair, stratified_split


def _take(
    images: Tensor, labels: Tensor, index: Tensor, to_float: Callable[[Tensor], Tensor]
) -> Pair:
    """The ``index`` rows of a uint8 image split as ``(float inputs, labels)`` copies."""
    return to_float(images[index]), labels[index].clone()


def mnist_to_digits(
    *,
    source_size: int | None = 2_000,
    source_test_size: int | None = 1_000,
    test_fraction: float = 0.3,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> DomainTask:
    """MNIST (28x28) -> scikit-learn digits upsampled to 28x28: an MNIST -> USPS-like pair.

    The 8x8 UCI digits fill their frame (like USPS), MNIST digits sit in a 20x20 box with
    a 4-pixel margin, and the strokes differ, so a small CNN trained on MNIST loses much of
    its accuracy on the digits. All 1,797 digits form the target, split into unlabelled train and
    labelled test parts.

    Args:
        source_size: MNIST train images used as the labelled source (``None``: all).
        source_test_size: MNIST test images used as the source test split.
        test_fraction: fraction of the digits held out as the target test split.
        seed: picks the subsets and splits; the same seed gives the same task.
        root: MNIST idx folder, see [`mnist`][].

    Returns:
        A ``DomainTask`` with ``(N, 1, 28, 28)`` float32 inputs in ``[0, 1]``.

    Examples:
        >>> task = mnist_to_digits(source_size=500)  # doctest: +SKIP
        >>> task.source_x.shape[1:], task.target_x.shape[1:]  # doctest: +SKIP
        (torch.Size([1, 28, 28]), torch.Size([1, 28, 28]))
    """
    from sklearn.datasets import load_digits

    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)
    data = mnist(root)
    rng = np.random.default_rng(check_seed(seed))
    s_train = torch.from_numpy(
        seeded_subset(len(data.train_labels), source_size, rng, "source_size")
    )
    s_test = torch.from_numpy(
        seeded_subset(len(data.test_labels), source_test_size, rng, "source_test_size")
    )
    bunch = load_digits()
    small = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    digits28 = nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    digits28 = digits28.clamp(0.0, 1.0)
    digit_labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    t_train, t_test = stratified_split(digit_labels.numpy(), test_fraction, rng)
    target, target_test = split_pair(digits28, digit_labels, t_train, t_test)
    scale = ImageSplits.float_images
    return make_task(
        "mnist->digits",
        10,
        source=_take(data.train_images, data.train_labels, s_train, scale),
        source_test=_take(data.test_images, data.test_labels, s_test, scale),
        target=target,
        target_test=target_test,
    )


def mnist_to_mnist_m_lite(
    *,
    source_size: int = 3_000,
    target_size: int = 3_000,
    test_size: int = 1_000,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> DomainTask:
    """MNIST -> MNIST-M-lite, the digit task of the DANN paper (Ganin & Lempitsky, 2015).

    Source images are grey MNIST digits repeated over three channels (as in the paper);
    target images are *other* MNIST digits blended with photo crops by
    [`mnist_m_blend`][], so source and target never share a digit image. Both test
    splits come from MNIST's test split, disjoint from each other.

    Args:
        source_size: labelled source images (from MNIST train).
        target_size: unlabelled target images (from MNIST train, disjoint from the source).
        test_size: images in each of the source and target test splits.
        seed: picks the subsets and crops; the same seed gives the same task.
        root: MNIST idx folder, see [`mnist`][].

    Returns:
        A ``DomainTask`` with ``(N, 3, 28, 28)`` float32 inputs in ``[0, 1]``.

    Examples:
        >>> task = mnist_to_mnist_m_lite(source_size=200, target_size=200)  # doctest: +SKIP
        >>> task.input_shape  # doctest: +SKIP
        (3, 28, 28)
    """
    for value, name in ((source_size, "source_size"), (target_size, "target_size")):
        check_positive(value, name, integer=True)
    check_positive(test_size, "test_size", integer=True)
    data = mnist(root)
    rng = np.random.default_rng(check_seed(seed))
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    if source_size + target_size > n_train:
        raise ValueError(f"source_size + target_size: expected at most {n_train}")
    if 2 * test_size > n_test:
        raise ValueError(f"test_size: expected at most {n_test // 2}, got {test_size}")
    train_order = torch.from_numpy(rng.permutation(n_train))
    test_order = torch.from_numpy(rng.permutation(n_test))
    source_index = train_order[:source_size].sort().values
    target_index = train_order[source_size : source_size + target_size].sort().values
    source_test = test_order[:test_size].sort().values
    target_test = test_order[test_size : 2 * test_size].sort().values
    scale = ImageSplits.float_images
    scale = ImageSplits.float_images

    def grey3(images: Tensor) -> Tensor:
        return scale(images).expand(-1, 3, -1, -1).contiguous()

    def blended(seed: int) -> Callable[[Tensor], Tensor]:
        return lambda images: scale(mnist_m_blend(images, seed=seed))

    return make_task(
        "mnist->mnist_m_lite",
        10,
        source=_take(data.train_images, data.train_labels, source_index, grey3),
        source_test=_take(data.test_images, data.test_labels, source_test, grey3),
        target=_take(data.train_images, data.train_labels, target_index, blended(seed)),
        target_test=_take(
            data.test_images, data.test_labels, target_test, blended((seed + 1) % 2**64)
        ),
    )
