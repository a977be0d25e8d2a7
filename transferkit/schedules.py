"""Learning-rate schedules that keep working when parameter groups are added mid-run.

torch schedulers record one entry per parameter group when they are built (``base_lrs``,
``lr_lambdas``, OneCycleLR's ``max_lr``/``initial_lr``/``min_lr`` keys, the children of a
``SequentialLR``). A group added later by gradual unfreezing is unknown to them: the next
``scheduler.step()`` fails (``LambdaLR``: ``zip() argument 2 is shorter``; ``OneCycleLR``:
``KeyError: 'max_lr'``) or leaves the new group at a constant lr.

* [`extend_scheduler`][] teaches a built scheduler the groups added since: each new
  group joins the schedule *at its current position*, scaled to its own lr, exactly as
  if it had been in the optimizer from the start with that lr.
  [`transferkit.GradualUnfreezing`][] calls it when given ``scheduler=``.
* [`FactorSchedule`][] is a ``LambdaLR`` whose one factor function applies to every
  group, including groups added later (it extends itself at the next step).
  [`one_cycle`][] (fastai's ``fit_one_cycle`` shape) and [`warmup_cosine`][]
  (Hugging Face's cosine schedule with linear warmup) build one.

The "base" lr of a group is the lr it had when it was added (or when the scheduler was
built): the peak for ``OneCycleLR`` / [`one_cycle`][] (their ``max_lr``), the starting
value for every other scheduler.
"""

from __future__ import annotations

import bisect
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler as torch_schedulers

from ._validation import check_in_range, check_option, check_positive

__all__ = ["FactorSchedule", "extend_scheduler", "one_cycle", "warmup_cosine"]

logger = logging.getLogger(__name__)

Scheduler = torch_schedulers.LRScheduler | torch_schedulers.ReduceLROnPlateau
_SCHEDULER_TYPES = (torch_schedulers.LRScheduler, torch_schedulers.ReduceLROnPlateau)
WarmupShape = Literal["linear", "cos"]
_WARMUP_SHAPES: tuple[WarmupShape, ...] = ("linear", "cos")

# schedulers whose get_lr() is a closed form of (base values, step): evaluating it again
# at the same step gives the same values (and the same momentum side effects)
_CLOSED_FORM_GET_LR: tuple[type[torch_schedulers.LRScheduler], ...] = (
    torch_schedulers.LambdaLR,
    torch_schedulers.OneCycleLR,
    torch_schedulers.CyclicLR,
    torch_schedulers.CosineAnnealingWarmRestarts,
)
_COMPOSITES: tuple[type, ...] = (torch_schedulers.SequentialLR, torch_schedulers.ChainedScheduler)


def _children(scheduler: object) -> list[Any]:
    children = getattr(scheduler, "_schedulers", None)
    return list(children) if isinstance(children, (list, tuple)) else []


def _nodes(scheduler: object) -> Iterator[Any]:
    """The scheduler and, for SequentialLR / ChainedScheduler, every scheduler inside."""
    yield scheduler
    for child in _children(scheduler):
        yield from _nodes(child)


def _known_groups(scheduler: object) -> int:
    """How many parameter groups the scheduler was built for (or extended to)."""
    children = _children(scheduler)
    if children:
        return min(_known_groups(child) for child in children)
    if isinstance(scheduler, torch_schedulers.ReduceLROnPlateau):
        return len(scheduler.min_lrs)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if not isinstance(base_lrs, list):
        raise TypeError(
            f"scheduler: {type(scheduler).__name__} keeps no base_lrs list; expected a "
            "torch.optim.lr_scheduler scheduler"
        )
    return len(base_lrs)


