"""Walking nested batches: tensors inside dicts, lists, tuples, namedtuples and dataclasses.

One definition of what a batch container is, used by [`to_device`][transferkit.to_device],
feature extraction (casting, pinning, ``channels_last``, finding a layer's output tensor),
``adapt_batchnorm`` and the feature cache's batch digests:

* a dataclass instance (every field; rebuilt with ``dataclasses.replace`` over its
  ``init`` fields, then its ``init=False`` fields are set to their mapped values, so a
  field filled in after construction is kept),
* a ``Mapping`` (``dict``, ``OrderedDict``, ``defaultdict`` with its ``default_factory``,
  Hugging Face ``BatchEncoding``; rebuilt with its own type when that type accepts a dict,
  else as a plain ``dict``),
* a ``namedtuple`` (rebuilt positionally),
* a ``list`` or ``tuple`` (rebuilt with its own type).

Anything else (tensors, arrays, strings, numbers, ``None``) is a leaf. Nothing is modified in
place: containers are rebuilt.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from torch import Tensor

__all__ = ["Kind", "children", "first_tensor", "iter_tensors", "map_tensors", "rebuild"]

Kind = Literal["dataclass", "mapping", "namedtuple", "sequence"]


def children(obj: Any) -> tuple[Kind, list[tuple[Any, Any]]] | None:
    """The container kind of ``obj`` and its ``(key, value)`` children; ``None`` for a leaf.

    Keys are field names (dataclass, namedtuple), mapping keys, or positions (sequence).
    """
    if isinstance(obj, Tensor):
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass", [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, Mapping):
        return "mapping", list(obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return "namedtuple", list(zip(obj._fields, obj, strict=True))
    if isinstance(obj, (list, tuple)):
        return "sequence", list(enumerate(obj))
    return None


def rebuild(obj: Any, kind: Kind, items: list[tuple[Any, Any]]) -> Any:
    """A new container like ``obj`` (of ``kind``, from [`children`][]) holding ``items``."""
    if kind == "dataclass":
        init = {f.name for f in dataclasses.fields(obj) if f.init}
        new = dataclasses.replace(obj, **{k: v for k, v in items if k in init})
        for key, value in items:
            if key not in init:  # set after construction: replace() would drop or reset it
                object.__setattr__(new, key, value)
        return new
    if kind == "mapping":
        values = dict(items)
        try:
            if isinstance(obj, defaultdict):  # its constructor takes the factory first
                return type(obj)(obj.default_factory, values)
            return type(obj)(values)
        except TypeError:
            return values
    if kind == "namedtuple":
        return type(obj)(*(v for _, v in items))
    return type(obj)(v for _, v in items)


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor ``t`` inside it replaced by ``fn(t)``; containers rebuilt.

    Example:
        >>> import torch
        >>> map_tensors({"x": torch.ones(2), "n": [1, torch.zeros(1)]}, lambda t: t + 1)
        {'x': tensor([2., 2.]), 'n': [1, tensor([1.])]}
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    node = children(obj)
    if node is None:
        return obj
    kind, items = node
    return rebuild(obj, kind, [(key, map_tensors(value, fn)) for key, value in items])


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside ``obj``, depth first, in container order."""
    if isinstance(obj, Tensor):
        yield obj
        return
    node = children(obj)
    if node is not None:
        for _, value in node[1]:
            yield from iter_tensors(value)


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor inside ``obj`` (e.g. a Hugging Face ``ModelOutput``), or ``None``."""
    return next(iter_tensors(obj), None)
