"""The on-disk feature cache of [`transferkit.extract_features`][] (private).

Fingerprints of models and data, and `_CacheSink`: preallocated ``.npy`` files
filled with positioned writes plus an atomically rewritten JSON header that records how
many rows are complete (so an interrupted run resumes, and a mismatching cache is
recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger("transferkit.features")

_FORMAT = "transferkit-features"
_VERSION = 1
_HEADER = "header.json"
_HEADER_INTERVAL_S = 1.0
_FULL_HASH_ELEMENTS = 1 << 24


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return bytes(flat.view(torch.uint8).cpu().numpy().tobytes())


def _digest_tensor(h: Any, t: Tensor) -> None:
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.is_quantized or t.is_sparse:
        h.update(repr(t).encode())
        return
    if t.numel() <= _FULL_HASH_ELEMENTS:
        h.update(_tensor_bytes(t))
        return
    # Large tensors: a strided sample plus exact float64 sums, which change whenever any
    # element does (barring exact cancellation), at a fraction of the cost of full bytes.
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // _FULL_HASH_ELEMENTS)
    h.update(_tensor_bytes(flat[::stride]))
    if not t.is_complex() and t.dtype != torch.bool:
        h.update(repr(float(flat.sum(dtype=torch.float64))).encode())
        h.update(repr(float(flat.abs().sum(dtype=torch.float64))).encode())


def _model_fingerprint(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        if isinstance(tensor, Tensor):
            _digest_tensor(h, tensor)
    return h.hexdigest()


def _digest_item(h: Any, item: Any) -> None:
    if isinstance(item, Tensor):
        _digest_tensor(h, item)
    elif isinstance(item, np.ndarray) and item.dtype != object:
        _digest_tensor(h, torch.from_numpy(np.ascontiguousarray(item)))
    elif isinstance(item, Mapping):
        for key in item:
            h.update(repr(key).encode())
            _digest_item(h, item[key])
    elif isinstance(item, (list, tuple)):
        for value in item:
            _digest_item(h, value)
    else:
        h.update(repr(item).encode())


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _data_offset(path: Path) -> int:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(handle)
        else:
            np.lib.format.read_array_header_2_0(handle)
        return handle.tell()


def _file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    buffer = bytearray(1 << 20)  # one reused 1 MiB buffer: memory does not grow with the file
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(_data_offset(path))
        while size := handle.readinto(view):
            h.update(view[:size])
    return h.hexdigest()


class _CacheSink:
    """Rows written straight into preallocated ``.npy`` files plus a JSON header.

    The ``.npy`` files are created with ``np.lib.format.open_memmap`` (valid headers, full
    size) and filled with positioned writes rather than through a mapping, so resident
    memory does not grow with the number of rows; they are read back memory-mapped. The
    header, rewritten atomically, records how many rows are complete: data beyond it is
    never trusted, so an interrupted run resumes from there.
    """

    def __init__(
        self, directory: Path, names: Sequence[str], key: dict[str, Any], batch_size: int | None
    ) -> None:
        self.directory = directory
        self.names = list(names)
        self.key = key
        self.batch_size = batch_size
        self.header: dict[str, Any] | None = None
        self.handles: list[Any] = []
        self.offsets: list[int] = []
        self.row_bytes: list[int] = []
        self.dtypes: list[np.dtype[Any]] = []
        self.last_save = 0.0
        self.rows_done = 0

    @property
    def header_path(self) -> Path:
        return self.directory / _HEADER

    def _corrupt(self, what: str, err: object) -> ValueError:
        return ValueError(
            f"cache: {what} is corrupted or truncated ({err}); delete {self.directory} "
            "to recompute the features"
        )

    def open(self) -> int:
        """Check an existing cache; return the rows already done (0 for a fresh start)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.header_path.exists():
            return 0
        try:
            header = json.loads(self.header_path.read_text(encoding="utf-8"))
            if header.get("format") != _FORMAT or header.get("version") != _VERSION:
                raise ValueError(f"not a {_FORMAT} v{_VERSION} header")
            files = dict(header["files"])
            if header["labels"] is not None:
                files["labels"] = header["labels"]
            rows_done = int(header["rows_done"])
            num_rows = int(header["num_rows"])
            stored_key = dict(header["fingerprint"])
            layers = list(header["layers"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise self._corrupt(str(self.header_path), err) from err
        if stored_key != self.key:
            changed = sorted(k for k in self.key if stored_key.get(k) != self.key[k])
            files = {k: v for k, v in files.items() if isinstance(v, Mapping)}
            logger.warning(
                "cache: %s was computed with a different %s; recomputing it",
                self.directory,
                "/".join(changed) or "format",
            )
            self._discard(files)
            return 0
        if (
            not 0 <= rows_done <= num_rows
            or layers != self.names
            or layers != list(header["files"])
        ):
            raise self._corrupt(str(self.header_path), "inconsistent row counts or layers")
        for entry in files.values():
            self._check_file(entry, complete=bool(header.get("complete")))
        self.header = header
        self.rows_done = rows_done
        return rows_done

    def _check_file(self, entry: dict[str, Any], *, complete: bool) -> None:
        try:
            path = self.directory / str(entry["file"])
            shape, dtype = list(entry["shape"]), str(entry["dtype"])
        except (KeyError, TypeError) as err:
            raise self._corrupt(str(self.header_path), err) from err
        if not path.exists():
            raise ValueError(f"cache: {path} is missing; delete {self.directory} to recompute")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise self._corrupt(str(path), err) from err
        if list(array.shape) != shape or str(array.dtype) != dtype:
            raise self._corrupt(str(path), f"shape {array.shape} / {array.dtype} != header")
        del array
        if complete and _file_checksum(path) != entry.get("checksum"):
            raise self._corrupt(str(path), "checksum mismatch")

    def _discard(self, files: Mapping[str, Any]) -> None:
        self.header_path.unlink(missing_ok=True)
        for entry in files.values():
            (self.directory / str(entry.get("file", ""))).unlink(missing_ok=True)

    def _create(self, outputs: list[np.ndarray], labels: np.ndarray | None) -> None:
        num_rows = int(self.key["num_rows"])

        def allocate(file: str, sample: np.ndarray) -> dict[str, Any]:
            shape = (num_rows, *sample.shape[1:])
            tmp = self.directory / f".{file}.{os.getpid()}.tmp"
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=sample.dtype, shape=shape)
            del array
            os.replace(tmp, self.directory / file)
            return {"file": file, "shape": list(shape), "dtype": str(sample.dtype)}

        files = {
            name: allocate(f"features_{index}.npy", sample)
            for index, (name, sample) in enumerate(zip(self.names, outputs, strict=True))
        }
        self.header = {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.key,
            "layers": self.names,
            "files": files,
            "labels": allocate("labels.npy", labels) if labels is not None else None,
            "num_rows": num_rows,
            "batch_size": self.batch_size,
            "rows_done": 0,
            "complete": False,
        }
        _write_json_atomic(self.header_path, self.header)

    def _entries(self) -> list[dict[str, Any]]:
        if self.header is None:
            return []
        entries = [self.header["files"][name] for name in self.names]
        return entries + ([self.header["labels"]] if self.header["labels"] else [])

    def _open_handles(self) -> None:
        for entry in self._entries():
            path = self.directory / entry["file"]
            dtype = np.dtype(entry["dtype"])
            self.handles.append(open(path, "r+b"))  # noqa: SIM115 - closed in close()
            self.offsets.append(_data_offset(path))
            self.row_bytes.append(int(np.prod(entry["shape"][1:], dtype=np.int64)) * dtype.itemsize)
            self.dtypes.append(dtype)

    def write(self, start: int, outputs: list[np.ndarray], labels: np.ndarray | None) -> None:
        if self.header is None:
            self._create(outputs, labels)
        if not self.handles:
            self._open_handles()
        columns = [*outputs, labels] if labels is not None else outputs
        if len(columns) != len(self.handles):
            raise ValueError("data: some batches carry labels and others do not")
        for handle, offset, row_bytes, dtype, column in zip(
            self.handles, self.offsets, self.row_bytes, self.dtypes, columns, strict=True
        ):
            block = np.ascontiguousarray(column, dtype=dtype)
            if block.nbytes != row_bytes * block.shape[0]:
                raise ValueError("cache: a batch's feature shape differs from the cached shape")
            handle.seek(offset + start * row_bytes)
            handle.write(block.reshape(-1).view(np.uint8).data)
        self.rows_done = start + outputs[0].shape[0]
        if time.monotonic() - self.last_save >= _HEADER_INTERVAL_S:
            self.save()

    def save(self, *, complete: bool = False) -> None:
        """Flush the rows written so far, then record them in the header."""
        if self.header is None:
            return
        for handle in self.handles:
            handle.flush()
            if complete:
                os.fsync(handle.fileno())
        self.header["rows_done"] = self.rows_done
        if complete:
            for entry in self._entries():
                entry["checksum"] = _file_checksum(self.directory / entry["file"])
            self.header["complete"] = True
        _write_json_atomic(self.header_path, self.header)
        self.last_save = time.monotonic()

    def close(self) -> None:
        while self.handles:
            self.handles.pop().close()
        self.offsets, self.row_bytes, self.dtypes = [], [], []

    def result(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        loaded = [np.load(self.directory / e["file"], mmap_mode="c") for e in self._entries()]
        arrays, labels = loaded[: len(self.names)], loaded[len(self.names) :]
        return arrays, (labels[0] if labels else None)
