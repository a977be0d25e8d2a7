"""What comes out of a network: multi-layer features, batched extraction and a disk cache.

* [`FeatureExtractor`][] wraps any ``nn.Module`` and returns the outputs of several
  named layers from ONE forward pass, pooled to ``(N, D)`` if asked. Forward hooks are
  attached only while a forward call runs and are removed in a ``finally`` block, so the
  user's model never keeps a hook, even when the forward raises.
* [`extract_features`][] runs an extractor over a tensor, an array, a ``Dataset`` or a
  ``DataLoader`` in eval mode under ``torch.inference_mode`` and returns NumPy arrays,
  optionally cached on disk (resumable, reused only when the model and data match).
* [`masked_mean`][] pools token sequences while ignoring padding.

Under ``torchrun`` (an initialised ``torch.distributed`` process group),
[`extract_features`][] splits the data into contiguous per-rank shards (no padding
duplicates, [`transferkit.distributed.shard_indices`][]), extracts each shard on its
rank and merges the results in dataset order on every rank; with ``cache`` rank 0 writes
the merged cache while the other ranks wait at a barrier.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from tqdm.auto import tqdm

from . import _pooling
from ._batch import first_tensor, map_tensors
from ._feature_cache import _batch_digest, _CacheSink, _check_fits, _model_fingerprint
from ._feature_shard import _columns, _concat, _shard
from ._pooling import masked_mean
from ._validation import (
    check_bool,
    check_option,
    check_positive,
    check_tensor,
    did_you_mean,
)
from .device import autocast, dataloader_kwargs, resolve_device, to_device
from .distributed import get_rank, get_world_size, is_distributed

__all__ = ["FeatureExtractor", "extract_features", "masked_mean"]

logger = logging.getLogger(__name__)

PoolName = _pooling.PoolName
_POOLS = _pooling.POOLS


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run (early stop)."""


# --------------------------------------------------------------------------- pooling


def _pool(x: Tensor, mode: PoolName | None, mask: Tensor | None, layer: str) -> Tensor:
    """Pool ``x`` to ``(N, D)``; always returns a tensor that no later op can modify.

    ``(N, D)`` outputs are kept as they are (also for ``"avgmax"``), and the forward
    call's ``attention_mask`` applies only to the token sequences it fits.
    """
    if mode is None or x.dim() <= 2:
        return x.clone()
    fits = mask is not None and x.dim() == 3 and mask.dim() == 2 and mask.shape == x.shape[:2]
    use = mask if fits and mode != "token" else None
    return _pooling.pool(x, mode, mask=use, name=f"layer {layer!r}", copy=True)


