"""The inputs ``DeepFeatures`` takes besides arrays.

Per-sample transforms of array rows, raw texts (tokenised, batched by length, padded per
batch), a tokenizer's output (dict of token arrays), and the fingerprint that names each
input's feature-cache folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class TransformedRows(Dataset[Tensor]):
    """Rows of a tensor passed one by one through a per-sample ``transform``."""

    def __init__(self, rows: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        self.rows = rows
        self.transform = transform

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        # a copy: a transform that works in place (t.div_(255)) must not reach the caller's
        # array (nor a read-only memory map, where the write would crash the process)
        return self.transform(self.rows[index].clone())


def is_text(X: Any) -> bool:
    """Raw text: a non-empty list, tuple, 1-D array or pandas Series whose first item is a str."""
    if isinstance(X, (str, bytes, Mapping, Tensor)):
        return False
    if isinstance(X, np.ndarray):
        return X.ndim == 1 and X.size > 0 and X.dtype.kind in "UO" and isinstance(X[0], str)
    values = _pandas_values(X)
    if values is not None:
        return is_text(values)
    if isinstance(X, Sequence) and len(X) > 0:
        return isinstance(X[0], str)
    return False


def _pandas_values(X: Any) -> np.ndarray | None:
    """A pandas Series' (or DataFrame's) values as a NumPy array; None for anything else.

    ``.values`` of a pandas 3 string Series is a ``StringArray``, not an ndarray:
    ``to_numpy()`` gives the strings as an object array whatever the dtype.
    """
    if not hasattr(X, "iloc"):
        return None
    convert = getattr(X, "to_numpy", None)
    values = convert() if callable(convert) else getattr(X, "values", None)
    return values if isinstance(values, np.ndarray) else None


def texts_of(X: Any) -> list[str]:
    values = _pandas_values(X)
    if values is None and isinstance(X, np.ndarray):
        values = X
    texts = values.tolist() if values is not None else list(X)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"X: expected only strings, got {type(text).__name__} at row {row}")
    return texts


class Tokenized(Dataset[dict[str, list[int]]]):
    """Tokenizer output (unpadded lists) served one sample at a time, in ``order``."""

    def __init__(self, encoding: Mapping[str, Sequence[Any]], order: np.ndarray) -> None:
        self.columns = {key: list(value) for key, value in encoding.items()}
        self.order = order

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        row = int(self.order[index])
        return {key: value[row] for key, value in self.columns.items()}


class PadBatch:
    """Collate a list of tokenised samples by the tokenizer's own ``pad`` (to the longest)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        padded = self.tokenizer.pad(samples, padding=True, return_tensors="pt")
        return {key: value for key, value in padded.items() if isinstance(value, Tensor)}


def token_inputs(X: Mapping[str, Any]) -> dict[str, Tensor]:
    """A tokenizer's output (dict or ``BatchEncoding`` of arrays/tensors) as tensors."""
    if len(X) == 0:
        raise ValueError("X: expected a non-empty dict of token arrays, e.g. input_ids")
    out: dict[str, Tensor] = {}
    for key, value in X.items():
        if isinstance(value, Tensor):
            tensor = value.detach().cpu()
        else:
            try:
                tensor = torch.as_tensor(np.asarray(value))
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"X[{key!r}]: expected an array or tensor (pad the tokenizer's output, "
                    f"e.g. padding=True), got {type(value).__name__}"
                ) from error
        if tensor.dim() < 1:
            raise ValueError(f"X[{key!r}]: expected an (N, ...) array, got a scalar")
        out[str(key)] = tensor
    lengths = {key: int(t.shape[0]) for key, t in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"X: every entry needs the same number of rows, got {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError("X: expected at least 1 sample, got 0")
    mask = out.get("attention_mask")
    ids = out.get("input_ids")
    if mask is not None and ids is not None and mask.shape != ids.shape:
        raise ValueError(
            f"X['attention_mask']: expected the shape of input_ids {tuple(ids.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    return out


def fingerprint(X: Any) -> str:
    """A short hash of the inputs, naming their cache folder."""
    digest = hashlib.sha256()
    if isinstance(X, Mapping):
        for key in sorted(X):
            digest.update(str(key).encode() + b"\x00")
            digest.update(fingerprint(X[key]).encode())
    elif is_text(X):
        for text in texts_of(X):
            digest.update(text.encode("utf-8", errors="replace") + b"\x00")
    else:  # numbers: a tensor, an array, a pandas DataFrame, nested lists (by value)
        if isinstance(X, Tensor):
            tensor = X.detach().cpu().resolve_conj().resolve_neg()
            digest.update(f"{tensor.dtype}|".encode())  # bfloat16: hashed as its bits
            bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            array = bits.numpy()
        else:
            values = _pandas_values(X)
            array = np.asarray(X if values is None else values)
        if array.dtype.kind == "O":  # no fixed-size bytes to hash: every item by repr
            digest.update(b"O")
            for item in array.reshape(-1):
                digest.update(repr(item).encode("utf-8", errors="replace") + b"\x00")
        else:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()[:24]
