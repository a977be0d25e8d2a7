"""Gradient reversal: identity forward, ``-coeff * grad`` backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_positive, check_tensor
from ._schedule import WarmStartSchedule


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-coeff * grad`` backward."""

    @staticmethod
    def forward(x: Tensor, coeff: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.coeff = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad_output, None


def _check_coeff(coeff: object) -> float:
    return check_positive(coeff, "coeff", strict=False)


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Reverse (and scale) the gradient flowing through ``x``.

    Forward: the identity (a view of ``x``, same dtype and device). Backward: the incoming
    gradient multiplied by ``-coeff``, exactly. Works under autocast, with
    ``torch.compile`` (it is a plain ``torch.autograd.Function``) and supports double
    backward (the reversal is linear).

    Args:
        x: any floating tensor.
        coeff: the non-negative scale of the reversed gradient (``lambda`` in DANN).

    Returns:
        ``x`` unchanged in value.

    Shape:
        Any; the output has the shape of ``x``.

    Raises:
        TypeError: if ``x`` is not a floating tensor or ``coeff`` is not a number.
        ValueError: if ``coeff`` is negative, NaN or infinite.

    Examples:
        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, coeff=0.5).sum().backward()
        >>> x.grad.tolist()
        [-0.5, -0.5, -0.5]
    """
    check_tensor(x, "x", floating=True, finite=False)
    value = _check_coeff(coeff)
    out: Tensor = _GradReverse.apply(x, value)  # type: ignore[no-untyped-call]
    return out


class GradientReversal(nn.Module):
    """Gradient reversal layer with a fixed coefficient or a [`WarmStartSchedule`][].

    The module's [`coeff`][] reads the schedule's current value at every forward pass;
    advance the schedule with ``grl.schedule.step()`` once per iteration. With a schedule
    the module's ``state_dict`` holds the schedule's state (as extra state), so saving the
    model or the loss that owns this layer also saves the ramp's position.

    Under ``torch.compile`` the coefficient is a Python number read at trace time: a
    fixed one compiles once, but a schedule's value changes every step, so each step
    recompiles the graph around the layer until torch's recompile limit (8 by default)
    sends that frame back to eager execution, with a warning. Gradients stay exact
    either way; to keep the rest compiled, compile the feature extractor and the
    discriminator separately (e.g. ``criterion.discriminator =
    torch.compile(criterion.discriminator)``), so that the layer runs between them.

    Args:
        coeff: a non-negative number or a [`WarmStartSchedule`][].

    Shape:
        Any; the output has the shape of the input.

    Raises:
        TypeError: if ``coeff`` is neither a number nor a schedule.
        ValueError: if ``coeff`` is negative or not finite.

    Examples:
        >>> grl = GradientReversal(WarmStartSchedule(max_steps=10))
        >>> grl.coeff
        0.0
        >>> grl.schedule.step()
        >>> round(grl.coeff, 4)
        0.4621
        >>> x = torch.ones(2, requires_grad=True)
        >>> GradientReversal(2.0)(x).sum().backward()
        >>> x.grad.tolist()
        [-2.0, -2.0]
    """

    def __init__(self, coeff: float | WarmStartSchedule = 1.0) -> None:
        super().__init__()
        self.schedule: WarmStartSchedule | None
        if isinstance(coeff, WarmStartSchedule):
            self.schedule = coeff
            self._coeff = coeff.value
        else:
            if isinstance(coeff, bool) or not isinstance(coeff, (int, float)):
                raise TypeError(
                    f"coeff: expected a number or a WarmStartSchedule, got {type(coeff).__name__}"
                )
            self.schedule = None
            self._coeff = _check_coeff(coeff)

    @property
    def coeff(self) -> float:
        """The current reversal coefficient (the schedule's value when there is one)."""
        return self.schedule.value if self.schedule is not None else self._coeff

    def forward(self, x: Tensor) -> Tensor:
        """Identity forward; ``-coeff * grad`` backward."""
        return grad_reverse(x, self.coeff)

    def get_extra_state(self) -> dict[str, Any]:
        """Schedule state (or the fixed coefficient) for the module's ``state_dict``."""
        if self.schedule is not None:
            return {"schedule": self.schedule.state_dict()}
        return {"coeff": self._coeff}

    def set_extra_state(self, state: Any) -> None:
        """Restore what [`get_extra_state`][] saved."""
        if not isinstance(state, dict):
            raise ValueError("state: expected a dict saved by GradientReversal")
        if "schedule" in state:
            if self.schedule is None:
                raise ValueError(
                    "state: the checkpoint has a WarmStartSchedule but this GradientReversal "
                    "has a fixed coefficient; construct it with a schedule"
                )
            self.schedule.load_state_dict(state["schedule"])
        elif "coeff" in state:
            if self.schedule is not None:
                raise ValueError(
                    "state: the checkpoint has a fixed coefficient but this GradientReversal "
                    "uses a WarmStartSchedule"
                )
            self._coeff = _check_coeff(state["coeff"])
        else:
            raise ValueError("state: expected a 'schedule' or 'coeff' entry")

    def extra_repr(self) -> str:
        """The coefficient or schedule, for ``print(module)``."""
        return repr(self.schedule) if self.schedule is not None else f"coeff={self._coeff:g}"