def _check_layers(model: nn.Module, layers: object) -> tuple[str, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        names = [layers]
    elif isinstance(layers, Sequence):
        names = list(layers)
    else:
        raise TypeError(
            f"layers: expected a module name, a list of names or None, got {type(layers).__name__}"
        )
    if not names:
        raise ValueError("layers: expected at least one name; pass None for the model output")
    modules = dict(model.named_modules(remove_duplicate=False))
    modules.pop("", None)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layers: expected module names (str), got {type(name).__name__}")
        if name not in modules:
            depth = name.count(".")
            peers = [n for n in modules if n.count(".") == depth]
            hint = did_you_mean(name, peers) or did_you_mean(name, modules)
            if not hint:
                top = ", ".join(repr(n) for n, _ in model.named_children())
                hint = f"; its top-level modules are {top} (see model.named_modules())"
            raise ValueError(f"layers: {name!r} is not a module of {type(model).__name__}{hint}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers: each name may appear once, got {repeated} several times")
    return tuple(names)


# --------------------------------------------------------------------------- extractor


class FeatureExtractor(nn.Module):
    """Outputs of several named layers of any ``nn.Module`` from ONE forward pass.

    Layers are the names of ``model.named_modules()`` (``"layer3"``, ``"blocks.5"``,
    ``"encoder.layer.11"``). Forward hooks are attached at the start of each call and
    removed in a ``finally`` block, so no hook outlives a call, whether it returns or
    raises; the user's model is never modified. A module that returns a tuple, list,
    mapping or HF ``ModelOutput`` contributes its first tensor (e.g. the hidden states of
    a transformer block, ``last_hidden_state`` of a HF model). A module called several
    times in one pass contributes its last call.

    Pooling (``pool``) turns each output into ``(N, D)``:

    * feature maps ``(N, C, H, W)`` (or ``(N, C, D, H, W)``): ``"avg"``, ``"max"`` or
      ``"avgmax"`` (both, concatenated) over the spatial dimensions;
    * token sequences ``(N, T, D)``: ``"avg"`` (mean over tokens; when the forward call
      gets an ``attention_mask`` keyword, padding is ignored, see [`masked_mean`][]),
      ``"max"``, ``"avgmax"``, or ``"token"`` (the first, e.g. CLS, token);
    * ``(N, D)`` outputs are returned as they are; ``pool=None`` keeps every shape.

    Averages are computed in float32 even under autocast. Captured tensors are copies, so
    later in-place operations (``ReLU(inplace=True)``) cannot change them.

    Thread safety: one extractor may be called from several threads; calls are serialised
    by a lock held while its hooks are attached, and the hooks only record the forward
    pass of the thread that attached them (so another extractor, or the bare model,
    running in another thread at the same time is neither recorded nor disturbed).

    Args:
        model: any network.
        layers: ``None`` (the model's output), one name (returns a tensor) or a list of
            names (returns a dict in the order given).
        pool: ``"avg"``, ``"max"``, ``"avgmax"``, ``"token"`` or ``None``.
        early_stop: stop the forward pass once every requested layer has run, skipping
            the rest of the network. The first call runs the whole network and records
            how many times each layer runs; later calls stop after as many calls, so
            use it only when the control flow does not depend on the data.

    Shape:
        - Input: whatever ``model`` takes (positional and keyword arguments).
        - Output: ``(N, D)`` per layer when pooled.

    Raises:
        ValueError: for unknown layer names (with close matches), an empty or repeated
            list, or an unknown pooling mode.

    Examples:
        >>> import transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=10)
        >>> with tk.FeatureExtractor(net, ["features", "neck"]) as extractor:
        ...     out = extractor(torch.zeros(2, 1, 16, 16))
        >>> {name: tuple(t.shape) for name, t in out.items()}
        {'features': (2, 64), 'neck': (2, 128)}
        >>> tk.FeatureExtractor(net, "nek")
        Traceback (most recent call last):
        ...
        ValueError: layers: 'nek' is not a module of SmallCNN; did you mean 'neck'?
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        pool: PoolName | None = "avg",
        *,
        early_stop: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if pool is not None:
            check_option(pool, "pool", _POOLS)
        self.model = model
        self.layers = _check_layers(model, layers)
        self.pool: PoolName | None = pool
        self.early_stop = check_bool(early_stop, "early_stop")
        self._single = layers is None or isinstance(layers, str)
        self._closed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._calls_needed: dict[str, int] | None = None
        self._mask: Tensor | None = None
        self._lock = threading.RLock()
        self._owner: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._lock = threading.RLock()

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs, in order (``("output",)`` when ``layers`` is None)."""
        return ("output",) if self.layers is None else self.layers

    def extra_repr(self) -> str:
        """Layers and pooling, shown in ``repr``."""
        return f"layers={self.layers}, pool={self.pool!r}, early_stop={self.early_stop}"

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | dict[str, Tensor]:
        """Run ``model(*args, **kwargs)`` once and return the requested outputs."""
        with self._lock:  # one call at a time: the hooks and captures are per extractor
            self._owner = threading.get_ident()
            try:
                return self._forward(args, kwargs)
            finally:
                self._owner = None

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | dict[str, Tensor]:
        if self._closed:
            raise RuntimeError("FeatureExtractor: it was closed; create a new one")
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, Tensor) else None
        try:
            if self.layers is None:
                output = first_tensor(self.model(*args, **kwargs))
                if output is None:
                    raise ValueError("model: its output holds no tensor to extract")
                return _pool(output, self.pool, self._mask, "output")
            self._attach(self.layers)
            stopped = False
            try:
                self.model(*args, **kwargs)
            except _StopForward:
                stopped = True
            missing = [name for name in self.layers if name not in self._captured]
            if missing:
                raise ValueError(
                    f"layers: {missing} did not run during the forward pass; "
                    "are they used by the model's forward()?"
                )
            if self.early_stop and not stopped and self._calls_needed is None:
                self._calls_needed = dict(self._calls)
            captured = {name: self._captured[name] for name in self.layers}
        finally:
            self._detach()
            self._captured, self._calls, self._mask = {}, {}, None
        return captured[self.layers[0]] if self._single else captured

    def _attach(self, layers: tuple[str, ...]) -> None:
        self._detach()
        for name in layers:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if threading.get_ident() != self._owner:
                return  # the model running in another thread: not this call's pass
            tensor = first_tensor(output)
            if tensor is None:
                raise ValueError(
                    f"layers: {name!r} returned {type(output).__name__}, which holds no tensor"
                )
            self._captured[name] = _pool(tensor, self.pool, self._mask, name)
            self._calls[name] = self._calls.get(name, 0) + 1
            needed = self._calls_needed
            if needed is not None and all(self._calls.get(k, 0) >= v for k, v in needed.items()):
                raise _StopForward

        return hook

    def close(self) -> None:
        """Remove every hook (none is left between calls) and refuse further calls."""
        with self._lock:
            self._detach()
            self._closed = True

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- data sources


