"""The on-disk feature cache of [`transferkit.extract_features`][] (private).

* Hashing: `_TreeHash` streams bytes through ``hashlib.blake2b`` without copying
  them (4 MiB leaves hashed in parallel threads, so the digest is independent of how the
  bytes were fed and of the number of threads); `_update_tensor` feeds a tensor's
  logical content (independent of its strides); `_model_fingerprint` covers the
  weights, buffers, module types, ``repr``, the code of every module class, each module's
  own attributes (numbers, tensors, containers by value; not those its ``forward``
  assigns).
* `_CacheSink`: preallocated ``.npy`` files filled with positioned writes, an
  atomically rewritten JSON header that records, for every chunk of rows written, a
  digest of the input batch and a checksum of the stored rows, and a lock file that
  serialises the processes (and threads) using the same folder.

Only plain file names that this module creates (``features_<i>.npy``, ``labels.npy``,
``header.json``, ``.lock`` and ``.<name>.<pid>[.<n>].tmp``) are ever opened, replaced or
deleted, always inside the cache folder and never through a symbolic link.
"""

from __future__ import annotations

import bisect
import dis
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._batch import children
from ._io import atomic_path, is_temporary_of, write_json_atomic

logger = logging.getLogger("transferkit.features")

_FORMAT = "transferkit-features"
_VERSION = 2
_HEADER = "header.json"
_LOCK = ".lock"
_HEADER_INTERVAL_S = 1.0  # the header is saved at most this often...
_HEADER_COST_FACTOR = 20.0  # ...and at most this many times less often than it takes
_LEAF_BYTES = 1 << 22  # tree-hash leaf: 4 MiB
_CHUNK_BYTES = 1 << 24  # non-contiguous / device tensors are hashed 16 MiB at a time
_DATA_NAME = re.compile(r"(features_[0-9]{1,6}|labels)\.npy")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _is_cache_file(name: str) -> bool:
    return name == _HEADER or _DATA_NAME.fullmatch(name) is not None


# --------------------------------------------------------------------------- hashing

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor | None:
    """Threads for leaf hashes (hashlib releases the GIL); None on a single core."""
    global _pool
    workers = min(8, os.cpu_count() or 1)
    if workers < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="transferkit-hash")
        return _pool


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _leaf_digest(view: memoryview) -> bytes:
    return hashlib.blake2b(view, digest_size=32).digest()


class _TreeHash:
    """blake2b over a byte stream, cut into 4 MiB leaves hashed in parallel.

    The digest is ``blake2b(leaf digests..., total length)``; it depends only on the bytes
    fed, not on how they were split between ``update`` calls or on the number of threads.
    Buffers are read through memoryviews (no copies), except the part of a leaf that
    straddles two ``update`` calls.
    """

    def __init__(self) -> None:
        self._outer = hashlib.blake2b(digest_size=16)
        self._leaf = hashlib.blake2b(digest_size=32)
        self._fill = 0
        self._total = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        size = view.nbytes
        self._total += size
        pos = 0
        if self._fill:
            pos = min(_LEAF_BYTES - self._fill, size)
            self._leaf.update(view[:pos])
            self._fill += pos
            if self._fill == _LEAF_BYTES:
                self._outer.update(self._leaf.digest())
                self._leaf, self._fill = hashlib.blake2b(digest_size=32), 0
        end = pos + (size - pos) // _LEAF_BYTES * _LEAF_BYTES
        if end > pos:
            leaves = [view[i : i + _LEAF_BYTES] for i in range(pos, end, _LEAF_BYTES)]
            pool = _hash_pool() if len(leaves) > 1 else None
            for digest in pool.map(_leaf_digest, leaves) if pool else map(_leaf_digest, leaves):
                self._outer.update(digest)
        if end < size:
            self._leaf.update(view[end:])
            self._fill += size - end

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._fill:
            outer.update(self._leaf.digest())
        outer.update(self._total.to_bytes(8, "little"))
        return outer.hexdigest()


