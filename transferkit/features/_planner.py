"""The one planner of [`transferkit.extract_features`][]: arguments checked once, one plan.

`_make_plan` validates every argument (in the order the errors are documented), builds
or adopts the `FeatureExtractor`, refuses meta/lazy models, chooses the device and the
autocast dtype, and decides whether the run is sharded over ``torch.distributed`` ranks.
The plan then makes the data source and opens the cache; the run loop (`._run`) and the
sharded path (`._shard`) only execute it, so nothing is planned twice.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._pooling import PoolName
from .._validation import check_positive
from ..device import _autocast_dtype, resolve_device
from ..distributed import get_world_size, is_distributed
from ._cache import _CacheSink
from ._fingerprint import _model_fingerprint
from ._hooks import FeatureExtractor
from ._sources import _make_source, _Source


@dataclasses.dataclass
class _Plan:
    """Everything an extraction needs besides the data, decided once."""

    extractor: FeatureExtractor
    owned: bool  # created here: closed when the extraction ends
    target: torch.device
    amp_enabled: bool
    amp_dtype: torch.dtype | None
    batch_size: int
    cache: str | os.PathLike[str] | None
    progress: bool
    channels_last: bool
    sharded: bool

    @property
    def names(self) -> list[str]:
        return list(self.extractor.output_names)

    def source(self, data: Any) -> _Source:
        """The batches of ``data`` (a tensor, array, dict, Dataset or DataLoader)."""
        return _make_source(data, self.batch_size, self.target)

    def open_cache(self, source: _Source) -> _CacheSink:
        """The cache sink for ``source``, opened (locked, loaded, checked)."""
        assert self.cache is not None
        if source.cacheable is not None:
            raise ValueError(f"cache: {source.cacheable}")
        key = _cache_key(self.extractor, self.amp_dtype, self.amp_enabled, source, self.target)
        sink = _CacheSink(Path(self.cache), self.names, key, source.batch_size)
        sink.open()
        return sink


def _make_plan(
    model_or_extractor: nn.Module,
    *,
    layers: Any,
    batch_size: int,
    device: str | torch.device | None,
    amp: bool | torch.dtype,
    cache: str | os.PathLike[str] | None,
    progress: bool,
    pool: PoolName | None,
    early_stop: bool,
    distributed: bool | None,
    channels_last: bool,
) -> _Plan:
    """Check every argument of ``extract_features`` and decide how to run it."""
    check_positive(batch_size, "batch_size", integer=True)
    amp_enabled, amp_dtype = _amp_dtype(amp)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    if isinstance(model_or_extractor, FeatureExtractor):
        if layers is not None:
            raise ValueError("layers: give layers to the FeatureExtractor, not to both")
        extractor, owned = model_or_extractor, False
        # pool and early_stop come from the extractor: a value that would change the
        # result must not be dropped silently ("avg" is the default, so it cannot tell)
        if pool != "avg" and pool != extractor.pool:
            raise ValueError(
                f"pool: the FeatureExtractor pools with {extractor.pool!r}; give pool to "
                f"the FeatureExtractor, not {pool!r} to extract_features"
            )
        if early_stop is not False and early_stop != extractor.early_stop:
            raise ValueError(
                "early_stop: give early_stop to the FeatureExtractor, not to extract_features"
            )
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
    sharded = (distributed is None and is_distributed() and get_world_size() > 1) or bool(
        distributed and get_world_size() > 1
    )
    return _Plan(
        extractor=extractor,
        owned=owned,
        target=_choose_device(extractor.model, device),
        amp_enabled=amp_enabled,
        amp_dtype=amp_dtype,
        batch_size=batch_size,
        cache=cache,
        progress=progress,
        channels_last=channels_last,
        sharded=sharded,
    )


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


def _amp_dtype(amp: object) -> tuple[bool, torch.dtype | None]:
    if isinstance(amp, bool):
        return amp, None
    if isinstance(amp, torch.dtype) and amp in (torch.float16, torch.bfloat16):
        return True, amp
    raise TypeError(f"amp: expected a bool, torch.float16 or torch.bfloat16, got {amp!r}")


def _effective_autocast(target: torch.device, amp: torch.dtype | None, enabled: bool) -> str | None:
    """The autocast the extraction really runs under on ``target``, e.g. ``"cuda:bfloat16"``.

    ``amp=True`` means bf16/fp16 on CUDA but nothing on CPU, and with ``amp=False`` an
    enclosing ``torch.autocast`` block of the caller still applies: the cache key records
    what is in effect, so half-precision rows are never reused as full-precision ones (or
    the other way round).
    """
    chosen = _autocast_dtype(target, amp) if enabled else None
    if chosen is None:
        try:
            active = torch.is_autocast_enabled(target.type)
        except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
            active = False
        if active:
            chosen = torch.get_autocast_dtype(target.type)
    return None if chosen is None else f"{target.type}:{str(chosen).removeprefix('torch.')}"


def _tf32_in_effect(target: torch.device, autocast: str | None) -> str | None:
    """TF32 math a CUDA extraction runs with outside autocast, e.g. ``"conv"``.

    cuDNN convolutions use TF32 by default (about 1e-3 relative error, against float32
    rounding on the CPU): the cache key records it, so such rows are not served to a
    float32 call on the CPU (or with TF32 off), nor the other way round.
    """
    if target.type != "cuda" or autocast is not None:
        return None
    flags = (
        ("conv", torch.backends.cudnn.allow_tf32),
        ("matmul", torch.backends.cuda.matmul.allow_tf32),
    )
    return "+".join(name for name, on in flags if on) or None


def _cache_key(
    extractor: FeatureExtractor,
    amp: torch.dtype | None,
    enabled: bool,
    source: _Source,
    target: torch.device,
) -> dict[str, Any]:
    model = extractor.model
    autocast = _effective_autocast(target, amp, enabled)
    key = {
        "model": _model_fingerprint(model),
        "model_class": type(model).__qualname__,
        "layers": list(extractor.layers) if extractor.layers is not None else None,
        "pool": extractor.pool,
        "amp": autocast,
        "data": source.describe(),
        "num_rows": source.num_rows,
    }
    tf32 = _tf32_in_effect(target, autocast)
    if tf32 is not None:  # absent otherwise: float32 caches written before stay valid
        key["tf32"] = tf32
    return key
