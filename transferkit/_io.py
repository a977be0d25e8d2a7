"""Atomic file writes: a temporary file in the destination's folder, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves any older file at
the destination intact. Every writer of the library goes through [`atomic_path`][]:
bytes, JSON, ``.npy`` arrays, ``torch.save`` objects, figures and preallocated memory maps.

The temporary file is ``.<name>.<pid>.<n>.tmp`` next to the destination, created
exclusively (``O_EXCL``) and never through a symbolic link (``O_NOFOLLOW``), so two threads
or processes never share one, and a leftover of a killed run can be recognised by its name
(see [`is_temporary_of`][]). The data is ``fsync``-ed before the rename unless the caller
opts out (e.g. a sparse memory map whose rows are written and synced later).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_writer",
    "is_temporary_of",
    "save_npy_atomic",
    "torch_save_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
]

_COUNTER = itertools.count()
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.[0-9]+(?:\.[0-9]+)?\.tmp")


def _create_temporary(path: Path) -> Path:
    """A new, empty, exclusively created temporary file next to ``path``."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_COUNTER)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
        except FileExistsError:  # a leftover of an earlier process with the same pid
            continue
        os.close(fd)
        return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    On an exception inside the block the temporary file is removed and ``path`` is left as
    it was. The parent folder must exist.

    Args:
        path: the destination file.
        fsync: flush the temporary file to disk before the rename.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> target.read_text()
        'hello'
    """
    destination = Path(path)
    tmp = _create_temporary(destination)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[IO[bytes]]:
    """Yield a binary file handle; on success its content replaces ``path`` atomically.

    Args:
        path: the destination file.
        fsync: flush the data to disk before the rename.
    """
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as handle:
        yield handle
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path, fsync=fsync) as handle:
        handle.write(data)


def write_json_atomic(
    path: str | os.PathLike[str], payload: Any, *, fsync: bool = True, **dump_kwargs: Any
) -> None:
    """Write ``payload`` as UTF-8 JSON to ``path`` atomically (``dump_kwargs`` go to ``json``)."""
    write_bytes_atomic(path, json.dumps(payload, **dump_kwargs).encode("utf-8"), fsync=fsync)


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray, *, fsync: bool = True) -> None:
    """Write ``array`` as a ``.npy`` file to ``path`` atomically (no pickled objects)."""
    with atomic_writer(path, fsync=fsync) as handle:
        np.save(handle, array, allow_pickle=False)


def torch_save_atomic(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` atomically; read it back with ``weights_only=True``."""
    import torch

    with atomic_writer(path, fsync=fsync) as handle:
        torch.save(obj, handle)


def is_temporary_of(name: str, accept: Callable[[str], bool]) -> bool:
    """Whether ``name`` is a temporary file of an atomic write to a file ``accept`` allows.

    Used to clean up leftovers of killed runs without touching anything else.
    """
    match = _TEMPORARY.fullmatch(name)
    return match is not None and accept(match["name"])
