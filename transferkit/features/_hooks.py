"""Layer capture: `FeatureExtractor` records named layers' outputs from one forward pass.

Forward hooks are attached only while a call runs and removed in a ``finally`` block; a
lock serialises the calls of one extractor, and the hooks record only the forward pass of
the thread that attached them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _pooling
from .._batch import first_tensor
from .._pooling import POOLS as _POOLS
from .._pooling import PoolName
from .._validation import check_bool, check_option, did_you_mean


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run (early stop)."""


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