def _as_bytes(t: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor, as a uint8 array sharing its memory."""
    return np.asarray(t.reshape(-1).view(torch.uint8).numpy())


def _feed(h: _TreeHash, t: Tensor) -> None:
    """Feed ``t``'s elements in logical (row-major) order, copying at most 16 MiB at once."""
    if t.device.type == "cpu" and t.is_contiguous():
        h.update(_as_bytes(t))
        return
    row_bytes = t[0].numel() * t.element_size()
    if t.dim() > 1 and row_bytes > _CHUNK_BYTES:
        for row in t:
            _feed(h, row)
        return
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for i in range(0, int(t.shape[0]), step):
        h.update(_as_bytes(t[i : i + step].contiguous().cpu()))


def _update_tensor(h: _TreeHash, t: Tensor) -> None:
    """Feed dtype, shape and every element of ``t`` (strides and memory format ignored)."""
    t = t.detach()
    h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
    if t.device.type == "meta":
        h.update(b"meta")
        return
    if t.layout == torch.sparse_coo:
        t = t.coalesce()
        _update_tensor(h, t.indices())
        _update_tensor(h, t.values())
        return
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            h.update(f"{t.qscheme()}{t.q_scale()!r}{t.q_zero_point()}".encode())
        else:
            h.update(f"{t.qscheme()}{t.q_per_channel_axis()}".encode())
            _update_tensor(h, t.q_per_channel_scales())
            _update_tensor(h, t.q_per_channel_zero_points())
        t = t.int_repr()
    t = t.resolve_conj().resolve_neg()
    if t.numel() == 0:
        return
    _feed(h, t.reshape(1) if t.dim() == 0 else t)


def _object_repr(value: Any, *, strip: bool = True) -> str:
    """``repr(value)`` without memory addresses; one that raises is never equal twice."""
    try:
        text = repr(value)
    except Exception as err:  # whatever it raised: a unique text, so never a stale reuse
        logger.warning(
            "cache: repr() of a %s failed (%s: %s), so every call recomputes the features",
            type(value).__qualname__,
            type(err).__name__,
            err,
        )
        return f"<unrepresentable {time.time_ns()} {os.urandom(8).hex()}>"
    return _ADDRESS.sub(" at 0x?", text) if strip else text


def _update_item(h: _TreeHash, item: Any, depth: int = 8) -> None:
    """Feed a batch or dataset item: tensors, arrays, containers, objects' fields.

    Dataclasses and other objects are fed by their fields (``vars``), ``depth`` levels
    deep, never by a ``repr`` alone where fields exist: a tensor's ``repr`` elides most of
    its values. Objects without fields are fed by their ``repr`` (a memory address in it
    makes every run recompute).
    """
    depth -= 1
    if isinstance(item, Tensor):
        _update_tensor(h, item)
    elif isinstance(item, np.ndarray) or hasattr(item, "__array_interface__"):
        array = np.asarray(item)
        if array.dtype == object:
            h.update(b"O")
            for value in array.reshape(-1):
                _update_item(h, value, depth)
            return
        h.update(f"A{array.dtype.str}{array.shape}|".encode())
        h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    elif (node := children(item)) is not None and (node[0] != "dataclass" or depth > 0):
        kind, items = node
        if kind == "dataclass":
            h.update(f"{type(item).__module__}.{type(item).__qualname__}|".encode())
            _update_item(h, dict(items), depth)
        elif kind == "mapping":
            h.update(f"D{len(items)}|".encode())
            for key, value in items:
                h.update(f"{key!r}:".encode())
                _update_item(h, value, depth)
        else:
            h.update(f"L{len(items)}|".encode())
            for _, value in items:
                _update_item(h, value, depth)
    elif isinstance(item, (str, bytes, int, float, complex, bool)) or item is None:
        h.update(f"{type(item).__name__}:{item!r}|".encode())
    elif (
        depth > 0
        and not isinstance(item, type)
        and isinstance(getattr(item, "__dict__", None), dict)
    ):
        h.update(f"{type(item).__module__}.{type(item).__qualname__}|".encode())
        _update_item(h, dict(sorted(vars(item).items())), depth)
    else:  # no fields: the repr (a memory address in it makes every run recompute)
        h.update(f"{type(item).__qualname__}:{_object_repr(item, strip=False)}|".encode())


def _batch_digest(batch: Any) -> str:
    """Digest of one batch exactly as the data source yielded it (inputs and labels)."""
    h = _TreeHash()
    _update_item(h, batch)
    return h.hexdigest()


def _update_code(h: _TreeHash, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(("|".join(code.co_names) + "#" + "|".join(code.co_varnames)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _update_code(h, const)
        elif isinstance(const, frozenset):
            h.update(repr(sorted(repr(c) for c in const)).encode())
        else:
            h.update(repr(const).encode())


def _update_class(h: _TreeHash, cls: type, seen: set[type]) -> None:
    """Feed the code of the methods a module class defines (and its bases up to Module)."""
    for klass in cls.__mro__:
        if klass in seen or klass is nn.Module or klass is object:
            continue
        seen.add(klass)
        h.update(f"C{klass.__module__}.{klass.__qualname__}|".encode())
        for name, value in sorted(vars(klass).items()):
            function = getattr(value, "__func__", value)
            code = getattr(function, "__code__", None)
            if isinstance(code, types.CodeType):
                h.update(name.encode())
                _update_code(h, code)


_MODULE_KEYS = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping attributes
_VALUE_DEPTH = 4


def _update_function(h: _TreeHash, function: Any, depth: int) -> None:
    """Feed a function's name, code, defaults and the values its closure captured."""
    h.update(f"F{getattr(function, '__qualname__', type(function).__qualname__)}|".encode())
    code = getattr(function, "__code__", None)
    if isinstance(code, types.CodeType):
        _update_code(h, code)
    for name in ("__defaults__", "__kwdefaults__"):
        _update_value(h, getattr(function, name, None), depth)
    for cell in getattr(function, "__closure__", None) or ():
        try:
            _update_value(h, cell.cell_contents, depth)
        except ValueError:  # an empty cell
            h.update(b"<empty>")


def _update_value(h: _TreeHash, value: Any, depth: int) -> None:
    """Feed a module attribute: numbers, strings, tensors, arrays, containers, functions.

    Containers and closures are followed ``_VALUE_DEPTH`` levels deep; a module is fed by
    its type, parameters and buffers; anything else by its type and ``repr`` (memory
    addresses removed).
    """
    depth -= 1
    if value is None or isinstance(value, (str, bytes, int, float, complex, bool)):
        h.update(f"{type(value).__name__}:{value!r}|".encode())
    elif isinstance(value, Tensor):
        _update_tensor(h, value)
    elif isinstance(value, np.ndarray) and value.dtype != object:
        _update_item(h, value)
    elif depth <= 0:
        h.update(f"{type(value).__qualname__}:{_object_repr(value)}|".encode())
    elif isinstance(value, nn.Module):
        h.update(f"M{type(value).__module__}.{type(value).__qualname__}|".encode())
        for name, tensor in [*value.named_parameters(), *value.named_buffers()]:
            h.update(f"{name}|".encode())
            _update_tensor(h, tensor)
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _update_value(h, key, depth)
            _update_value(h, item, depth)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{type(value).__qualname__}{len(value)}|".encode())
        for item in value:
            _update_value(h, item, depth)
    elif isinstance(value, (set, frozenset)):  # in a stable order (set order is per process)
        h.update(repr(sorted(_ADDRESS.sub(" at 0x?", repr(v)) for v in value)).encode())
    elif isinstance(value, (types.FunctionType, types.MethodType)):
        _update_function(h, value, depth)
    elif isinstance(value, functools.partial):
        h.update(b"partial|")
        _update_value(h, value.func, depth)
        _update_value(h, value.args, depth)
        _update_value(h, value.keywords, depth)
    else:
        h.update(f"{type(value).__qualname__}:{_object_repr(value)}|".encode())


def _stored_names(code: types.CodeType, names: set[str]) -> None:
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("STORE_ATTR", "DELETE_ATTR"):
            names.add(str(instruction.argval))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _stored_names(const, names)


@functools.lru_cache(maxsize=1024)
def _forward_state(cls: type) -> frozenset[str]:
    """Attribute names that ``cls.forward`` assigns (state, not configuration).

    A call counter or a lazily built cache changes at every call, which must not make
    every call recompute; such attributes are left out of the fingerprint.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        code = getattr(vars(klass).get("forward"), "__code__", None)
        if isinstance(code, types.CodeType):
            _stored_names(code, names)
    return frozenset(names)


def _update_module_state(h: _TreeHash, module: nn.Module) -> None:
    """Feed a module's own attributes (``self.scale = 2.0``, a plain tensor).

    Except the ones its ``forward`` assigns and ``nn.Module``'s own bookkeeping.
    """
    module_class: type = type(module)  # as `type`: mypy finds nn.Module's __hash__ unhashable
    state = _forward_state(module_class)
    for key, value in sorted(vars(module).items()):
        if key in _MODULE_KEYS or key in state or key.startswith("_torchdynamo"):
            continue  # (torch.compile's wrapper ids differ from process to process)
        h.update(f"A{key}=".encode())
        _update_value(h, value, _VALUE_DEPTH)


def _model_fingerprint(model: nn.Module) -> str:
    """Hash of the model's structure (types, repr, code, attributes) and tensors."""
    h = _TreeHash()
    h.update(_object_repr(model).encode())
    seen: set[type] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        h.update(f"M{name}:{cls.__module__}.{cls.__qualname__}|".encode())
        _update_class(h, cls, seen)
        _update_module_state(h, module)
    for name, param in model.named_parameters(remove_duplicate=False):
        h.update(f"P{name}|".encode())
        _update_tensor(h, param)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        h.update(f"B{name}|".encode())
        _update_tensor(h, buffer)
    return h.hexdigest()


# --------------------------------------------------------------------------- files


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
            self._lock()
            self._clean_tmp()
            self._load()
            if self.header is None:  # about to create the files: never replace someone's
                for entry in os.scandir(self.directory):
                    if _DATA_NAME.fullmatch(entry.name):
                        raise _foreign(Path(entry.path))
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """Hold an exclusive ``flock`` on ``.lock`` until `close` (waits for others)."""
        path = self.directory / _LOCK
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
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("cache: %s is in use by another extraction; waiting", self.directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd

    def _clean_tmp(self) -> None:
        """Remove temp files left by a killed run (we hold the lock, so none is live)."""
        if self._lock_fd is None:
            return
        for entry in os.scandir(self.directory):
            if is_temporary_of(entry.name, _is_cache_file) and not entry.is_dir(
                follow_symlinks=False
            ):
                logger.info("cache: removing %s left by an interrupted run", entry.path)
                Path(entry.path).unlink(missing_ok=True)

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
            changed = sorted(k for k in self.key if stored_key.get(k) != self.key[k])
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
