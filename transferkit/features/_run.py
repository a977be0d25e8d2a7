"""The run loop: batches in, features out, into memory or into the cache.

`_run` executes a `._planner._Plan` on one `._sources._Source`: it checks every batch
against the cache (digest and checksums), runs the model only on rows that are missing,
stale or corrupt, and writes the rows to a `_MemorySink` or a `._cache._CacheSink`. The
model is put in extraction state lazily (only when a row must be computed) and restored
whatever happens (`._guard._ModelGuard`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import autocast, to_device
from ._cache import _CacheSink
from ._files import _check_fits
from ._fingerprint import _batch_digest
from ._guard import _ModelGuard
from ._planner import _Plan
from ._sources import (
    _call,
    _cast_floating,
    _channels_last,
    _labels_to_numpy,
    _pinned,
    _rows_of,
    _Source,
    _split_batch,
    _to_numpy,
    _unshared,
)

logger = logging.getLogger("transferkit.features")


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


def _run(
    plan: _Plan, source: _Source, sink: _CacheSink | None, *, progress: bool
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Extract every row of ``source`` (reusing the verified rows of ``sink``).

    ``sink`` is closed when the run ends; without one the rows are gathered in memory.
    """
    names = plan.names
    target = plan.target
    model = plan.extractor.model
    memory = _MemorySink(source.num_rows, names) if sink is None else None
    if sink is not None and sink.rows_done:
        logger.info("cache: checking the %d rows already in %s", sink.rows_done, plan.cache)
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    pin = target.type == "cuda" and source.in_memory
    guard = _ModelGuard(model, target, plan.channels_last)
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
        amp = autocast(target, dtype=plan.amp_dtype, enabled=plan.amp_enabled)
        with torch.inference_mode(), amp:
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
                given = inputs
                inputs = _cast_floating(inputs, param_dtype)
                inputs = to_device(_pinned(inputs) if pin else inputs, target)
                if plan.channels_last:
                    inputs = _channels_last(inputs)
                if source.in_memory:  # slices of the caller's data: never written to
                    inputs = _unshared(inputs, given)
                outputs = [_to_numpy(t) for t in _call(plan.extractor, inputs)]
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
                plan.cache,
                start,
                stop,
                file,
            )
        if stale:
            logger.warning(
                "cache: the data of %d chunk(s) of %s changed since they were cached (first: "
                "rows %d..%d); they were recomputed",
                len(stale),
                plan.cache,
                *stale[0],
            )
        if not sink.complete:
            sink.dirty = True
            sink.save(complete=True)
        if computed == 0:
            logger.info("cache: reusing %s (all %d rows verified)", plan.cache, rows)
        return sink.result()
    except BaseException:
        if sink is not None:
            try:
                sink.save()
            except Exception as err:  # keep the original error; the header stays as it was
                logger.error("cache: could not record the rows written to %s: %s", plan.cache, err)
        raise
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        guard.restore()
