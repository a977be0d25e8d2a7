"""Offline domain-shift tasks for examples, tests and benchmarks.

Everything here is built from data that ships with scikit-learn, so it works with no
network. A task is a [`DomainTask`][]: a labelled source domain, an unlabelled target
domain (its labels are kept only for few-shot sampling and oracle baselines) and a
labelled target test split.

* [`digits`][] -- the 8x8 UCI digits, split in two halves of disjoint images; the target
  half is transformed by a [`Shift`][] ([`rotate`][], [`invert`][], [`noise`][],
  [`blur`][], [`translate`][], or several of them in sequence).
* [`moons`][] -- the rotated two-moons toy of the DANN paper (Ganin et al., 2016).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ._validation import (
    check_bool,
    check_in_range,
    check_labels,
    check_option,
    check_positive,
    check_seed,
    check_tensor,
)

__all__ = [
    "Blur",
    "DomainTask",
    "Invert",
    "Noise",
    "Rotate",
    "Shift",
    "Translate",
    "blur",
    "digits",
    "infinite",
    "invert",
    "make_loader",
    "moons",
    "noise",
    "rotate",
    "rotate_points",
    "translate",
]


@dataclass(frozen=True)
class DomainTask:
    """A domain-adaptation task: labelled source, unlabelled target, labelled target test.

    Attributes:
        name: a short description, e.g. ``"digits[rotate(45)]"``.
        num_classes: number of classes.
        source_x: labelled source training inputs, ``(N_s, ...)`` float32.
        source_y: their labels, ``(N_s,)`` int64.
        source_test_x: held-out source inputs.
        source_test_y: their labels.
        target_x: unlabelled target training inputs, ``(N_t, ...)`` float32.
        target_test_x: held-out target inputs for evaluation.
        target_test_y: their labels.
        target_y: the hidden labels of ``target_x``. Unsupervised adaptation must not use
            them; they serve [`few_shot`][] and target-supervised (oracle) baselines.

    Examples:
        >>> task = digits("invert", seed=0)
        >>> task.source_x.shape[1:], task.num_classes
        (torch.Size([1, 16, 16]), 10)
    """

    name: str
    num_classes: int
    source_x: Tensor
    source_y: Tensor
    source_test_x: Tensor
    source_test_y: Tensor
    target_x: Tensor
    target_test_x: Tensor
    target_test_y: Tensor
    target_y: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        classes = int(check_positive(self.num_classes, "num_classes", integer=True))
        for x_name, y_name in (
            ("source_x", "source_y"),
            ("source_test_x", "source_test_y"),
            ("target_x", "target_y"),
            ("target_test_x", "target_test_y"),
        ):
            x = check_tensor(getattr(self, x_name), x_name, finite=False)
            check_labels(getattr(self, y_name), y_name, num_samples=x.shape[0], num_classes=classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 16, 16)``."""
        return tuple(self.source_x.shape[1:])

    def few_shot(self, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Draw ``k`` labelled samples per class from the target training split.

        Args:
            k: samples per class (at least 1, at most the smallest class size).
            seed: seed of the draw; the same seed gives the same samples.

        Returns:
            ``(x, y)`` with ``k * num_classes`` samples, ordered by class.

        Examples:
            >>> x, y = digits("rotate").few_shot(5)
            >>> x.shape[0], y.bincount().tolist()
            (50, [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
        """
        check_positive(k, "k", integer=True)
        rng = np.random.default_rng(check_seed(seed))
        labels = self.target_y.numpy()
        chosen: list[np.ndarray] = []
        for cls in range(self.num_classes):
            members = np.flatnonzero(labels == cls)
            if members.size < k:
                raise ValueError(
                    f"k: class {cls} has only {members.size} target samples, cannot draw {k}"
                )
            chosen.append(np.sort(rng.choice(members, size=k, replace=False)))
        index = torch.from_numpy(np.concatenate(chosen))
        return self.target_x[index].clone(), self.target_y[index].clone()

    def flat(self) -> DomainTask:
        """Return a copy whose inputs are flattened to ``(N, D)`` (for scikit-learn).

        Examples:
            >>> digits("noise").flat().source_x.shape[1]
            256
        """

        def flatten(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1).clone()

        return dataclasses.replace(
            self,
            source_x=flatten(self.source_x),
            source_test_x=flatten(self.source_test_x),
            target_x=flatten(self.target_x),
            target_test_x=flatten(self.target_test_x),
        )


# --------------------------------------------------------------------------- shifts


class Shift:
    """A transformation of a batch of ``(N, H, W)`` images with values in ``[0, 1]``.

    Lengths (``pixels``, ``sigma``) are in pixels of the original 8x8 digit grid and are
    scaled with the output size, so a task means the same at every resolution.
    """

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Transform ``images`` (float64, ``(N, H, W)``); ``scale`` = output size / 8."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``rotate(45)``."""
        params = ", ".join(f"{v:g}" for v in dataclasses.astuple(self))  # type: ignore[call-overload]
        return f"{type(self).__name__.lower()}({params})"


@dataclass(frozen=True)
class Rotate(Shift):
    """Rotate each image by ``degrees`` (counter-clockwise) around its centre."""

    degrees: float

    def __post_init__(self) -> None:
        check_in_range(self.degrees, "degrees", -360.0, 360.0)

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Rotate with bilinear interpolation, keeping the image size."""
        out: np.ndarray = ndimage.rotate(images, self.degrees, axes=(2, 1), reshape=False, order=1)
        return out


@dataclass(frozen=True)
class Invert(Shift):
    """Swap foreground and background: ``x -> 1 - x``."""

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Invert intensities."""
        out: np.ndarray = 1.0 - images
        return out

    @property
    def name(self) -> str:
        """``invert``."""
        return "invert"


@dataclass(frozen=True)
class Noise(Shift):
    """Add i.i.d. Gaussian noise of standard deviation ``std`` (intensity units, 0-1)."""

    std: float

    def __post_init__(self) -> None:
        check_positive(self.std, "std")

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Add noise drawn from the task's seeded generator."""
        out: np.ndarray = images + rng.normal(0.0, self.std, size=images.shape)
        return out


@dataclass(frozen=True)
class Blur(Shift):
    """Gaussian blur with standard deviation ``sigma`` (in 8x8-grid pixels)."""

    sigma: float

    def __post_init__(self) -> None:
        check_positive(self.sigma, "sigma")

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Blur each image separately (no blur across the batch axis)."""
        sigma = self.sigma * scale
        out: np.ndarray = ndimage.gaussian_filter(images, sigma=(0.0, sigma, sigma))
        return out


@dataclass(frozen=True)
class Translate(Shift):
    """Shift every image by ``pixels`` (8x8-grid pixels) right and down, zero-filled."""

    pixels: float

    def __post_init__(self) -> None:
        check_in_range(self.pixels, "pixels", -4.0, 4.0)

    def apply(self, images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
        """Translate with bilinear interpolation."""
        offset = self.pixels * scale
        out: np.ndarray = ndimage.shift(images, (0.0, offset, offset), order=1, mode="constant")
        return out


def rotate(degrees: float = 45.0) -> Rotate:
    """Rotation shift; see [`Rotate`][].

    Examples:
        >>> rotate(30).name
        'rotate(30)'
    """
    check_in_range(degrees, "degrees", -360.0, 360.0)
    return Rotate(float(degrees))


def invert() -> Invert:
    """Intensity inversion shift; see [`Invert`][].

    Examples:
        >>> invert().name
        'invert'
    """
    return Invert()


def noise(std: float = 0.25) -> Noise:
    """Additive Gaussian noise shift; see [`Noise`][].

    Examples:
        >>> noise(0.25).name
        'noise(0.25)'
    """
    return Noise(check_positive(std, "std"))


def blur(sigma: float = 1.0) -> Blur:
    """Gaussian blur shift; see [`Blur`][].

    Examples:
        >>> blur(1.0).name
        'blur(1)'
    """
    return Blur(check_positive(sigma, "sigma"))


def translate(pixels: float = 1.0) -> Translate:
    """Translation shift; see [`Translate`][].

    Examples:
        >>> translate(1).name
        'translate(1)'
    """
    check_in_range(pixels, "pixels", -4.0, 4.0)
    return Translate(float(pixels))


ShiftName = Literal["none", "rotate", "invert", "noise", "blur", "translate", "shift"]
_NAMED_SHIFTS: dict[str, Shift | None] = {
    "none": None,
    "rotate": Rotate(45.0),
    "invert": Invert(),
    "noise": Noise(0.25),
    "blur": Blur(1.0),
    "translate": Translate(1.0),
    "shift": Translate(1.0),
}


def _as_shifts(shift: ShiftName | Shift | Sequence[Shift] | None, name: str) -> list[Shift]:
    if shift is None:
        return []
    if isinstance(shift, str):
        chosen = _NAMED_SHIFTS[check_option(shift, name, tuple(_NAMED_SHIFTS))]
        return [] if chosen is None else [chosen]
    if isinstance(shift, Shift):
        return [shift]
    if isinstance(shift, Sequence) and all(isinstance(s, Shift) for s in shift):
        return [s for s in shift if isinstance(s, Shift)]
    raise TypeError(
        f"{name}: expected a shift name, a Shift (e.g. tk.datasets.rotate(30)) or a list of "
        f"Shifts, got {type(shift).__name__}"
    )


# --------------------------------------------------------------------------- digits


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size:
        return images
    tensor = torch.from_numpy(images).unsqueeze(1)
    resized = torch.nn.functional.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False
    )
    return resized.squeeze(1).numpy()


def _stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that ``fraction`` of every class goes to the second part."""
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = round(len(members) * fraction)
        second.append(members[:cut])
        first.append(members[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


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
        >>> task = digits(rotate(30), size=8, seed=1)
        >>> task.name
        'digits[rotate(30)]'
        >>> len(task.source_x) + len(task.source_test_x) + len(task.target_x) + len(
        ...     task.target_test_x)
        1797
    """
    from sklearn.datasets import load_digits

    target_shifts = _as_shifts(shift, "shift")
    source_shifts = _as_shifts(source_shift, "source_shift")
    check_positive(size, "size", integer=True)
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(check_seed(seed))
    source_index, target_index = _stratified_split(labels, 0.5, rng)

    def make_domain(index: np.ndarray, shifts: list[Shift]) -> np.ndarray:
        domain = _resize(images[index], size)
        for s in shifts:
            domain = s.apply(domain, size / 8.0, rng)
        return np.asarray(np.clip(domain, 0.0, 1.0))

    source_images = make_domain(source_index, source_shifts)
    target_images = make_domain(target_index, target_shifts)
    source_labels, target_labels = labels[source_index], labels[target_index]
    s_train, s_test = _stratified_split(source_labels, test_fraction, rng)
    t_train, t_test = _stratified_split(target_labels, test_fraction, rng)

    def x(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32)).unsqueeze(1)

    def y(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    label = "+".join(s.name for s in target_shifts) or "none"
    if source_shifts:
        label = "+".join(s.name for s in source_shifts) + "->" + label
    return DomainTask(
        name=f"digits[{label}]",
        num_classes=10,
        source_x=x(source_images[s_train]),
        source_y=y(source_labels[s_train]),
        source_test_x=x(source_images[s_test]),
        source_test_y=y(source_labels[s_test]),
        target_x=x(target_images[t_train]),
        target_test_x=x(target_images[t_test]),
        target_test_y=y(target_labels[t_test]),
        target_y=y(target_labels[t_train]),
    )


# --------------------------------------------------------------------------- moons

MOONS_CENTER = (0.5, 0.25)


def rotate_points(
    points: np.ndarray, degrees: float, center: Sequence[float] = MOONS_CENTER
) -> np.ndarray:
    """Rotate 2-D points counter-clockwise by ``degrees`` around ``center``.

    Shape:
        ``points``: ``(N, 2)``; returns ``(N, 2)``.

    Examples:
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
        seed: the same seed gives the same task.
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
    source, source_labels = make_moons(n_samples, noise=noise, random_state=seed)
    target, target_labels = make_moons(n_samples, noise=noise, random_state=seed + 10_000)
    target = rotate_points(target, angle)
    s_train, s_test = _stratified_split(source_labels, test_fraction, rng)
    t_train, t_test = _stratified_split(target_labels, test_fraction, rng)

    def x(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32))

    def y(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return DomainTask(
        name=f"moons[rotate({angle:g})]",
        num_classes=2,
        source_x=x(source[s_train]),
        source_y=y(source_labels[s_train]),
        source_test_x=x(source[s_test]),
        source_test_y=y(source_labels[s_test]),
        target_x=x(target[t_train]),
        target_test_x=x(target[t_test]),
        target_test_y=y(target_labels[t_test]),
        target_y=y(target_labels[t_train]),
    )


# --------------------------------------------------------------------------- loaders


def make_loader(
    x: Tensor,
    y: Tensor | None = None,
    *,
    batch_size: int = 64,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader[tuple[Tensor, ...]]:
    """A seeded ``DataLoader`` over in-memory tensors.

    Batches are ``(x,)`` or ``(x, y)`` tuples. The shuffling order depends only on
    ``seed``, so two runs with the same seed see the same batches.

    Examples:
        >>> task = moons(n_samples=50)
        >>> xb, yb = next(iter(make_loader(task.source_x, task.source_y, batch_size=8)))
        >>> xb.shape, yb.shape
        (torch.Size([8, 2]), torch.Size([8]))
    """
    check_tensor(x, "x", min_samples=1)
    tensors = [x]
    if y is not None:
        check_tensor(y, "y", ndim=1, finite=False)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels to match x, got {y.shape[0]}")
        tensors.append(y)
    check_positive(batch_size, "batch_size", integer=True)
    check_bool(shuffle, "shuffle")
    check_bool(drop_last, "drop_last")
    generator = torch.Generator().manual_seed(check_seed(seed))
    return DataLoader(
        TensorDataset(*tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
    )


def infinite(loader: DataLoader[tuple[Tensor, ...]]) -> Iterator[tuple[Tensor, ...]]:
    """Iterate over ``loader`` forever, starting a new (reshuffled) pass when one ends.

    Domain-adaptation loops draw one source and one target batch per step although the
    two domains have different sizes; this keeps both streams going.

    Examples:
        >>> stream = infinite(make_loader(torch.arange(3.0)[:, None], batch_size=2))
        >>> [next(stream)[0].shape[0] for _ in range(4)]
        [2, 1, 2, 1]
    """
    if len(loader) == 0:
        raise ValueError("loader: expected a loader that yields at least one batch")
    while True:
        yield from loader


# --------------------------------------------------------------------------- real data
# MNIST, Fashion-MNIST, MNIST-M-lite and tweet tasks live in _real_datasets (this file
# would pass 600 lines); they are part of tk.datasets. Imported last: they build DomainTask.
from ._real_datasets import (  # noqa: E402
    TWEET_TOPICS,
    ImageSplits,
    MissingDataError,
    data_dirs,
    encode_texts,
    fashion_mnist,
    mnist,
    mnist_m_blend,
    mnist_m_lite,
    mnist_to_digits,
    mnist_to_mnist_m_lite,
    read_idx,
    sample_photos,
    tweet_topics,
    tweets,
)

__all__ += [
    "TWEET_TOPICS",
    "ImageSplits",
    "MissingDataError",
    "data_dirs",
    "encode_texts",
    "fashion_mnist",
    "mnist",
    "mnist_m_blend",
    "mnist_m_lite",
    "mnist_to_digits",
    "mnist_to_mnist_m_lite",
    "read_idx",
    "sample_photos",
    "tweet_topics",
    "tweets",
]
