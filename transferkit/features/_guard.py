"""The caller's model, put in extraction state and restored exactly (state guard).

One lock per model keeps extractions of the same model from overlapping in time.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor, nn


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return True


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
