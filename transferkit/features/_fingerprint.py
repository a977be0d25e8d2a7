"""Fingerprints for the feature cache: every byte of the input and of the model.

* `_TreeHash` streams bytes through ``hashlib.blake2b`` without copying them (4 MiB
  leaves hashed in parallel threads, so the digest is independent of how the bytes were
  fed and of the number of threads).
* `_update_tensor` feeds a tensor's logical content (independent of its strides);
  `_batch_digest` feeds a whole batch as the data source yielded it (containers walked
  with `transferkit._batch`, objects by their fields).
* `_model_fingerprint` covers the weights, buffers, module types, ``repr``, the code of
  every module class and each module's own attributes (numbers, tensors, containers by
  value; not those its ``forward`` assigns).
"""

from __future__ import annotations

import dis
import functools
import hashlib
import logging
import os
import re
import threading
import time
import types
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._batch import children

logger = logging.getLogger("transferkit.features")

_LEAF_BYTES = 1 << 22  # tree-hash leaf: 4 MiB
_CHUNK_BYTES = 1 << 24  # non-contiguous / device tensors are hashed 16 MiB at a time
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
