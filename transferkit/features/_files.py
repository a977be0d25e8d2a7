"""The cache folder: its own file names, its lock, and checks of what is found in it.

Only plain file names that the cache creates (``features_<i>.npy``, ``labels.npy``,
``header.json``, ``.lock`` and the atomic writer's ``.<name>.<pid>[.<n>].tmp``) are ever
opened, replaced or deleted, always inside the cache folder and never through a symbolic
link.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .._io import is_temporary_of

logger = logging.getLogger("transferkit.features")

_FORMAT = "transferkit-features"
_VERSION = 2
_HEADER = "header.json"
_LOCK = ".lock"
_DATA_NAME = re.compile(r"(features_[0-9]{1,6}|labels)\.npy")


def _is_cache_file(name: str) -> bool:
    return name == _HEADER or _DATA_NAME.fullmatch(name) is not None


def _data_offset(path: Path) -> int:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(handle)
        else:
            np.lib.format.read_array_header_2_0(handle)
        return handle.tell()


def _plain_file(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` if ``name`` is one of the cache's own file names, else raise."""
    if not isinstance(name, str) or not _DATA_NAME.fullmatch(name):
        raise ValueError(
            f"cache: {directory / _HEADER} names the file {name!r} for {what}; expected a "
            "plain file name of the form features_<i>.npy or labels.npy inside the cache "
            f"folder. Refusing to touch it: delete {directory} to recompute the features"
        )
    return directory / name


def _no_link(path: Path) -> bool:
    """True if ``path`` exists as a regular file; raise if it is a link or anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(
            f"cache: {path} is a symbolic link; the cache never follows links. "
            f"Remove it (or delete {path.parent}) to recompute the features"
        )
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"cache: {path} is not a regular file; delete it to recompute")
    return True


def _foreign(path: Path) -> ValueError:
    return ValueError(
        f"cache: {path} exists but is not part of a transferkit feature cache (no header "
        "written by transferkit records it), so it is left alone; pass a new or empty "
        "folder as cache"
    )


def _cannot_write(directory: Path, err: OSError) -> OSError:
    return type(err)(
        err.errno,
        f"cache: cannot write to {directory} ({err.strerror or err}); free some space, "
        "make the folder writable, or pass another cache folder (or cache=None)",
    )


def _check_fits(what: str, rows: tuple[int, int], new: np.ndarray, like: np.ndarray) -> None:
    """Raise unless batch rows ``new`` store into an array like ``like`` without loss."""
    if new.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{what}: rows {rows[0]}..{rows[1]} have shape {new.shape[1:]} per sample, but the "
            f"first batch gave {like.shape[1:]}; every batch must give the same shape (with "
            "pool=None, pad token sequences to one length or pool them)"
        )
    if new.dtype != like.dtype and not np.can_cast(new.dtype, like.dtype, "safe"):
        raise ValueError(
            f"{what}: rows {rows[0]}..{rows[1]} have dtype {new.dtype}, which does not fit the "
            f"{like.dtype} of the first batch without loss (e.g. longer strings); give every "
            "batch the same dtype (map string labels to integers), or pass cache=None"
        )


class _Chunk:
    """Rows ``[start, stop)`` written from one batch: input digest and per-file checksums."""

    __slots__ = ("data", "start", "stop", "sums")

    def __init__(self, start: int, stop: int, data: str | None, sums: list[str]) -> None:
        self.start, self.stop, self.data, self.sums = start, stop, data, sums

    def to_json(self) -> list[Any]:
        return [self.start, self.stop, self.data, self.sums]


def _acquire_lock(directory: Path) -> int | None:
    """An exclusive ``flock`` on ``directory/.lock`` (waits for other holders).

    Returns the descriptor (closing it releases the lock), or ``None`` in a read-only
    folder without a lock file (nobody can write there).
    """
    path = directory / _LOCK
    _no_link(path)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:  # a read-only folder: lock an existing file, or go on without (nobody writes)
            fd = os.open(path, os.O_RDONLY | flags)
        except FileNotFoundError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("cache: %s is in use by another extraction; waiting", directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_temporaries(directory: Path) -> None:
    """Remove the atomic writer's temp files of cache files left by a killed run."""
    for entry in os.scandir(directory):
        if is_temporary_of(entry.name, _is_cache_file) and not entry.is_dir(follow_symlinks=False):
            logger.info("cache: removing %s left by an interrupted run", entry.path)
            Path(entry.path).unlink(missing_ok=True)
