"""Small training conveniences for the loop you write yourself.

transferkit deliberately ships no ``fit`` function: your training loop is yours. These
pieces slot into it:

* [`EarlyStopping`][] -- watches a validation metric, says when to stop, keeps a CPU
  copy of the best weights and puts them back; its counter survives checkpoints.
* [`class_weights`][] -- per-class loss weights for imbalanced targets, to pass to
  ``nn.CrossEntropyLoss(weight=...)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._validation import UNSIGNED_WIDE, check_bool, check_labels, check_option, check_positive

__all__ = ["EarlyStopping", "class_weights"]

logger = logging.getLogger(__name__)

Mode = Literal["min", "max"]
WeightMethod = Literal["balanced", "inverse_sqrt"]


class EarlyStopping:
    """Stop training when a validation metric stops improving; keep the best weights.

    Call [`step`][] once per evaluation with the metric and the model. A value counts
    as an improvement when it beats the best so far by more than ``min_delta``
    (``metric < best - min_delta`` for ``mode="min"``, ``metric > best + min_delta`` for
    ``mode="max"``). After ``patience`` evaluations in a row without improvement,
    [`step`][] returns ``True``. With ``restore_best=True`` the weights of the best
    evaluation are kept as a CPU copy of the model's ``state_dict`` (so they cost no
    accelerator memory) and are loaded back into the model when stopping, or whenever
    you call [`restore`][].

    [`state_dict`][] / [`load_state_dict`][] save the counter, the best value and
    the best weights, so a resumed run stops at the same evaluation as an uninterrupted
    one.

    Args:
        patience: evaluations without improvement to tolerate before stopping (``>= 1``).
        min_delta: minimum change that counts as an improvement (``>= 0``).
        mode: ``"min"`` for losses, ``"max"`` for accuracies and scores.
        restore_best: keep a snapshot of the best weights and load it into the model
            when [`step`][] returns ``True``.

    Attributes:
        best: the best metric so far (``None`` before the first step).
        best_step: the evaluation index (0-based) at which ``best`` was seen.
        num_bad_steps: evaluations since the last improvement.
        steps: evaluations seen so far.
        stopped: whether [`step`][] has returned ``True``.

    Raises:
        TypeError: ``patience`` is not an integer or ``min_delta`` not a number.
        ValueError: ``patience < 1``, ``min_delta < 0`` or an unknown ``mode``.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> stopper = EarlyStopping(patience=2, mode="min")
        >>> [stopper.step(loss, model) for loss in [1.0, 0.5, 0.6, 0.7]]
        [False, False, False, True]
        >>> stopper.best, stopper.best_step
        (0.5, 1)
    """

    def __init__(
        self,
        patience: int = 5,
        min_delta: float = 0.0,
        *,
        mode: Mode = "min",
        restore_best: bool = True,
    ) -> None:
        self.patience = int(check_positive(patience, "patience", integer=True))
        self.min_delta = check_positive(min_delta, "min_delta", strict=False)
        self.mode: Mode = check_option(mode, "mode", ("min", "max"))
        self.restore_best = check_bool(restore_best, "restore_best")
        self.best: float | None = None
        self.best_step = -1
        self.num_bad_steps = 0
        self.steps = 0
        self.stopped = False
        self._best_state: dict[str, Tensor] | None = None

    def is_improvement(self, metric: float) -> bool:
        """Whether ``metric`` beats the best value so far by more than ``min_delta``.

        Args:
            metric: a finite metric value.

        Returns:
            ``True`` before the first step, or when ``metric`` improves on `best`.

        Examples:
            >>> stopper = EarlyStopping(min_delta=0.1, mode="max")
            >>> stopper.is_improvement(0.5)
            True
        """
        if self.best is None:
            return True
        if self.mode == "min":
            return metric < self.best - self.min_delta
        return metric > self.best + self.min_delta

    def step(self, metric: float | Tensor, model: nn.Module | None = None) -> bool:
        """Record one evaluation; return ``True`` when training should stop.

        Args:
            metric: the validation metric, a Python number or a one-element tensor.
            model: the model being trained. Required when ``restore_best=True``: its
                weights are snapshotted on improvement and restored when stopping.

        Returns:
            ``True`` once ``patience`` evaluations in a row brought no improvement (and
            on every later call).

        Raises:
            TypeError: ``metric`` is not a number / one-element tensor, or ``model`` is
                missing while ``restore_best=True``.
            ValueError: ``metric`` is NaN or infinite.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1)
            >>> stopper = EarlyStopping(patience=1, mode="max")
            >>> stopper.step(0.8, model), stopper.step(0.7, model)
            (False, True)
        """
        value = _as_float(metric)
        if self.restore_best and model is None:
            raise TypeError("model: expected an nn.Module when restore_best=True, got None")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if self.is_improvement(value):
            self.best = value
            self.best_step = self.steps
            self.num_bad_steps = 0
            if self.restore_best and model is not None:
                self._best_state = _cpu_copy(model.state_dict())
        else:
            self.num_bad_steps += 1
        self.steps += 1
        if not self.stopped and self.num_bad_steps >= self.patience:
            self.stopped = True
            logger.info(
                "early stopping after %d evaluations; best %s=%.6g at evaluation %d",
                self.steps,
                self.mode,
                self.best,
                self.best_step,
            )
            if self.restore_best and model is not None:
                self.restore(model)
        return self.stopped

    @property
    def best_state(self) -> dict[str, Tensor] | None:
        """The CPU snapshot of the best weights (``None`` before the first step)."""
        return self._best_state

    def restore(self, model: nn.Module) -> None:
        """Load the best weights seen so far into ``model`` (on the model's devices).

        Args:
            model: the model whose weights were tracked.

        Raises:
            RuntimeError: no snapshot exists (``restore_best=False`` or no step yet).

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(1, 1, bias=False)
            >>> stopper = EarlyStopping(patience=3)
            >>> _ = torch.nn.init.constant_(model.weight, 1.0)
            >>> stopper.step(0.1, model)
            False
            >>> _ = torch.nn.init.constant_(model.weight, 5.0)
            >>> stopper.restore(model)
            >>> model.weight.item()
            1.0
        """
        if self._best_state is None:
            raise RuntimeError(
                "restore: no best weights recorded; call step(metric, model) first and "
                "keep restore_best=True"
            )
        model.load_state_dict(self._best_state)

    def reset(self) -> None:
        """Forget all history (best value, counters and snapshot).

        Examples:
            >>> stopper = EarlyStopping()
            >>> stopper.reset(); stopper.best is None
            True
        """
        self.best = None
        self.best_step = -1
        self.num_bad_steps = 0
        self.steps = 0
        self.stopped = False
        self._best_state = None

    def state_dict(self) -> dict[str, Any]:
        """The counters, best value and best weights, for a checkpoint.

        Returns:
            A dict of plain Python values and CPU tensors that ``torch.save`` writes and
            ``torch.load(..., weights_only=True)`` reads back.

        Examples:
            >>> sorted(EarlyStopping().state_dict())  # doctest: +NORMALIZE_WHITESPACE
            ['best', 'best_state', 'best_step', 'min_delta', 'mode', 'num_bad_steps',
             'patience', 'steps', 'stopped']
        """
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "num_bad_steps": self.num_bad_steps,
            "steps": self.steps,
            "stopped": self.stopped,
            # Copies: a caller editing the returned tensors must not change the snapshot
            # that restore_best would load.
            "best_state": None if self._best_state is None else _cpu_copy(self._best_state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict`][].

        ``patience``, ``min_delta`` and ``mode`` come from the constructor, not from
        the checkpoint: a resumed run may change them. A checkpoint recorded with the
        other ``mode`` is refused, because its best value would be meaningless.

        Args:
            state: a mapping returned by [`state_dict`][].

        Raises:
            KeyError: a required key is missing.
            ValueError: the checkpoint's ``mode`` differs from this instance's.

        Examples:
            >>> a = EarlyStopping(mode="max", restore_best=False)
            >>> _ = a.step(0.9)
            >>> b = EarlyStopping(mode="max", restore_best=False)
            >>> b.load_state_dict(a.state_dict()); b.best, b.steps
            (0.9, 1)
        """
        missing = [
            key for key in ("best", "best_step", "num_bad_steps", "steps") if key not in state
        ]
        if missing:
            raise KeyError(f"state: missing keys {missing}; expected EarlyStopping.state_dict()")
        saved_mode = state.get("mode", self.mode)
        if saved_mode != self.mode:
            raise ValueError(
                f"state: recorded with mode={saved_mode!r} but this EarlyStopping has "
                f"mode={self.mode!r}"
            )
        best = state["best"]
        self.best = None if best is None else float(best)
        self.best_step = int(state["best_step"])
        self.num_bad_steps = int(state["num_bad_steps"])
        self.steps = int(state["steps"])
        self.stopped = bool(state.get("stopped", self.num_bad_steps >= self.patience))
        snapshot = state.get("best_state")
        self._best_state = None if snapshot is None else _cpu_copy(snapshot)

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, "
            f"mode={self.mode!r}, restore_best={self.restore_best}, best={self.best}, "
            f"num_bad_steps={self.num_bad_steps})"
        )


