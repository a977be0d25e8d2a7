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

from ._validation import check_positive

__all__ = ["ModelEMA"]


class ModelEMA(nn.Module):
    """An exponential moving average of a model's weights (mean teacher, Polyak averaging).

    Holds a frozen copy of ``model`` in [`module`][]. Each [`update`][] (call it after
    ``optimizer.step()``) moves every floating-point parameter of the copy towards the
    model's: ``theta_ema <- d * theta_ema + (1 - d) * theta`` with
    ``d = min(decay, 1 - 1 / (t + 1))`` at the ``t``-th update (``t = 0, 1, ...``), the
    warm-up of the mean teacher (Tarvainen & Valpola, 2017): the first update copies,
    and early on the copy is the plain average of the weights seen so far. Buffers
    (BatchNorm running statistics, step counters) are copied, not averaged.

    Uses: pseudo-labels from the average drift less from step to step than the
    student's own, which is what keeps self-training from reinforcing its latest
    mistakes (pass ``teacher=ema`` to [`transferkit.FixMatchLoss`][]); and the averaged
    weights are usually better to evaluate than the last ones. The copied BatchNorm
    statistics belong to the student's weights: re-estimate them for the averaged
    weights before evaluating (e.g. ``tk.adapt_batchnorm(ema, data)``, as for SWA).

    Calling the wrapper calls the copy; it has no trainable parameters and does not
    need an optimizer. Switch its mode with ``ema.train()`` / ``ema.eval()`` as for any
    module (the copy starts in the model's mode).

    Args:
        model: the network being trained (copied with ``copy.deepcopy``; not modified).
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
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.updates = 0

    @property
    def current_decay(self) -> float:
        """The ``d`` the next [`update`][] uses: ``min(decay, 1 - 1 / (updates + 1))``."""
        return min(self.decay, 1.0 - 1.0 / (self.updates + 1))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights; copy its buffers.

        Args:
            model: the network being trained; same architecture as the copy.

        Raises:
            ValueError: ``model`` does not have the copy's parameters and buffers.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
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
        weight = 1.0 - self.current_decay
        for name, value in theirs.items():
            average: Tensor = mine[name]
            if average.shape != value.shape:
                raise ValueError(
                    f"model: parameter {name!r} has shape {tuple(value.shape)}, the average "
                    f"{tuple(average.shape)}"
                )
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), weight)
            else:
                average.copy_(value)
        for name, buffer in their_buffers.items():
            my_buffers[name].copy_(buffer)
        self.updates += 1

    def get_extra_state(self) -> dict[str, int]:
        """Saved with ``state_dict()``: the update count (the warm-up of ``d``)."""
        return {"updates": self.updates}

    def set_extra_state(self, state: Any) -> None:
        """Restore the update count saved by ``state_dict()``."""
        updates = state.get("updates") if isinstance(state, Mapping) else None
        self.updates = int(check_positive(updates, "updates", strict=False, integer=True))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the averaged copy."""
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        """Shown by ``repr``: the decay and the update count."""
        return f"decay={self.decay}, updates={self.updates}"
