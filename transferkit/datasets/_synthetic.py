"""Synthetic domain-shift tasks built from data that ships with scikit-learn.

* [`digits`][] -- the 8x8 UCI digits, split in two halves of disjoint images; the target
  half is transformed by a [`Shift`][transferkit.datasets.Shift].
* [`moons`][] -- the rotated two-moons toy of the DANN paper (Ganin et al., 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .._validation import check_in_range, check_positive, check_seed
from ._shifts import Shift, ShiftName, as_shifts
from ._task import DomainTask, Pair, split_domains, stratified_split


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size:
        return images
    tensor = torch.from_numpy(images).unsqueeze(1)
    resized = torch.nn.functional.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False
    )
    return resized.squeeze(1).numpy()


def digits(
    shift: ShiftName | Shift | Sequence[Shift] | None = "rotate",
    *,
    source_shift: ShiftName | Shift | Sequence[Shift] | None = None,
    size: int = 16,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> DomainTask:
    """Digits domain-shift task from scikit-learn's 1,797 8x8 UCI digits.

    The images are split (stratified, seeded) into two disjoint halves: the source half is
    left as it is (or transformed by ``source_shift``), the target half is transformed by
    ``shift``. Each half is then split into train and test parts. Inputs are scaled to
    ``[0, 1]``, upsampled bilinearly to ``size x size`` and shaped ``(N, 1, size, size)``.

    Named shifts use these defaults: ``"rotate"`` 45 degrees, ``"invert"``, ``"noise"``
    std 0.25, ``"blur"`` sigma 1, ``"translate"`` (alias ``"shift"``) 1 pixel. Pass shift
    objects (``tk.datasets.rotate(30)``) or a list of them for other strengths.

    Args:
        shift: the target domain's shift(s).
        source_shift: optional shift(s) of the source domain.
        size: output height and width in pixels (8 keeps the original grid).
        seed: controls the splits and random shifts; the same seed gives the same task.
        test_fraction: fraction of each half held out for testing.

    Returns:
        A [`DomainTask`][] with 10 classes.

    Examples:
        >>> from transferkit.datasets import rotate
        >>> task = digits(rotate(30), size=8, seed=1)
        >>> task.name
        'digits[rotate(30)]'
        >>> len(task.source_x) + len(task.source_test_x) + len(task.target_x) + len(
        ...     task.target_test_x)
        1797
    """
    from sklearn.datasets import load_digits

    target_shifts = as_shifts(shift, "shift")
    source_shifts = as_shifts(source_shift, "source_shift")
    check_positive(size, "size", integer=True)
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(check_seed(seed))
    source_index, target_index = stratified_split(labels, 0.5, rng)

    def make_domain(index: np.ndarray, shifts: list[Shift]) -> np.ndarray:
        domain = _resize(images[index], size)
        for s in shifts:
            domain = s.apply(domain, size / 8.0, rng)
        return np.asarray(np.clip(domain, 0.0, 1.0))

    source_images = make_domain(source_index, source_shifts)
    target_images = make_domain(target_index, target_shifts)
    source_labels, target_labels = labels[source_index], labels[target_index]
    label = "+".join(s.name for s in target_shifts) or "none"
    if source_shifts:
        label = "+".join(s.name for s in source_shifts) + "->" + label
    return split_domains(
        f"digits[{label}]",
        10,
        _as_pair(source_images, source_labels, channel=True),
        _as_pair(target_images, target_labels, channel=True),
        test_fraction=test_fraction,
        rng=rng,
    )


MOONS_CENTER = (0.5, 0.25)


def rotate_points(
    points: np.ndarray, degrees: float, center: Sequence[float] = MOONS_CENTER
) -> np.ndarray:
    """Rotate 2-D points counter-clockwise by ``degrees`` around ``center``.

    Shape:
        ``points``: ``(N, 2)``; returns ``(N, 2)``.

    Examples:
        >>> import numpy as np
        >>> rotate_points(np.array([[1.0, 0.0]]), 90, center=(0, 0)).round(6).tolist()
        [[0.0, 1.0]]
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points: expected an (N, 2) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points: expected finite values, found NaN/inf")
    check_in_range(degrees, "degrees", -360.0, 360.0)
    theta = math.radians(degrees)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    c = np.asarray(center, dtype=np.float64)
    rotated: np.ndarray = (points - c) @ rotation.T + c
    return rotated


def moons(
    angle: float = 35.0,
    *,
    n_samples: int = 400,
    noise: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> DomainTask:
    """The two-moons toy of the DANN paper: the target is the source rotated by ``angle``.

    Source and target are independent draws of `sklearn.datasets.make_moons`; the
    target draw is rotated counter-clockwise by ``angle`` degrees around the centre of
    the two moons, ``(0.5, 0.25)`` (see [`rotate_points`][]).

    Args:
        angle: rotation of the target domain, in degrees.
        n_samples: samples per domain (before the train/test split).
        noise: standard deviation of the Gaussian noise of ``make_moons``.
        seed: the same seed gives the same task; in ``[0, 2**32 - 10001]`` (the source
            is drawn with scikit-learn's ``random_state=seed``, the target with
            ``seed + 10000``).
        test_fraction: fraction of each domain held out for testing.

    Returns:
        A [`DomainTask`][] with 2 classes and ``(N, 2)`` inputs.

    Examples:
        >>> task = moons(35, n_samples=100)
        >>> task.source_x.shape[1], task.num_classes
        (2, 2)
    """
    from sklearn.datasets import make_moons

    check_in_range(angle, "angle", -360.0, 360.0)
    check_positive(n_samples, "n_samples", integer=True)
    if n_samples < 10:
        raise ValueError(f"n_samples: expected at least 10, got {n_samples}")
    check_positive(noise, "noise", strict=False)
    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)
    rng = np.random.default_rng(check_seed(seed))
    if seed + 10_000 >= 2**32:  # scikit-learn's random_state is 32-bit
        raise ValueError(f"seed: expected an integer in [0, 2**32 - 10001] for moons, got {seed}")
    source, source_labels = make_moons(n_samples, noise=noise, random_state=seed)
    target, target_labels = make_moons(n_samples, noise=noise, random_state=seed + 10_000)
    target = rotate_points(target, angle)
    return split_domains(
        f"moons[rotate({angle:g})]",
        2,
        _as_pair(source, source_labels, channel=False),
        _as_pair(target, target_labels, channel=False),
        test_fraction=test_fraction,
        rng=rng,
    )


def _as_pair(inputs: np.ndarray, labels: np.ndarray, *, channel: bool) -> Pair:
    """float32 inputs (with a channel axis for images) and int64 labels as tensors."""
    x = torch.from_numpy(inputs.astype(np.float32))
    return (x.unsqueeze(1) if channel else x), torch.from_numpy(labels.astype(np.int64))