def _as_float(metric: object) -> float:
    if isinstance(metric, Tensor):
        if metric.numel() != 1:
            raise TypeError(
                f"metric: expected a number or a one-element tensor, got shape "
                f"{tuple(metric.shape)}"
            )
        value = float(metric.detach().item())
    elif isinstance(metric, (int, float, np.integer, np.floating)) and not isinstance(metric, bool):
        value = float(metric)
    else:
        raise TypeError(f"metric: expected a number, got {type(metric).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"metric: expected a finite value, got {value}")
    return value


def _cpu_copy(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return {
        key: value.detach().to("cpu", copy=True)
        if isinstance(value, Tensor)
        else copy.deepcopy(value)
        for key, value in state.items()
    }


def class_weights(
    labels: Tensor | np.ndarray | list[int],
    num_classes: int | None = None,
    *,
    method: WeightMethod = "balanced",
) -> Tensor:
    r"""Per-class loss weights that counter class imbalance.

    With ``n`` labels, ``C`` classes and ``n_c`` samples of class ``c``:

    * ``"balanced"``: $w_c = n / (C \cdot n_c)$, the same as scikit-learn's
      ``compute_class_weight("balanced", ...)``; a balanced label set gets all ones.
    * ``"inverse_sqrt"``: $w_c = \sqrt{n / (C \cdot n_c)}$, a milder correction
      often preferred for long-tailed targets.

    Classes absent from ``labels`` (possible when ``num_classes`` exceeds the largest
    label, or a gap in the labels) get weight ``0.0``: they contribute nothing to the
    loss, and ``C`` counts only the classes present, so the present classes get exactly
    scikit-learn's weights for ``classes=np.unique(labels)``, whatever ``num_classes``
    is. A warning is logged naming the absent classes.

    Args:
        labels: class indices, a 1-D integer tensor, NumPy array or list.
        num_classes: total number of classes; defaults to ``max(labels) + 1``.
        method: ``"balanced"`` or ``"inverse_sqrt"``.

    Returns:
        A float32 tensor of shape ``(num_classes,)``, on the device of ``labels`` when it
        is a tensor; pass it as ``nn.CrossEntropyLoss(weight=...)``.

    Shape:
        - labels: ``(N,)`` with ``N >= 1``.
        - Output: ``(num_classes,)``.

    Raises:
        TypeError: labels are not integers, or ``num_classes`` is not an integer.
        ValueError: labels are empty, not 1-D, negative or ``>= num_classes``; unknown
            ``method``.

    Examples:
        >>> import torch
        >>> class_weights(torch.tensor([0, 0, 0, 1]))
        tensor([0.6667, 2.0000])
        >>> class_weights([0, 0, 0, 1], method="inverse_sqrt")
        tensor([0.8165, 1.4142])
        >>> class_weights([0, 2, 2], num_classes=4)  # classes 1 and 3 are absent
        tensor([1.5000, 0.0000, 0.7500, 0.0000])
    """
    method = check_option(method, "method", ("balanced", "inverse_sqrt"))
    if isinstance(labels, Tensor):
        tensor = labels
    elif isinstance(labels, np.ndarray):
        tensor = torch.from_numpy(np.asarray(labels))
    elif isinstance(labels, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
            raise TypeError("labels: expected a list of integers")
        tensor = torch.tensor(labels, dtype=torch.int64)
    else:
        raise TypeError(
            f"labels: expected a Tensor, ndarray or list of ints, got {type(labels).__name__}"
        )
    if num_classes is not None:
        num_classes = int(check_positive(num_classes, "num_classes", integer=True))
    tensor = check_labels(tensor, "labels", num_classes=num_classes)
    if tensor.dtype in UNSIGNED_WIDE:
        tensor = tensor.to(torch.int64)  # check_labels bounded the values below 2**63
    if tensor.numel() == 0:
        raise ValueError("labels: expected at least one label, got 0")
    size = num_classes if num_classes is not None else int(tensor.max()) + 1
    counts = torch.bincount(tensor.reshape(-1).long(), minlength=size).to(torch.float64)
    present = counts > 0
    if not bool(present.all()):
        absent = torch.nonzero(~present).reshape(-1).tolist()
        logger.warning("class_weights: classes %s have no samples; their weight is 0", absent)
    weights = torch.zeros(size, dtype=torch.float64, device=counts.device)
    num_present = int(present.sum())
    weights[present] = tensor.numel() / (num_present * counts[present])
    if method == "inverse_sqrt":
        weights = weights.sqrt()
    return weights.to(torch.float32)