@dataclasses.dataclass
class _Source:
    """Batches of the data, in order; ``describe`` is what the cache key records of it."""

    num_rows: int | None
    batches: Callable[[Sequence[tuple[int, int]]], Iterator[Any]]
    describe: Callable[[], dict[str, Any]]
    batch_size: int | None
    cacheable: str | None = None  # None when cacheable, else why not


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

    return _Source(num_rows, batches, describe, batch_size)


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
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return np.asarray(t.cpu().numpy())


def _labels_to_numpy(labels: Any) -> np.ndarray:
    if isinstance(labels, Tensor):
        return _to_numpy(labels)
    return np.asarray(labels)


# --------------------------------------------------------------------------- sinks


class _MemorySink:
    """Rows gathered in preallocated arrays (or lists when the length is unknown)."""

    def __init__(self, num_rows: int | None, names: Sequence[str]) -> None:
        self.num_rows = num_rows
        self.names = list(names)
        self.arrays: list[np.ndarray] | None = None
        self.labels: np.ndarray | None = None
        self.parts: list[list[np.ndarray]] = []
        self.label_parts: list[np.ndarray] = []

    def write(self, start: int, outputs: list[np.ndarray], labels: np.ndarray | None) -> None:
        if self.num_rows is None:
            if not self.parts:
                self.parts = [[] for _ in outputs]
            for index, (part, out) in enumerate(zip(self.parts, outputs, strict=True)):
                if part and part[0].shape[1:] != out.shape[1:]:
                    rows = (start, start + out.shape[0])
                    _check_fits(f"layers: {self.names[index]!r}", rows, out, part[0])
                part.append(out)
            if labels is not None:
                self.label_parts.append(labels)
            return
        stop = start + outputs[0].shape[0]
        if stop > self.num_rows:
            raise ValueError(f"data: yielded more than the {self.num_rows} samples it declares")
        if self.arrays is None:
            self.arrays = [np.empty((self.num_rows, *o.shape[1:]), o.dtype) for o in outputs]
            if labels is not None:
                self.labels = np.empty((self.num_rows, *labels.shape[1:]), labels.dtype)
        for index, (array, out) in enumerate(zip(self.arrays, outputs, strict=True)):
            _check_fits(f"layers: {self.names[index]!r}", (start, stop), out, array)
            array[start:stop] = out
        if self.labels is not None and labels is not None:
            if labels.shape[1:] == self.labels.shape[1:] and labels.dtype != self.labels.dtype:
                # e.g. a later batch of longer string labels: widen, never truncate
                self.labels = self.labels.astype(np.result_type(self.labels, labels))
            _check_fits("labels", (start, stop), labels, self.labels)
            self.labels[start:stop] = labels

    def result(self, rows: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        if self.num_rows is None:
            arrays = [np.concatenate(part) for part in self.parts]
            labels = np.concatenate(self.label_parts) if self.label_parts else None
            return arrays, labels
        if rows != self.num_rows or self.arrays is None:
            raise ValueError(f"data: yielded {rows} samples, expected {self.num_rows}")
        return self.arrays, self.labels


# --------------------------------------------------------------------------- extraction


def _choose_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    if device is None or (isinstance(device, str) and device == "auto"):
        if len(devices) > 1:  # spread over devices: feed the first one, move nothing
            return next(model.parameters()).device
        if len(devices) == 1 and next(iter(devices)).type != "cpu":
            return next(iter(devices))
    return resolve_device(device)


def _check_not_meta(model: nn.Module, device: str | torch.device | None) -> None:
    """Meta tensors hold no data: refuse them before the model is touched."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    lazy = [n for n, t in tensors if nn.parameter.is_lazy(t)]
    if lazy:  # their first forward would change the modules' classes: not undoable
        raise ValueError(
            f"model: {lazy[0]!r} (and {len(lazy) - 1} more) is an uninitialised lazy "
            "parameter (nn.LazyLinear, nn.LazyConv2d, ...); run one forward pass on a batch "
            "(model(x)) to initialise it before extracting features"
        )
    on_meta = [n for n, t in tensors if t.is_meta]
    if on_meta:
        raise ValueError(
            f"model: {on_meta[0]!r} (and {len(on_meta) - 1} more) is on the meta device, so it "
            "holds no weights; materialise the model first (e.g. model.to_empty(device='cpu') "
            "and load_state_dict)"
        )
    if _choose_device(model, device).type == "meta":
        raise ValueError(
            f"device: {device!r} holds no data, so no features can be computed there; "
            "pass 'auto', 'cpu', 'cuda' or 'mps'"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return True


def _amp_dtype(amp: object) -> tuple[bool, torch.dtype | None]:
    if isinstance(amp, bool):
        return amp, None
    if isinstance(amp, torch.dtype) and amp in (torch.float16, torch.bfloat16):
        return True, amp
    raise TypeError(f"amp: expected a bool, torch.float16 or torch.bfloat16, got {amp!r}")


def _call(extractor: FeatureExtractor, inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Mapping):
        out = extractor(**inputs)
    elif isinstance(inputs, (list, tuple)):
        out = extractor(*inputs)
    else:
        out = extractor(inputs)
    return list(out.values()) if isinstance(out, dict) else [out]


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


def _cache_key(
    extractor: FeatureExtractor, amp: torch.dtype | None, enabled: bool, source: _Source
) -> dict[str, Any]:
    model = extractor.model
    return {
        "model": _model_fingerprint(model),
        "model_class": type(model).__qualname__,
        "layers": list(extractor.layers) if extractor.layers is not None else None,
        "pool": extractor.pool,
        "amp": str(amp) if enabled else None,
        "data": source.describe(),
        "num_rows": source.num_rows,
    }


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model: extractions of one model never overlap in time."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class _ModelGuard:
    """Puts the model in extraction state on first use and restores it exactly.

    `prepare` records every module's train/eval flag and the very tensor objects of
    every parameter (with its ``.grad``) and buffer, then sets ``training = False`` on
    every module directly (so an overridden ``train()`` cannot keep BatchNorm updating its
    statistics), moves the model, gives it copies of the buffers the move left in place
    (so in-place updates in ``forward`` do not reach the caller's) and applies
    ``channels_last``. `restore` also turns inference tensors that the forward stored on
    a module (a cache built on first use) into normal tensors. `restore` puts the
    recorded objects and flags back, so the model ends exactly as it started (same
    storage, device and dtype) whether the extraction returned or raised, even if a move
    failed half-way (e.g. to the ``meta`` device or out of memory).
    """

    def __init__(self, model: nn.Module, target: torch.device, channels_last: bool) -> None:
        self.model, self.target, self.channels_last = model, target, channels_last
        self.modes: list[tuple[nn.Module, bool]] | None = None
        self.params: list[tuple[nn.Module, str, nn.Parameter, Tensor, Any, Any]] = []
        self.buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []

    def prepare(self) -> None:
        if self.modes is not None:
            return
        model = self.model
        modules = list(model.modules())
        with torch.inference_mode(False):
            for module in modules:
                for name, p in module._parameters.items():
                    if p is not None:
                        grad = p.grad
                        self.params.append(
                            (module, name, p, p.data, grad, None if grad is None else grad.data)
                        )
                for name, b in module._buffers.items():
                    if b is not None:
                        self.buffers.append((module, name, b, b.data))
            self.modes = [(module, module.training) for module in modules]
            for module in modules:
                module.training = False
            devices = {t.device for t in [*model.parameters(), *model.buffers()]}
            original = next(iter(devices)) if len(devices) == 1 else None
            if original is not None and not _same_device(original, self.target):
                model.to(self.target)
            # The forward runs on copies of the buffers that were not moved, so a model that
            # updates a buffer in place even in eval mode (a counter, a running average)
            # leaves the caller's buffers as they were.
            copies: dict[int, Tensor] = {}
            for module, name, buffer, data in self.buffers:
                if module._buffers.get(name) is buffer and buffer.data_ptr() == data.data_ptr():
                    copy = copies.get(id(buffer))
                    if copy is None:
                        copy = copies[id(buffer)] = buffer.detach().clone()
                    module._buffers[name] = copy
            if self.channels_last:
                for tensor in [*model.parameters(), *model.buffers()]:
                    if tensor.dim() == 4:
                        tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)

    def restore(self) -> None:
        if self.modes is None:
            return
        with torch.inference_mode(False):
            for module, name, param, data, grad, grad_data in self.params:
                module._parameters[name] = param
                param.data = data
                if grad is not None:
                    grad.data = grad_data
                param.grad = grad
            for module, name, buffer, data in self.buffers:
                module._buffers[name] = buffer
                buffer.data = data
            for module, training in self.modes:
                module.training = training
                _no_inference_tensors(module)
        self.modes, self.params, self.buffers = None, [], []


def _normal_tensors(value: Any) -> Any:
    """``value`` with inference tensors (also in lists, tuples, dicts) cloned into normal ones."""
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (list, tuple)):
        items = [_normal_tensors(v) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return type(value)(items) if type(value) in (list, tuple) else value
        return value
    if type(value) is dict:
        fixed = {k: _normal_tensors(v) for k, v in value.items()}
        return fixed if any(fixed[k] is not value[k] for k in value) else value
    return value


def _no_inference_tensors(module: nn.Module) -> None:
    """Replace the inference tensors a forward stored on ``module`` by normal tensors.

    A lazily built cache assigned as an attribute or registered as a buffer during the
    extraction would otherwise make the model fail later under autograd ("Inference
    tensors cannot be saved for backward").
    """
    for store in (module.__dict__, module._buffers):
        for key, value in list(store.items()):
            if key in _GUARD_SKIP and store is module.__dict__:
                continue
            fixed = _normal_tensors(value)
            if fixed is not value:
                store[key] = fixed


_GUARD_SKIP = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping (hooks, dicts)


def _write_merged(sink: _CacheSink, source: _Source, merged: Any, names: Sequence[str]) -> None:
    """Store a merged (distributed) result in chunks aligned with ``source``'s batches."""
    sink.reset()
    outputs, labels = _columns(merged, names)
    rows = 0
    for batch in source.batches(()):
        count = _rows_of(_split_batch(batch)[0])
        stop = rows + count
        sink.write(
            rows,
            [out[rows:stop] for out in outputs],
            None if labels is None else labels[rows:stop],
            _batch_digest(batch),
        )
        rows = stop
    if rows != source.num_rows:
        raise ValueError(f"data: yielded {rows} samples, expected {source.num_rows}")
    sink.save(complete=True)


def _extract_sharded(
    extractor: FeatureExtractor,
    data: Any,
    cache: str | os.PathLike[str] | None,
    progress: bool,
    options: dict[str, Any],
) -> Any:
    """Each rank extracts its shard; the merged result is returned on every rank."""
    rank, world = get_rank(), get_world_size()
    names = list(extractor.output_names)
    sink: _CacheSink | None = None
    source: _Source | None = None
    try:
        if cache is not None:
            complete, failure = False, None
            if rank == 0:
                try:
                    amp_enabled, amp_dtype = _amp_dtype(options["amp"])
                    target = _choose_device(extractor.model, options["device"])
                    source = _make_source(data, options["batch_size"], target)
                    if source.cacheable is not None:
                        raise ValueError(f"cache: {source.cacheable}")
                    key = _cache_key(extractor, amp_dtype, amp_enabled, source)
                    sink = _CacheSink(Path(cache), names, key, source.batch_size)
                    sink.open()
                    complete = sink.complete
                except Exception as exc:
                    failure = exc
            flag: list[object] = [complete, None if failure is None else str(failure)]
            dist.broadcast_object_list(flag, src=0)  # every rank learns rank 0's outcome
            if failure is not None:
                raise failure
            if flag[1] is not None:
                raise ValueError(f"rank 0 failed to open the cache: {flag[1]}")
            if flag[0]:  # every rank reads (and verifies) the cache, one at a time
                if sink is not None:
                    sink.close()
                logger.info("cache: reusing %s on every rank", cache)
                return extract_features(
                    extractor, data, cache=cache, progress=False, distributed=False, **options
                )
        shard, length = _shard(data, rank, world)
        local = (
            extract_features(
                extractor,
                shard,
                progress=progress and rank == 0,
                distributed=False,
                **options,
            )
            if length
            else None
        )
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, local)
        present = [p for p in parts if p is not None]
        if not present:
            raise ValueError("data: expected at least 1 sample, got 0")
        merged = _concat(present)
        if cache is not None:  # rank 0 writes the merged result; the others wait for it
            failure = None
            if sink is not None and source is not None:
                try:
                    _write_merged(sink, source, merged, names)
                except Exception as exc:
                    failure = exc
                finally:
                    sink.close()
            status: list[object] = [None if failure is None else str(failure)]
            dist.broadcast_object_list(status, src=0)  # the barrier
            if failure is not None:
                raise failure
            if status[0] is not None:
                raise ValueError(f"rank 0 failed to write the cache: {status[0]}")
        return merged
    finally:
        if sink is not None:
            sink.close()


def _extract_local(
    extractor: FeatureExtractor,
    data: Any,
    *,
    batch_size: int,
    device: str | torch.device | None,
    amp: bool | torch.dtype,
    cache: str | os.PathLike[str] | None,
    progress: bool,
    channels_last: bool,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The single-process extraction (with or without a cache)."""
    amp_enabled, amp_dtype = _amp_dtype(amp)
    model = extractor.model
    target = _choose_device(model, device)
    source = _make_source(data, batch_size, target)
    names = list(extractor.output_names)
    sink: _CacheSink | None = None
    memory: _MemorySink | None = None
    if cache is not None:
        if source.cacheable is not None:
            raise ValueError(f"cache: {source.cacheable}")
        key = _cache_key(extractor, amp_dtype, amp_enabled, source)
        sink = _CacheSink(Path(cache), names, key, source.batch_size)
        sink.open()
        if sink.rows_done:
            logger.info("cache: checking the %d rows already in %s", sink.rows_done, cache)
    else:
        memory = _MemorySink(source.num_rows, names)

    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    pin = target.type == "cuda" and not isinstance(data, (DataLoader, Dataset))
    guard = _ModelGuard(model, target, channels_last)
    stale: list[tuple[int, int]] = []
    corrupt: list[tuple[int, int, str]] = []
    rows, computed = 0, 0
    bar = tqdm(
        total=source.num_rows,
        disable=not progress,
        unit="sample",
        desc="extract_features",
        leave=False,
    )
    try:
        has_labels: bool | None = None
        with torch.inference_mode(), autocast(target, dtype=amp_dtype, enabled=amp_enabled):
            for batch in source.batches(sink.spans() if sink is not None else ()):
                inputs, labels = _split_batch(batch)
                if has_labels is None:
                    has_labels = labels is not None
                elif has_labels != (labels is not None):
                    raise ValueError("data: some batches carry labels and others do not")
                count = _rows_of(inputs)
                if count == 0:  # e.g. a collate_fn that filtered out every sample
                    continue  # (an empty chunk would make the cache's header invalid)
                digest: str | None = None
                if sink is not None:
                    digest = _batch_digest(batch)
                    chunk = sink.lookup(rows, rows + count)
                    if chunk is not None and chunk.data == digest:
                        bad = sink.verify(chunk)
                        if bad is None:  # same input, stored rows intact: reuse them
                            rows += count
                            bar.update(count)
                            continue
                        if sink.complete:
                            raise sink.corrupt_rows(chunk, bad)
                        corrupt.append((rows, rows + count, bad))
                    elif chunk is not None:
                        stale.append((rows, rows + count))
                guard.prepare()
                inputs = _cast_floating(inputs, param_dtype)
                inputs = to_device(_pinned(inputs) if pin else inputs, target)
                if channels_last:
                    inputs = _channels_last(inputs)
                outputs = [_to_numpy(t) for t in _call(extractor, inputs)]
                label_array = _labels_to_numpy(labels) if labels is not None else None
                for name, out in zip(names, outputs, strict=True):
                    if out.ndim == 0 or out.shape[0] != count:
                        raise ValueError(
                            f"layers: {name!r} gave shape {out.shape} for a batch of {count}; "
                            "its first dimension must be the batch"
                        )
                if sink is not None:
                    sink.write(rows, outputs, label_array, digest)
                elif memory is not None:
                    memory.write(rows, outputs, label_array)
                rows += count
                computed += count
                bar.update(count)
        if sink is None:
            assert memory is not None
            return memory.result(rows)
        if rows != source.num_rows:
            raise ValueError(f"data: yielded {rows} samples, expected {source.num_rows}")
        if corrupt:
            start, stop, file = corrupt[0]
            logger.warning(
                "cache: %d chunk(s) of %s failed their checksum (first: rows %d..%d of %s) "
                "and were recomputed",
                len(corrupt),
                cache,
                start,
                stop,
                file,
            )
        if stale:
            logger.warning(
                "cache: the data of %d chunk(s) of %s changed since they were cached (first: "
                "rows %d..%d); they were recomputed",
                len(stale),
                cache,
                *stale[0],
            )
        if not sink.complete:
            sink.dirty = True
            sink.save(complete=True)
        if computed == 0:
            logger.info("cache: reusing %s (all %d rows verified)", cache, rows)
        return sink.result()
    except BaseException:
        if sink is not None:
            try:
                sink.save()
            except Exception as err:  # keep the original error; the header stays as it was
                logger.error("cache: could not record the rows written to %s: %s", cache, err)
        raise
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        guard.restore()


def extract_features(
    model_or_extractor: nn.Module,
    data: Any,
    *,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    amp: bool | torch.dtype = False,
    cache: str | os.PathLike[str] | None = None,
    progress: bool = True,
    pool: PoolName | None = "avg",
    early_stop: bool = False,
    distributed: bool | None = None,
    channels_last: bool = False,
) -> Any:
    """Features of every sample of ``data``, as NumPy arrays, in one pass per batch.

    The model runs in eval mode (every module's ``training`` flag is set to ``False``
    directly, so BatchNorm statistics never change, and restored afterwards) under
    ``torch.inference_mode`` and, with ``amp``, under [`transferkit.autocast`][].
    Floating inputs are cast to the model's parameter dtype (so float64 arrays work) and
    moved with [`transferkit.to_device`][]. Features come back as float32 for
    half-precision outputs, else in the model's dtype.

    Data: a ``Tensor`` or ``ndarray`` of inputs (batched by ``batch_size``); a dict of
    tensors such as a tokenizer's output (``input_ids``, ``attention_mask``: passed as
    keyword arguments, and the mask makes ``pool="avg"`` ignore padding); a ``Dataset`` or
    a ``DataLoader`` (its own batch size is used) whose batches are inputs, ``(inputs,
    labels)`` pairs (further items are ignored) or dicts (a ``"labels"``/``"label"`` key is
    taken out as labels).

    Cache: with ``cache=directory`` each output is stored as ``features_<i>.npy`` (plus
    ``labels.npy``) next to a ``header.json`` that records shapes, dtypes, layer names, a
    fingerprint of the model (every parameter and buffer byte, module types, ``repr``, the
    code of the module classes, each module's own attributes such as ``self.scale = 2.0``
    except those its ``forward`` assigns; not forward hooks) and settings, and for every
    chunk of rows written (one batch) a digest of all the bytes of its input batch and a
    checksum of the stored rows.
    Every call hashes each batch of the data (tensors without copying; Dataset items as
    they are loaded) and reuses a chunk only if its digest and checksum match: changed
    rows or items are recomputed (logged as a warning), an interrupted run resumes with
    what is intact, and corrupted rows of a complete cache raise a ``ValueError``. A
    changed model or setting recomputes everything (with a warning). A lock file
    serialises processes and threads that use the same directory; only the cache's own
    file names inside it are ever touched (a header naming anything else, or a symbolic
    link, raises ``ValueError``), and never a file of such a name that no transferkit
    header records (``ValueError``: give the cache a folder of its own). The result is
    memory-mapped (copy-on-write). Shuffling DataLoaders cannot be cached.

    Distributed (``torchrun``): when a ``torch.distributed`` process group is initialised
    (and ``distributed`` is not ``False``), each rank extracts a contiguous shard of the
    data ([`transferkit.distributed.shard_indices`][]: no duplicated samples), and the
    shards are merged in dataset order with ``all_gather_object``: **every rank** returns
    exactly what a single-process run returns (in memory, so each rank holds all the
    features). A ``DataLoader`` is re-built over its shard with the same batch size and
    ``collate_fn``; one that shuffles, samples or drops the last batch is refused. With
    ``cache``, rank 0 reuses a complete cache (all ranks then read it) or writes the
    merged result into it while the other ranks wait at a barrier (an interrupted
    distributed run restarts from row 0). Under NCCL, call ``torch.cuda.set_device`` for
    each rank first (the gather of Python objects goes through the current device).

    GPU fast paths: on CUDA, tensor and array inputs are copied from pinned memory with
    non-blocking transfers (Datasets get a pinned-memory loader from
    [`transferkit.dataloader_kwargs`][]); ``channels_last=True`` runs a CNN and its
    4-D inputs in ``torch.channels_last`` memory format (faster convolutions with
    tensor cores, especially under ``amp``); the model's own tensors are restored
    afterwards.

    Args:
        model_or_extractor: a network, or a [`FeatureExtractor`][] (then ``layers`` and
            ``pool`` come from it).
        data: see above.
        layers: module names (see [`FeatureExtractor`][]); ``None``: the model output.
        batch_size: samples per forward pass for tensors, arrays and Datasets.
        device: where to run; ``"auto"`` keeps a model that already sits on an accelerator
            there, else picks one with [`transferkit.resolve_device`][]. A model moved
            for the extraction is moved back afterwards.
        amp: ``True`` for autocast with the device's default dtype (a no-op on CPU), or
            ``torch.bfloat16`` / ``torch.float16``.
        cache: a directory for the disk cache, or ``None``.
        progress: show a tqdm progress bar.
        pool: pooling of each output (see [`FeatureExtractor`][]).
        early_stop: skip the layers after the deepest requested one.
        distributed: shard the work over the ranks of the initialised process group;
            ``None`` (default): when one is initialised with more than one process.
            ``True`` without a process group raises.
        channels_last: run the model and 4-D inputs in ``torch.channels_last`` memory
            format (for CNNs on GPU; the same numbers up to float rounding).

    Returns:
        An ``(N, ...)`` array (``layers`` is ``None`` or one name), or a dict of arrays in
        the order of ``layers``; a ``(features, labels)`` tuple when batches carry labels.

    Raises:
        TypeError: for unsupported data, batch or argument types.
        ValueError: for invalid arguments, a shuffling DataLoader with ``cache`` (or
            under ``torch.distributed``), ``distributed=True`` without a process group, a
            corrupted or truncated complete cache, or a cache header that names a file
            outside the cache's own names (or a symbolic link).
        OSError: when the cache directory cannot be written (read-only, disk full); the
            rows recorded so far stay valid and a later call resumes from them.

    Thread safety: calls that use the same model are serialised (a lock per model), and
    the model's device, dtype, parameters, buffers and train/eval flags are restored
    exactly, whether the call returns or raises.

    Examples:
        >>> import transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=10)
        >>> x, y = torch.randn(10, 1, 16, 16), torch.arange(10)
        >>> feats = tk.extract_features(net, x, layers=["features", "neck"], progress=False)
        >>> {name: f.shape for name, f in feats.items()}
        {'features': (10, 64), 'neck': (10, 128)}
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y))
        >>> f, labels = tk.extract_features(net, loader, layers="neck", progress=False)
        >>> f.shape, labels.tolist()[:3]
        ((10, 128), [0, 1, 2])
    """
    check_positive(batch_size, "batch_size", integer=True)
    _amp_dtype(amp)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    if isinstance(model_or_extractor, FeatureExtractor):
        if layers is not None:
            raise ValueError("layers: give layers to the FeatureExtractor, not to both")
        extractor, owned = model_or_extractor, False
    elif isinstance(model_or_extractor, nn.Module):
        extractor = FeatureExtractor(model_or_extractor, layers, pool, early_stop=early_stop)
        owned = True
    else:
        raise TypeError(
            "model_or_extractor: expected an nn.Module or FeatureExtractor, "
            f"got {type(model_or_extractor).__name__}"
        )
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache: expected a directory path or None, got {type(cache).__name__}")
    if cache is not None and not os.fspath(cache).strip():
        raise ValueError("cache: expected a directory path, got an empty string (None: no cache)")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected a bool, got {type(channels_last).__name__}")
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected a bool or None, got {type(distributed).__name__}")
    if distributed and not is_distributed():
        raise ValueError(
            "distributed: True needs an initialised torch.distributed process group "
            "(launch with torchrun and call torch.distributed.init_process_group first)"
        )
    _check_not_meta(extractor.model, device)
    try:
        with _model_lock(extractor.model):
            if (distributed is None and is_distributed() and get_world_size() > 1) or (
                distributed and get_world_size() > 1
            ):
                options: dict[str, Any] = {
                    "batch_size": batch_size,
                    "device": device,
                    "amp": amp,
                    "channels_last": channels_last,
                }
                return _extract_sharded(extractor, data, cache, progress, options)
            result = _extract_local(
                extractor,
                data,
                batch_size=batch_size,
                device=device,
                amp=amp,
                cache=cache,
                progress=progress,
                channels_last=channels_last,
            )
    finally:
        if owned:
            extractor.close()
    return _finish(extractor, result)


def _finish(extractor: FeatureExtractor, result: tuple[list[np.ndarray], np.ndarray | None]) -> Any:
    arrays, labels = result
    features: Any = (
        arrays[0] if extractor._single else dict(zip(extractor.output_names, arrays, strict=True))
    )
    return features if labels is None else (features, labels)