def _extend_lists(scheduler: Any, new: list[int], bases: list[float]) -> None:
    """Add the per-group keys and list entries of ``new`` groups (bases: their lrs)."""
    children = _children(scheduler)
    if children:
        for child in children:
            _extend_lists(child, new, bases)
        return
    groups = scheduler.optimizer.param_groups
    reference = groups[0]
    if isinstance(scheduler, torch_schedulers.ReduceLROnPlateau):
        scheduler.min_lrs = [*scheduler.min_lrs, *[scheduler.min_lrs[0]] * len(new)]
        return
    if len(scheduler.base_lrs) != new[0]:
        return  # already extended (a scheduler shared by two composites)
    if isinstance(scheduler, torch_schedulers.OneCycleLR):
        warmup_div = float(reference["max_lr"]) / float(reference["initial_lr"])
        final_div = float(reference["initial_lr"]) / float(reference["min_lr"])
        for i, base in zip(new, bases, strict=True):
            group = groups[i]
            group["max_lr"] = base
            group["initial_lr"] = base / warmup_div
            group["min_lr"] = group["initial_lr"] / final_div
            if scheduler.cycle_momentum:
                group["max_momentum"] = reference["max_momentum"]
                group["base_momentum"] = reference["base_momentum"]
    elif isinstance(scheduler, torch_schedulers.CyclicLR):
        ratio = float(scheduler.base_lrs[0]) / float(scheduler.max_lrs[0])
        scheduler.max_lrs = [*scheduler.max_lrs, *bases]
        for i, base in zip(new, bases, strict=True):
            groups[i]["initial_lr"] = base * ratio
        scheduler.base_lrs = [*scheduler.base_lrs, *[base * ratio for base in bases]]
        if scheduler.cycle_momentum:
            for name in ("base_momentums", "max_momentums"):
                values = getattr(scheduler, name)
                setattr(scheduler, name, [*values, *[values[0]] * len(new)])
        return
    else:
        for i, base in zip(new, bases, strict=True):
            groups[i]["initial_lr"] = base
    scheduler.base_lrs = [*scheduler.base_lrs, *[groups[i]["initial_lr"] for i in new]]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list):
        scheduler.lr_lambdas = [*lambdas, *[lambdas[0]] * len(new)]


def _evaluate(function: Callable[[], list[Any]]) -> list[Any]:
    with warnings.catch_warnings():
        # torch warns that get_lr() outside step() is not the last lr; here it is wanted
        warnings.filterwarnings("ignore", message=".*get_last_lr.*", category=UserWarning)
        return function()


def _current(scheduler: Any, new: list[int], bases: list[float]) -> list[float]:
    """The lr each new group must have now for the schedule to continue exactly."""
    groups = scheduler.optimizer.param_groups
    if isinstance(scheduler, torch_schedulers.SequentialLR):
        index = bisect.bisect_right(scheduler._milestones, scheduler.last_epoch)
        return _current(scheduler._schedulers[index], new, bases)
    if isinstance(scheduler, torch_schedulers.ChainedScheduler):
        # every child scales the lr in turn: multiply their factors
        values = list(bases)
        for child in scheduler._schedulers:
            child_values = _current(child, new, bases)
            values = [v * (c / b) for v, c, b in zip(values, child_values, bases, strict=True)]
        return values
    if isinstance(scheduler, torch_schedulers.ReduceLROnPlateau):
        return list(bases)  # reductions apply from now on
    if hasattr(scheduler, "_get_closed_form_lr"):
        full = _evaluate(scheduler._get_closed_form_lr)
        return [float(full[i]) for i in new]
    if isinstance(scheduler, _CLOSED_FORM_GET_LR):
        full = _evaluate(scheduler.get_lr)
        return [float(full[i]) for i in new]
    # MultiplicativeLR and unknown schedulers: follow the first group's factor so far
    if not isinstance(scheduler, torch_schedulers.MultiplicativeLR):
        logger.warning(
            "extend_scheduler: %s has no closed form; the new groups follow the first "
            "group's current factor (exact for multiplicative schedules)",
            type(scheduler).__name__,
        )
    factor = float(groups[0]["lr"]) / float(scheduler.base_lrs[0])
    return [base * factor for base in bases]


