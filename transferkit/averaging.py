"""Weight averaging: an exponential moving average of a model's weights.

[`ModelEMA`][] keeps a frozen copy of the network whose weights follow the trained
ones slowly. Two uses in adaptation:

* the *mean teacher* (Tarvainen & Valpola, 2017): pseudo-labels for self-training come
  from the average, which drifts less from step to step than the network being trained,
  so a few bad updates do not feed their own mistakes back
  ([`transferkit.FixMatchLoss`][] takes it as ``teacher``);
* Polyak averaging: the averaged weights are often better to evaluate than the last ones.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._domain_bn import DomainSpecificBatchNorm, resting_domain
from ._surgery import unwrap_model
from ._validation import check_positive
from .freezing._batchnorm import _bn_policy, _clear_eval_policy, _set_eval_policy

__all__ = ["ModelEMA"]


class ModelEMA(nn.Module):
    """An exponential moving average of a model's weights (mean teacher, Polyak averaging).

    Holds a frozen copy of ``model`` in [`module`][]. Each [`update`][] (call it after
    ``optimizer.step()``) moves every floating-point parameter of the copy towards the
    model's: ``theta_ema <- d * theta_ema + (1 - d) * theta`` with
    ``d = min(decay, 1 - 1 / (t + 1))`` at the ``t``-th update (``t = 0, 1, ...``), the
    warm-up of the mean teacher (Tarvainen & Valpola, 2017): the first update copies,
    and early on the copy is the plain average of the weights seen so far. Buffers
    (BatchNorm running statistics, step counters) are copied, not averaged. bf16/fp16
    parameters are averaged in a float32 master copy (saved with ``state_dict()``) and
    rounded into the copy: averaged in their own precision they stop moving once
    ``(1 - d) * change`` is below half a unit in the last place.

    Uses: pseudo-labels from the average drift less from step to step than the
    student's own, which is what keeps self-training from reinforcing its latest
    mistakes (pass ``teacher=ema`` to [`transferkit.FixMatchLoss`][]); and the averaged
    weights are usually better to evaluate than the last ones. The copied BatchNorm
    statistics belong to the student's weights: re-estimate them for the averaged
    weights before evaluating (e.g. ``tk.adapt_batchnorm(ema, data)``, as for SWA).

    Calling the wrapper calls the copy; it has no trainable parameters and does not
    need an optimizer. Switch its mode with ``ema.train()`` / ``ema.eval()`` as for any
    module (the copy, and the wrapper, start in the model's mode). The copy may live on
    another device than the model (e.g. ``ema.cpu()`` to save GPU memory).

    Args:
        model: the network being trained (copied with ``copy.deepcopy``; not modified).
            ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers
            are looked through: the copy is the network inside them. Domain-specific
            BatchNorm layers of the copy start in the model's domain outside any
            [`transferkit.bn_domain`][] block, even when built inside one.
        decay: the largest averaging weight ``d``, in ``[0, 1)``. The time constant is
            about ``1 / (1 - decay)`` updates: 0.99 (the mean teacher's value in its
            ramp-up phase) suits runs of a few hundred steps; 0.999 (the mean teacher
            after the ramp-up, FixMatch's evaluation average) needs thousands.

    Attributes:
        module: the averaged copy.
        updates: how many times [`update`][] was called.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> ema = ModelEMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(1.0)
        ...     _ = net.bias.fill_(0.0)
        >>> ema.update(net)  # the first update copies
        >>> ema.module.weight.tolist()
        [[1.0, 1.0]]
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(3.0)
        >>> ema.update(net)  # min(0.5, 1 - 1/2) = 0.5: halfway
        >>> ema.module.weight.tolist()
        [[2.0, 2.0]]
        >>> ema(torch.ones(1, 2)).shape
        torch.Size([1, 1])
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.99) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"decay: expected a number in [0, 1), got {type(decay).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        source = unwrap_model(model)
        self.module = copy.deepcopy(source)
        # a copy made inside tk.bn_domain(model, ...) rests in the model's own domain
        for original, copied in zip(source.modules(), self.module.modules(), strict=True):
            if isinstance(original, DomainSpecificBatchNorm) and isinstance(
                copied, DomainSpecificBatchNorm
            ):
                copied.domain = resting_domain(original)
        self.module.requires_grad_(False)
        self.training = self.module.training
        self.updates = 0
        # float32 master copies of the bf16/fp16 parameters (see update)
        self._master: dict[str, Tensor] = {}

    @property
    def current_decay(self) -> float:
        """The ``d`` the next [`update`][] uses: ``min(decay, 1 - 1 / (updates + 1))``."""
        return min(self.decay, 1.0 - 1.0 / (self.updates + 1))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; copy its buffers.

        Wrappers (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``) are
        looked through. The model may live on another device than the average. Also
        mirrors the ``bn="eval"`` policy of [`transferkit.freeze`][] /
        [`transferkit.unfreeze`][] on each BatchNorm layer, so that a layer the model
        keeps in eval mode is in eval mode in the copy too (and the other way round).

        Args:
            model: the network being trained; same architecture as the copy.

        Raises:
            ValueError: ``model`` does not have the copy's parameters and buffers (names
                and shapes); nothing is changed then. A layer replaced by a new one of
                the same shape (e.g. a new head for as many classes) cannot be told
                apart: build a new average after changing the model.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        model = unwrap_model(model)
        mine = dict(self.module.named_parameters())
        theirs = dict(model.named_parameters())
        my_buffers = dict(self.module.named_buffers())
        their_buffers = dict(model.named_buffers())
        if mine.keys() != theirs.keys() or my_buffers.keys() != their_buffers.keys():
            ours = mine.keys() | my_buffers.keys()
            missing = sorted(ours ^ (theirs.keys() | their_buffers.keys()))
            raise ValueError(
                "model: expected the architecture the average was built from; parameters "
                f"or buffers differ: {missing[:5]}"
            )
        # check every shape before changing anything: no half-updated average on error
        for kind, averages, values in (
            ("parameter", mine, theirs),
            ("buffer", my_buffers, their_buffers),
        ):
            for name, value in values.items():
                if averages[name].shape != value.shape:
                    raise ValueError(
                        f"model: {kind} {name!r} has shape {tuple(value.shape)}, the average "
                        f"{tuple(averages[name].shape)}"
                    )
        weight = 1.0 - self.current_decay
        for name, value in theirs.items():
            average: Tensor = mine[name]
            source = value.detach().to(average.device)
            if _low_precision(average):
                master = self._master_copy(name, average)
                master.lerp_(source.float(), weight)
                average.copy_(master)
            elif average.is_floating_point() or average.is_complex():
                average.lerp_(source.to(average.dtype), weight)
            else:
                average.copy_(source)
        for name in [n for n in self._master if not _low_precision(mine.get(n))]:
            del self._master[name]  # e.g. after ema.float()
        for name, buffer in their_buffers.items():
            my_buffers[name].copy_(buffer)
        _mirror_bn_policy(self.module, model)
        self.updates += 1

    def _master_copy(self, name: str, average: Tensor) -> Tensor:
        """The float32 copy that ``average`` (bf16/fp16) is rounded from.

        Averaging in bf16/fp16 itself stalls: once ``(1 - d) * change`` is below half a
        unit in the last place, every update rounds back to the old value (bf16 has 8
        bits of mantissa). A copy that no longer rounds to ``average`` (the average was
        loaded or changed by hand) is replaced by ``average`` itself.
        """
        master = self._master.get(name)
        if master is not None and master.shape == average.shape:
            master = master.to(average.device)
            if torch.equal(master.to(average.dtype), average):
                self._master[name] = master
                return master
        master = average.detach().float().clone()
        self._master[name] = master
        return master

    def get_extra_state(self) -> dict[str, Any]:
        """Saved with ``state_dict()``: the update count and the float32 master copies.

        The update count sets the warm-up of ``d``; the master copies are those of the
        bf16/fp16 parameters (see [`update`][]).
        """
        return {"updates": self.updates, "master": dict(self._master)}

    def set_extra_state(self, state: Any) -> None:
        """Restore the update count (and master copies) saved by ``state_dict()``."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"updates: expected a mapping with 'updates', got {type(state).__name__}"
            )
        updates = state.get("updates")
        self.updates = int(check_positive(updates, "updates", strict=False, integer=True))
        master = state.get("master", {})
        if not isinstance(master, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point()
            for k, v in master.items()
        ):
            raise ValueError("master: expected a mapping of parameter names to float tensors")
        self._master = {k: v.detach().float().clone() for k, v in master.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the averaged copy."""
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        """Shown by ``repr``: the decay and the update count."""
        return f"decay={self.decay}, updates={self.updates}"


def _low_precision(tensor: Tensor | None) -> bool:
    """A floating tensor with less precision than float32 (bf16, fp16)."""
    return tensor is not None and tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32


def _mirror_bn_policy(copy_: nn.Module, model: nn.Module) -> None:
    """Give each BatchNorm of ``copy_`` the ``bn="eval"`` policy of ``model``'s layer."""
    theirs = dict(model.named_modules())
    for name, layer in copy_.named_modules():
        other = theirs.get(name)
        if not isinstance(layer, _BatchNorm) or not isinstance(other, _BatchNorm):
            continue
        policy = _bn_policy(other)
        if policy == _bn_policy(layer):
            continue
        if policy == "eval":
            _set_eval_policy(layer)
        else:
            _clear_eval_policy(layer, copy_.training)
