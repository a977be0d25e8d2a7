"""Input handling: tensors, arrays, dicts of tensors, Datasets and DataLoaders as batches.

A `_Source` yields the batches in order (slicing in-memory data so that rows a cache
already holds line up with its chunks) and describes the data for the cache key. Batches
are split into inputs and labels, cast to the model's dtype, pinned, put in
``channels_last`` and passed to the model here.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler

from .._batch import first_tensor, iter_tensors, map_tensors
from .._precision import as_compute
from .._validation import check_tensor
from ..device import dataloader_kwargs
from ._hooks import FeatureExtractor


@dataclasses.dataclass
class _Source:
    """Batches of the data, in order; ``describe`` is what the cache key records of it."""

    num_rows: int | None
    batches: Callable[[Sequence[tuple[int, int]]], Iterator[Any]]
    describe: Callable[[], dict[str, Any]]
    batch_size: int | None
    cacheable: str | None = None  # None when cacheable, else why not
    in_memory: bool = False  # tensors already in this process (pinned for CUDA copies)


def _rows_of(value: Any) -> int:
    tensor = first_tensor(value)
    if tensor is None or tensor.dim() == 0:
        raise ValueError("data: a batch holds no tensor with a sample dimension")
    return int(tensor.shape[0])


def _in_memory_source(data: Tensor | Mapping[str, Tensor], batch_size: int) -> _Source:
    columns = {"": data} if isinstance(data, Tensor) else dict(data)
    lengths = {int(c.shape[0]) if c.dim() else 0 for c in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"data: every tensor must have the same length, got {sorted(lengths)}")
    num_rows = lengths.pop()
    if num_rows == 0:
        raise ValueError("data: expected at least 1 sample, got 0")

    def batches(spans: Sequence[tuple[int, int]]) -> Iterator[Any]:
        # Batches of batch_size rows, except that rows a cache already holds as a chunk are
        # sliced exactly like that chunk (so they can be checked and skipped whatever the
        # batch size was when they were written).
        known = dict(spans)
        starts = sorted(known)
        i = 0
        while i < num_rows:
            stop = known.get(i)
            if stop is None:
                later = bisect.bisect_right(starts, i)
                limit = starts[later] if later < len(starts) else num_rows
                stop = min(i + batch_size, limit, num_rows)
            if isinstance(data, Tensor):
                yield data[i:stop]
            else:
                yield {key: value[i:stop] for key, value in columns.items()}
            i = stop

    def describe() -> dict[str, Any]:
        return {
            "kind": "tensor" if isinstance(data, Tensor) else "mapping",
            "columns": [[k, str(v.dtype), list(v.shape[1:])] for k, v in columns.items()],
        }

    return _Source(num_rows, batches, describe, batch_size, in_memory=True)


def _loader_rows(loader: DataLoader[Any]) -> int | None:
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or loader.batch_size is None:
        return None
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    return len(loader) * loader.batch_size if loader.drop_last else size


def _loader_source(loader: DataLoader[Any]) -> _Source:
    num_rows = _loader_rows(loader)
    reason: str | None = None
    if isinstance(loader.dataset, IterableDataset) or num_rows is None:
        reason = "needs a DataLoader over a map-style Dataset with a batch_size"
    elif not isinstance(loader.sampler, SequentialSampler):
        kind = type(loader.sampler).__name__
        reason = (
            f"the DataLoader's sampler is {kind}, so the order of the samples may change "
            "between runs and cached rows would not line up; pass shuffle=False (or the "
            "Dataset itself)"
        )

    def batches(spans: Sequence[tuple[int, int]]) -> Iterator[Any]:
        # Every batch is loaded, even those a cache holds: their digest is checked
        # against the stored one, so a changed item is never served from the cache.
        yield from loader

    def describe() -> dict[str, Any]:
        dataset = type(loader.dataset)
        return {
            "kind": "loader",
            "dataset": f"{dataset.__module__}.{dataset.__qualname__}",
            "length": len(loader.dataset),  # type: ignore[arg-type]
            "batch_size": loader.batch_size,
            "drop_last": loader.drop_last,
        }

    return _Source(num_rows, batches, describe, loader.batch_size, reason)


def _check_strided(tensor: Tensor, name: str) -> None:
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{name}: expected a dense tensor, got layout {tensor.layout}; convert it with "
            ".to_dense() (models take dense batches)"
        )


def _make_source(data: object, batch_size: int, device: torch.device) -> _Source:
    if isinstance(data, np.ndarray):
        if data.dtype == object:
            raise TypeError("data: expected a numeric array, got dtype object")
        array = data if data.flags.writeable else data.copy()
        data = torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(data, Tensor):
        _check_strided(data, "data")
        check_tensor(data, "data", min_samples=1)
        return _in_memory_source(data, batch_size)
    if isinstance(data, Mapping):
        if not data or not all(isinstance(v, Tensor) for v in data.values()):
            raise TypeError("data: a mapping must hold tensors, e.g. input_ids, attention_mask")
        for key, value in data.items():
            _check_strided(value, f"data[{key!r}]")
        return _in_memory_source(dict(data), batch_size)
    if isinstance(data, DataLoader):
        return _loader_source(data)
    if isinstance(data, Dataset):
        if not isinstance(data, IterableDataset) and len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("data: expected at least 1 sample, got an empty Dataset")
        kwargs = dataloader_kwargs(device)
        kwargs.update(persistent_workers=False)
        if not kwargs.get("num_workers"):
            kwargs.pop("prefetch_factor", None)
        return _loader_source(DataLoader(data, batch_size=batch_size, shuffle=False, **kwargs))
    raise TypeError(
        "data: expected a Tensor, ndarray, dict of tensors, Dataset or DataLoader, "
        f"got {type(data).__name__}"
    )


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)``; labels are None when the batch carries none."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels = inputs.pop("labels", inputs.pop("label", None))
        return inputs, labels
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        "data: expected batches that are a Tensor, a dict of tensors or an (inputs, labels) "
        f"pair, got {type(batch).__name__}"
    )


def _cast_floating(obj: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return obj
    return map_tensors(
        obj, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    )


def _to_numpy(t: Tensor) -> np.ndarray:
    # NumPy has no bfloat16: half precision leaves as fp32 (the shared compute rule).
    return np.asarray(as_compute(t.detach()).cpu().numpy())


def _labels_to_numpy(labels: Any) -> np.ndarray:
    if isinstance(labels, Tensor):
        return _to_numpy(labels)
    return np.asarray(labels)


def _pinned(obj: Any) -> Any:
    """CPU tensors of a batch in pinned memory (for asynchronous host-to-GPU copies)."""
    return map_tensors(
        obj, lambda t: t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
    )


def _channels_last(obj: Any) -> Any:
    """4-D floating tensors of a batch in ``torch.channels_last`` memory format."""
    return map_tensors(
        obj,
        lambda t: (
            t.contiguous(memory_format=torch.channels_last)
            if t.dim() == 4 and t.is_floating_point()
            else t
        ),
    )


def _storage(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _unshared(obj: Any, original: Any) -> Any:
    """``obj`` with every tensor that still shares memory with ``original`` cloned.

    In-memory data is batched by slicing, so a batch is a view of the caller's tensor (or
    of the array ``torch.from_numpy`` wrapped): a model that writes to its input in place
    (``x.relu_()``, ``x.sub_(mean)``) would change the caller's data. Tensors that a cast,
    a pinned copy or a device move already replaced are left as they are.
    """
    shared = {_storage(t) for t in iter_tensors(original) if not t.is_meta}
    return map_tensors(obj, lambda t: t.clone() if not t.is_meta and _storage(t) in shared else t)


def _call(extractor: FeatureExtractor, inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Mapping):
        out = extractor(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = extractor(*inputs)
    else:
        out = extractor(inputs)
    return list(out.values()) if isinstance(out, dict) else [out]
