"""The on-disk feature cache of [`transferkit.extract_features`][] (`_CacheSink`).

Preallocated ``.npy`` files filled with positioned writes, an atomically rewritten JSON
header that records, for every chunk of rows written, a digest of the input batch and a
checksum of the stored rows, and a lock file (``fcntl.flock``) that serialises the
processes (and threads) using the same folder. File names are checked by `._files`;
digests come from `._fingerprint`.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path, write_json_atomic
from ._files import (
    _DATA_NAME,
    _FORMAT,
    _HEADER,
    _VERSION,
    _acquire_lock,
    _cannot_write,
    _check_fits,
    _Chunk,
    _data_offset,
    _foreign,
    _no_link,
    _plain_file,
    _remove_temporaries,
)
from ._fingerprint import _TreeHash

logger = logging.getLogger("transferkit.features")

_HEADER_INTERVAL_S = 1.0  # the header is saved at most this often...
_HEADER_COST_FACTOR = 20.0  # ...and at most this many times less often than it takes


class _CacheSink:
    """Rows written straight into preallocated ``.npy`` files plus a JSON header.

    The ``.npy`` files are created with ``np.lib.format.open_memmap`` (valid headers, full
    size) and filled with positioned writes (``os.pwrite``), so resident memory does not
    grow with the number of rows; they are read back memory-mapped. The header, rewritten
    atomically at most once a second, lists the chunks written so far: rows, the digest of
    the input batch and a checksum of each file's rows. Rows outside these chunks are
    never trusted, and a chunk is only reused after its checksums are verified.
    """

    def __init__(
        self, directory: Path, names: Sequence[str], key: dict[str, Any], batch_size: int | None
    ) -> None:
        self.directory = directory
        self.names = list(names)
        self.key = key
        self.batch_size = batch_size
        self.header: dict[str, Any] | None = None
        self.complete = False
        self.dirty = False
        self.starts: list[int] = []
        self.chunks: dict[int, _Chunk] = {}
        self._lock_fd: int | None = None
        self._read_fds: list[int] = []
        self._write_fds: list[int] = []
        self.offsets: list[int] = []
        self.row_bytes: list[int] = []
        self.dtypes: list[np.dtype[Any]] = []
        self.last_save = 0.0
        self.save_cost = 0.0

    @property
    def header_path(self) -> Path:
        return self.directory / _HEADER

    def _corrupt(self, what: str, err: object) -> ValueError:
        return ValueError(
            f"cache: {what} is corrupted or truncated ({err}); delete {self.directory} "
            "to recompute the features"
        )

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        """Lock the folder, clean stale temp files and load a matching header, if any."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError as err:
            raise ValueError(f"cache: {self.directory} exists and is not a directory") from err
        try:
            self._lock_fd = _acquire_lock(self.directory)
            if self._lock_fd is not None:  # we hold the lock: no temp file is live
                _remove_temporaries(self.directory)
            self._load()
            if self.header is None:  # about to create the files: never replace someone's
                for entry in os.scandir(self.directory):
                    if _DATA_NAME.fullmatch(entry.name):
                        raise _foreign(Path(entry.path))
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        if not _no_link(self.header_path):
            return
        try:
            header = json.loads(self.header_path.read_text(encoding="utf-8"))
            if not isinstance(header, dict) or header.get("format") != _FORMAT:
                raise _foreign(self.header_path)
            version = header.get("version")
            files = dict(header["files"])
            if header["labels"] is not None:
                files["labels"] = header["labels"]
            paths = [
                _plain_file(self.directory, dict(entry).get("file"), str(name))
                for name, entry in files.items()
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, ValueError) and str(err).startswith("cache: "):
                raise
            raise self._corrupt(str(self.header_path), err) from err
        if version != _VERSION:
            logger.warning(
                "cache: %s was written by another version of transferkit; recomputing it",
                self.directory,
            )
            self._discard(paths)
            return
        try:
            stored_key = dict(header["fingerprint"])
            num_rows = int(header["num_rows"])
            layers = list(header["layers"])
            chunks = [_Chunk(int(a), int(b), d, list(s)) for a, b, d, s in header["chunks"]]
        except (ValueError, KeyError, TypeError) as err:
            raise self._corrupt(str(self.header_path), err) from err
        if stored_key != self.key:
            keys = set(self.key) | set(stored_key)
            changed = sorted(k for k in keys if stored_key.get(k) != self.key.get(k))
            logger.warning(
                "cache: %s was computed with a different %s; recomputing it",
                self.directory,
                "/".join(changed) or "format",
            )
            self._discard(paths)
            return
        if layers != self.names or layers != list(header["files"]):
            raise self._corrupt(str(self.header_path), "inconsistent layers")
        if not chunks:  # no row recorded (e.g. killed while allocating): start afresh
            self._discard(paths)
            return
        entries = [header["files"][n] for n in self.names]
        entries += [header["labels"]] if header["labels"] is not None else []
        try:
            for entry in entries:
                self._check_file(entry, num_rows)
        except ValueError as err:
            if header.get("complete") or "symbolic link" in str(err):
                raise
            # An interrupted cache promised nothing: restart it rather than give up.
            logger.warning("%s; the cache was incomplete, so it is recomputed", err)
            self._discard(paths)
            return
        previous = 0
        for chunk in sorted(chunks, key=lambda c: c.start):
            if (
                not previous <= chunk.start < chunk.stop <= num_rows
                or len(chunk.sums) != len(entries)
                or not all(isinstance(s, str) for s in chunk.sums)
                or not (chunk.data is None or isinstance(chunk.data, str))
            ):
                raise self._corrupt(str(self.header_path), "inconsistent chunks")
            previous = chunk.stop
            self.chunks[chunk.start] = chunk
        self.starts = sorted(self.chunks)
        self.header = header
        self.complete = bool(header.get("complete")) and self.rows_done == num_rows

    def _check_file(self, entry: dict[str, Any], num_rows: int) -> None:
        try:
            path = self.directory / str(entry["file"])
            shape, dtype = list(entry["shape"]), str(entry["dtype"])
        except (KeyError, TypeError) as err:
            raise self._corrupt(str(self.header_path), err) from err
        if not _no_link(path):
            raise ValueError(f"cache: {path} is missing; delete {self.directory} to recompute")
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as err:  # a damaged .npy header fails in many ways (TokenError...)
            raise self._corrupt(str(path), f"{type(err).__name__}: {err}") from err
        if list(array.shape) != shape or str(array.dtype) != dtype or shape[:1] != [num_rows]:
            raise self._corrupt(str(path), f"shape {array.shape} / {array.dtype} != header")
        if not array.flags.c_contiguous:  # 'fortran_order': the same bytes, other values
            raise self._corrupt(str(path), "not in C order")
        del array

    def _discard(self, paths: Iterable[Path]) -> None:
        """Delete an outdated cache's files (names already checked by `_plain_file`)."""
        self.header_path.unlink(missing_ok=True)
        for path in paths:
            if _no_link(path):
                path.unlink()

    # ------------------------------------------------------------------ chunks

    @property
    def rows_done(self) -> int:
        """End of the run of chunks that starts at row 0 (what a resume skips)."""
        rows = 0
        while rows in self.chunks:
            rows = self.chunks[rows].stop
        return rows

    def spans(self) -> list[tuple[int, int]]:
        """Row ranges of the recorded chunks, in order."""
        return [(s, self.chunks[s].stop) for s in self.starts]

    def lookup(self, start: int, stop: int) -> _Chunk | None:
        chunk = self.chunks.get(start)
        return chunk if chunk is not None and chunk.stop == stop else None

    def _entries(self) -> list[dict[str, Any]]:
        if self.header is None:
            return []
        entries = [self.header["files"][name] for name in self.names]
        return entries + ([self.header["labels"]] if self.header["labels"] else [])

    def _layout(self) -> None:
        if self.offsets:
            return
        for entry in self._entries():
            dtype = np.dtype(entry["dtype"])
            self.offsets.append(_data_offset(self.directory / entry["file"]))
            self.row_bytes.append(int(np.prod(entry["shape"][1:], dtype=np.int64)) * dtype.itemsize)
            self.dtypes.append(dtype)

    def _open_fds(self, flags: int) -> list[int]:
        fds = []
        try:
            for entry in self._entries():
                path = self.directory / entry["file"]
                _no_link(path)
                fds.append(os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def verify(self, chunk: _Chunk) -> str | None:
        """None if every file's rows match their checksum, else the first bad file."""
        self._layout()
        if not self._read_fds:
            self._read_fds = self._open_fds(os.O_RDONLY)
        for entry, fd, offset, row_bytes, expected in zip(
            self._entries(), self._read_fds, self.offsets, self.row_bytes, chunk.sums, strict=True
        ):
            size = (chunk.stop - chunk.start) * row_bytes
            data = os.pread(fd, size, offset + chunk.start * row_bytes)
            h = _TreeHash()
            h.update(data)
            if len(data) != size or h.hexdigest() != expected:
                return str(entry["file"])
        return None

    def corrupt_rows(self, chunk: _Chunk, file: str) -> ValueError:
        return self._corrupt(
            str(self.directory / file), f"checksum mismatch in rows {chunk.start}..{chunk.stop}"
        )

    # ------------------------------------------------------------------ writing

    def _create(self, outputs: list[np.ndarray], labels: np.ndarray | None) -> None:
        """Write a header that records no rows, then allocate the files it names.

        A run killed in between leaves a header without chunks, whose files the next run
        deletes before starting afresh (`_load`); a file that no header names (someone
        else's ``labels.npy``) is never replaced.
        """
        num_rows = int(self.key["num_rows"])
        samples = {f"features_{i}.npy": sample for i, sample in enumerate(outputs)}
        if labels is not None:
            samples["labels.npy"] = labels
        for file, sample in samples.items():
            if os.path.lexists(self.directory / file):
                raise _foreign(self.directory / file)
            if sample.dtype.hasobject:
                what = "labels" if file == "labels.npy" else "layers"
                raise TypeError(
                    f"{what}: Python objects (dtype object) cannot be cached without "
                    "pickling, which the cache never does; give numeric or string labels, "
                    "or pass cache=None"
                )
        entries = {
            file: {"file": file, "shape": [num_rows, *s.shape[1:]], "dtype": str(s.dtype)}
            for file, s in samples.items()
        }
        self.header = {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.key,
            "layers": self.names,
            "files": {name: entries[f"features_{i}.npy"] for i, name in enumerate(self.names)},
            "labels": entries.get("labels.npy"),
            "num_rows": num_rows,
            "batch_size": self.batch_size,
            "rows_done": 0,
            "complete": False,
            "chunks": [],
        }
        try:
            self._write_header()
        except BaseException:
            self.header = None
            raise
        for file, sample in samples.items():
            shape = (num_rows, *sample.shape[1:])
            # rows are written, then synced before the header says complete: no fsync here
            with atomic_path(self.directory / file, fsync=False) as tmp:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=sample.dtype, shape=shape)
                del array

    def _detach(self) -> None:
        """Give a complete cache's files new inodes and mark it incomplete.

        Called before changing a complete cache: arrays returned earlier map the old
        inodes, and must not change under their holders.
        """
        self._close_fds()
        for entry in self._entries():
            path = self.directory / entry["file"]
            with atomic_path(path, fsync=False) as tmp:
                shutil.copyfile(path, tmp, follow_symlinks=False)
        self.complete = False
        self.header = dict(self.header or {}, complete=False)
        # On disk too, before any row changes: a run killed before its next header save
        # must find rows that fail their checksum in an incomplete cache (recomputed),
        # not in a complete one (an error).
        self._write_header()

    def write(
        self,
        start: int,
        outputs: list[np.ndarray],
        labels: np.ndarray | None,
        data: str | None,
    ) -> None:
        """Store rows ``start..start + len(outputs[0])`` as one chunk."""
        try:
            if self.header is None:
                self._create(outputs, labels)
            elif self.complete:
                self._detach()
            if not self._write_fds:
                self._write_fds = self._open_fds(os.O_RDWR)
            self._layout()
        except OSError as err:
            raise _cannot_write(self.directory, err) from err
        columns = [*outputs, labels] if labels is not None else outputs
        if len(columns) != len(self._write_fds):
            raise ValueError("data: some batches carry labels and others do not")
        stop = start + int(outputs[0].shape[0])
        if stop > int(self.key["num_rows"]):
            raise ValueError(
                f"data: yielded more than the {self.key['num_rows']} samples it declares"
            )
        whats = [f"layers: {name!r}" for name in self.names] + ["labels"]
        for what, entry, dtype, column in zip(
            whats, self._entries(), self.dtypes, columns, strict=False
        ):
            like = np.empty((0, *entry["shape"][1:]), dtype)
            _check_fits(what, (start, stop), column, like)
        self._drop(start, stop)
        self.dirty = True
        sums = []
        for fd, offset, row_bytes, dtype, column in zip(
            self._write_fds, self.offsets, self.row_bytes, self.dtypes, columns, strict=True
        ):
            block = np.ascontiguousarray(column, dtype=dtype)
            if block.nbytes != row_bytes * block.shape[0] or block.shape[0] != stop - start:
                raise ValueError("cache: a batch's feature shape differs from the cached shape")
            raw = memoryview(block.reshape(-1).view(np.uint8).data)
            try:
                written = os.pwrite(fd, raw, offset + start * row_bytes)
                while written < raw.nbytes:
                    written += os.pwrite(fd, raw[written:], offset + start * row_bytes + written)
            except OSError as err:
                raise _cannot_write(self.directory, err) from err
            h = _TreeHash()
            h.update(raw)
            sums.append(h.hexdigest())
        self.chunks[start] = _Chunk(start, stop, data, sums)
        bisect.insort(self.starts, start)
        # At most once a second, and at most ~5% of the time even when the header is long.
        wait = max(_HEADER_INTERVAL_S, _HEADER_COST_FACTOR * self.save_cost)
        if time.monotonic() - self.last_save >= wait:
            self.save()

    def _drop(self, start: int, stop: int) -> None:
        """Forget the chunks that overlap rows ``[start, stop)``."""
        index = bisect.bisect_left(self.starts, stop) - 1
        while index >= 0 and self.chunks[self.starts[index]].stop > start:
            del self.chunks[self.starts.pop(index)]
            index -= 1

    def reset(self) -> None:
        """Forget every chunk (the files stay and are overwritten)."""
        self.chunks, self.starts = {}, []
        if self.complete:
            self._detach()

    def _write_header(self) -> None:
        assert self.header is not None
        self.header["chunks"] = [self.chunks[s].to_json() for s in self.starts]
        self.header["rows_done"] = self.rows_done
        began = time.monotonic()
        try:
            write_json_atomic(self.header_path, self.header, separators=(",", ":"))
        except OSError as err:
            raise _cannot_write(self.directory, err) from err
        self.last_save = time.monotonic()
        self.save_cost = self.last_save - began

    def save(self, *, complete: bool = False) -> None:
        """Record the chunks written so far in the header (after an fsync when complete)."""
        if self.header is None or not self.dirty:
            return
        if complete:
            fds = self._write_fds or self._open_fds(os.O_RDONLY)
            try:
                for fd in fds:
                    os.fsync(fd)
            except OSError as err:
                raise _cannot_write(self.directory, err) from err
            finally:
                if fds is not self._write_fds:
                    for fd in fds:
                        os.close(fd)
            self.header["complete"] = self.complete = True
        self._write_header()
        if complete:
            self.dirty = False

    # ------------------------------------------------------------------ closing

    def _close_fds(self) -> None:
        while self._read_fds:
            os.close(self._read_fds.pop())
        while self._write_fds:
            os.close(self._write_fds.pop())

    def close(self) -> None:
        self._close_fds()
        self.offsets, self.row_bytes, self.dtypes = [], [], []
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    def result(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        loaded = []
        for entry in self._entries():
            path = self.directory / entry["file"]
            _no_link(path)
            loaded.append(np.load(path, mmap_mode="c"))
        arrays, labels = loaded[: len(self.names)], loaded[len(self.names) :]
        return arrays, (labels[0] if labels else None)
