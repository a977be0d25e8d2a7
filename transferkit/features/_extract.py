"""[`extract_features`][transferkit.extract_features]: plan once, then run locally or sharded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._pooling import PoolName
from ._guard import _model_lock
from ._hooks import FeatureExtractor
from ._planner import _make_plan
from ._run import _run
from ._shard import _run_sharded


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
    except those its ``forward`` assigns; not forward hooks) and settings (layers, pooling
    and the autocast in effect: its device type and dtype, so ``amp=True`` on CUDA and on
    CPU, or a caller's ``torch.autocast`` block around an ``amp=False`` call, never share
    rows), and for every chunk of rows written (one batch) a digest of all the bytes of
    its input batch and a checksum of the stored rows.
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
        model_or_extractor: a network, or a [`FeatureExtractor`][] (then ``layers``,
            ``pool`` and ``early_stop`` come from it: passing ``layers``, or a ``pool`` or
            ``early_stop=True`` that differs from the extractor's, raises ``ValueError``).
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
    exactly, whether the call returns or raises. The data is never written to: a batch of
    a tensor or array that still shares its memory after the cast and the device move is
    copied, so a model that changes its input in place leaves the caller's as it was.

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
    plan = _make_plan(
        model_or_extractor,
        layers=layers,
        batch_size=batch_size,
        device=device,
        amp=amp,
        cache=cache,
        progress=progress,
        pool=pool,
        early_stop=early_stop,
        distributed=distributed,
        channels_last=channels_last,
    )
    try:
        with _model_lock(plan.extractor.model):
            if plan.sharded:
                rows = _run_sharded(plan, data)
            else:
                source = plan.source(data)
                sink = plan.open_cache(source) if plan.cache is not None else None
                rows = _run(plan, source, sink, progress=plan.progress)
    finally:
        if plan.owned:
            plan.extractor.close()
    return _finish(plan.extractor, rows)


def _finish(extractor: FeatureExtractor, result: tuple[list[np.ndarray], np.ndarray | None]) -> Any:
    """The public shape of a result: one array or a dict by layer, plus labels if any."""
    arrays, labels = result
    features: Any = (
        arrays[0] if extractor._single else dict(zip(extractor.output_names, arrays, strict=True))
    )
    return features if labels is None else (features, labels)