def extend_scheduler(scheduler: Scheduler) -> list[int]:
    """Teach ``scheduler`` the parameter groups added to its optimizer since it was built.

    Each new group joins the schedule at the scheduler's current step, scaled to its own
    lr (read from ``group["lr"]`` now: call this right after ``add_param_group``), exactly
    as if it had been in the optimizer from the start with that lr. The new group gets
    the per-group keys the scheduler reads (``initial_lr``; OneCycleLR's ``max_lr`` =
    its lr, ``initial_lr`` and ``min_lr`` with the same division factors as the first
    group, and its momentum range), the scheduler's per-group lists are extended
    (``base_lrs``; ``lr_lambdas`` with the first group's function; CyclicLR's bounds;
    ReduceLROnPlateau's ``min_lrs``; the children of ``SequentialLR`` and
    ``ChainedScheduler``), and its ``lr`` is set to the scheduled value for the current
    step. The scheduler's ``state_dict()`` then covers the new groups, so a run resumes
    when the groups are re-added before ``load_state_dict`` (see
    [`transferkit.GradualUnfreezing`][]).

    Supported: every ``torch.optim.lr_scheduler`` class, Hugging Face
    ``get_*_schedule_with_warmup`` (they are ``LambdaLR``) and [`FactorSchedule`][].
    A scheduler without a closed form (``MultiplicativeLR``, a custom subclass) gives
    the new group the first group's current factor, exact for multiplicative schedules.
    ``ReduceLROnPlateau`` leaves the new group at its lr; later reductions apply to it.
    A ``LambdaLR`` with one function per group gives the new groups the first one.
    timm's ``timm.scheduler`` classes are not torch schedulers (they are stepped with an
    explicit epoch and keep per-group lists of their own) and raise ``TypeError``.

    Args:
        scheduler: a scheduler built on the optimizer that received the new groups.

    Returns:
        The indices of the parameter groups added to the schedule (empty when it already
        knew every group).

    Raises:
        TypeError: ``scheduler`` is not a torch learning-rate scheduler.
        ValueError: the optimizer has fewer groups than the scheduler knows.

    Examples:
        >>> import torch
        >>> weight, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> optimizer = torch.optim.SGD([weight], lr=0.1)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        >>> optimizer.step(); scheduler.step()
        >>> optimizer.add_param_group({"params": [bias], "lr": 0.02})
        >>> extend_scheduler(scheduler)
        [1]
        >>> [round(g["lr"], 6) for g in optimizer.param_groups]
        [0.05, 0.01]
        >>> optimizer.step(); scheduler.step()
        >>> [round(g["lr"], 6) for g in optimizer.param_groups]
        [0.025, 0.005]
    """
    if not isinstance(scheduler, _SCHEDULER_TYPES):
        raise TypeError(
            "scheduler: expected a torch.optim.lr_scheduler scheduler, got "
            f"{type(scheduler).__name__}"
        )
    optimizer = scheduler.optimizer
    for node in _nodes(scheduler):
        if getattr(node, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler: its child schedulers drive different optimizers")
    known = _known_groups(scheduler)
    total = len(optimizer.param_groups)
    if total < known:
        raise ValueError(
            f"scheduler: it knows {known} parameter groups but the optimizer has only {total}; "
            "groups were removed, rebuild the scheduler"
        )
    new = list(range(known, total))
    if not new:
        return []
    bases = [float(optimizer.param_groups[i]["lr"]) for i in new]
    _extend_lists(scheduler, new, bases)
    values = _current(scheduler, new, bases)
    for i, value in zip(new, values, strict=True):
        optimizer.param_groups[i]["lr"] = value
    last = [group["lr"] for group in optimizer.param_groups]
    for node in _nodes(scheduler):
        if hasattr(node, "_last_lr"):
            node._last_lr = list(last)
    logger.info("extend_scheduler: %s now schedules groups %s", type(scheduler).__name__, new)
    return new


# --------------------------------------------------------------------------- recipes


class FactorSchedule(torch_schedulers.LambdaLR):
    """A ``LambdaLR`` whose one factor function scales every group, present or added later.

    At every step each group's lr is its base lr times ``factor(step)``. A group added to
    the optimizer after construction (gradual unfreezing, ``add_param_group``) is picked up
    at the next [`step`][] with its lr at that time as its base, so it never breaks the
    schedule; [`extend_scheduler`][] (or ``GradualUnfreezing(..., scheduler=...)``) puts
    it on the schedule right away instead of at the next step. Its ``state_dict()`` then
    covers the added groups; to resume, re-add them (with the lrs they were added with)
    before ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``.

    Args:
        optimizer: the optimizer whose groups are scheduled.
        factor: ``step -> multiplier`` (a picklable object keeps its state in
            ``state_dict()``, as with ``LambdaLR``).
        last_epoch: as in torch schedulers (``-1`` for a fresh start).

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> scheduler = FactorSchedule(optimizer, lambda step: 1 / (1 + step))
        >>> optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
        >>> optimizer.step(); scheduler.step()
        >>> [g["lr"] for g in optimizer.param_groups]
        [0.5, 0.25]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[int], float],
        last_epoch: int = -1,
    ) -> None:
        _check_optimizer(optimizer)
        if not callable(factor):
            raise TypeError(f"factor: expected a function of the step, got {factor!r}")
        super().__init__(optimizer, factor, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        """Base lr times the factor, for every group (new ones join with their lr)."""
        known = len(self.base_lrs)
        if len(self.optimizer.param_groups) > known:
            new = list(range(known, len(self.optimizer.param_groups)))
            _extend_lists(self, new, [float(self.optimizer.param_groups[i]["lr"]) for i in new])
        value = self.lr_lambdas[0](self.last_epoch)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"factor: expected a finite, non-negative multiplier at step {self.last_epoch}, "
                f"got {value!r}"
            )
        return super().get_lr()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict()``, also one that covers added groups.

        A schedule that picked up groups added mid-run saves one factor entry per group;
        the fresh schedule of a resumed run knows only the groups it was built with, so it
        first extends itself to the saved count (every group shares the one factor).

        Args:
            state_dict: a mapping returned by ``state_dict()``.
        """
        saved = state_dict.get("lr_lambdas")
        if isinstance(saved, (list, tuple)) and len(saved) > len(self.lr_lambdas):
            extra = len(saved) - len(self.lr_lambdas)
            self.lr_lambdas = [*self.lr_lambdas, *[self.lr_lambdas[0]] * extra]
        super().load_state_dict(state_dict)


class _CycleFactor:
    """``step -> factor``: warm up from ``start`` to 1, then cosine-anneal to ``end``.

    A plain object (no closure) so that ``LambdaLR.state_dict()`` stores its settings.
    """

    def __init__(
        self, total_steps: int, warmup_steps: int, start: float, end: float, shape: str
    ) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start = start
        self.end = end
        self.shape = shape

    def __call__(self, step: int) -> float:
        step = min(max(int(step), 0), self.total_steps)
        if step < self.warmup_steps:
            progress = step / self.warmup_steps
            if self.shape == "cos":
                progress = (1.0 - math.cos(math.pi * progress)) / 2.0
            return self.start + (1.0 - self.start) * progress
        span = self.total_steps - self.warmup_steps
        progress = (step - self.warmup_steps) / span if span > 0 else 0.0  # all warmup: peak
        return self.end + (1.0 - self.end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _check_optimizer(optimizer: object) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )


def _check_steps(total_steps: object) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int):
        raise TypeError(
            f"total_steps: expected a positive integer, got {type(total_steps).__name__} "
            f"{total_steps!r}"
        )
    if total_steps < 1:
        raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
    return total_steps


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e5,
) -> FactorSchedule:
    """One-cycle schedule of fastai's ``fit_one_cycle``, as a [`FactorSchedule`][].

    Every group's lr starts at ``lr / div_factor``, rises along a half cosine to its own
    ``lr`` (the peak) over the first ``pct_start`` of the steps, then falls along a half
    cosine to ``lr / final_div_factor`` at ``total_steps`` and stays there. Groups added
    later (gradual unfreezing) follow the same curve scaled to their own lr. Unlike
    ``torch.optim.lr_scheduler.OneCycleLR`` it does not cycle momentum and does not raise
    after ``total_steps``.

    Args:
        optimizer: its groups' current lrs are the peaks.
        total_steps: number of ``scheduler.step()`` calls of the whole cycle.
        pct_start: share of the steps spent warming up, in ``[0, 1]``.
        div_factor: peak / start lr (``>= 1``).
        final_div_factor: peak / final lr (``>= 1``).

    Returns:
        The scheduler; call ``scheduler.step()`` after every ``optimizer.step()``.

    Raises:
        ValueError: ``total_steps``, ``pct_start`` or the factors out of range.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> scheduler = one_cycle(optimizer, 8, pct_start=0.25, div_factor=10)
        >>> lrs = []
        >>> for _ in range(8):
        ...     lrs.append(round(optimizer.param_groups[0]["lr"], 4))
        ...     optimizer.step(); scheduler.step()
        >>> lrs
        [0.1, 0.55, 1.0, 0.933, 0.75, 0.5, 0.25, 0.067]
    """
    _check_optimizer(optimizer)
    steps = _check_steps(total_steps)
    pct = check_in_range(pct_start, "pct_start", 0.0, 1.0)
    for value, name in ((div_factor, "div_factor"), (final_div_factor, "final_div_factor")):
        if check_positive(value, name) < 1.0:
            raise ValueError(f"{name}: expected a value >= 1 (peak / lower lr), got {value!r}")
    factor = _CycleFactor(
        steps, round(pct * steps), 1.0 / float(div_factor), 1.0 / float(final_div_factor), "cos"
    )
    return FactorSchedule(optimizer, factor)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    start_factor: float = 0.0,
    final_factor: float = 0.0,
    warmup: WarmupShape = "linear",
) -> FactorSchedule:
    """Warmup then cosine decay (Hugging Face ``get_cosine_schedule_with_warmup``).

    Every group's lr rises from ``start_factor * lr`` to its own ``lr`` over
    ``warmup_steps`` (linearly, or along a half cosine with ``warmup="cos"``), then falls
    along a half cosine to ``final_factor * lr`` at ``total_steps`` and stays there. With
    the defaults it equals Hugging Face's schedule step for step. Groups added later
    follow the same curve scaled to their own lr.

    Args:
        optimizer: its groups' current lrs are the peaks.
        total_steps: number of ``scheduler.step()`` calls in all.
        warmup_steps: steps of warmup, in ``[0, total_steps]``.
        start_factor: lr multiplier at step 0, in ``[0, 1]``.
        final_factor: lr multiplier at the end, in ``[0, 1]``.
        warmup: ``"linear"`` or ``"cos"``.

    Returns:
        The scheduler; call ``scheduler.step()`` after every ``optimizer.step()``.

    Raises:
        ValueError: a step count or factor out of range, or an unknown ``warmup``.

    Examples:
        >>> import torch
        >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> scheduler = warmup_cosine(optimizer, 6, warmup_steps=2)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(optimizer.param_groups[0]["lr"], 4))
        ...     optimizer.step(); scheduler.step()
        >>> lrs
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464]
    """
    _check_optimizer(optimizer)
    steps = _check_steps(total_steps)
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, int)
        or not 0 <= warmup_steps <= steps
    ):
        raise ValueError(
            f"warmup_steps: expected an integer in [0, total_steps={steps}], got {warmup_steps!r}"
        )
    start = check_in_range(start_factor, "start_factor", 0.0, 1.0)
    end = check_in_range(final_factor, "final_factor", 0.0, 1.0)
    shape = check_option(warmup, "warmup", _WARMUP_SHAPES)
    return FactorSchedule(optimizer, _CycleFactor(steps, warmup_steps, start, end, shape))
