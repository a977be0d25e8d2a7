"""[`GradualUnfreezing`][]: unfreeze stage by stage into a live optimizer and its scheduler."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._surgery import find_ddp, unwrap_model
from .._validation import check_bool, check_in_range, check_option, check_positive
from ..schedules import _SCHEDULER_TYPES, Scheduler, extend_scheduler
from ..schedules import _nodes as _scheduler_nodes
from ._batchnorm import _BN_POLICIES, BNPolicy, _holds_bn_affine
from ._blocks import _blocks, _depths, _head_name
from ._ddp import _check_ddp_synced
from ._freeze import freeze, unfreeze
from ._param_groups import (
    _decay_exempt,
    _decay_split_groups,
    _decayed_groups_weight_decay,
    _no_decay_tokens,
    _owners,
)
from ._selection import _as_patterns, _Selection

logger = logging.getLogger("transferkit.freezing")


class GradualUnfreezing:
    """Unfreeze a network stage by stage, from the top down, into a live optimizer.

    At construction every parameter matched by a stage is frozen (with the ``bn`` policy);
    parameters that no stage names, typically the new head, are left as they are. Every
    ``every`` calls to [`step`][] (call it once per epoch, or once per optimizer step)
    the next stage is unfrozen, and its parameters are added to ``optimizer`` as new
    parameter groups. So the stage ``k`` (0-based) trains from the ``(k + 1) * every``-th
    call on.

    The new groups continue the settings of the groups the optimizer already has, not the
    optimizer's defaults:

    * weight decay: ``weight_decay``, or by default the value of the first existing group
      that holds a decayed parameter (so ``AdamW(tk.param_groups(model, lr))`` keeps 0.0,
      not AdamW's default 0.01); biases, normalisation weights and timm's
      ``no_weight_decay()`` names go to a ``(no_decay)`` group with ``weight_decay=0.0``,
      as in [`param_groups`][].
    * layer-wise lr decay: with ``layer_decay``, a stage is split into the blocks of
      [`param_groups`][] and the block ``d`` steps below the head gets
      ``lr * layer_decay**d``, so after the last stage the optimizer holds exactly the lrs
      ``param_groups(model, lr, layer_decay=...)`` gives the unfrozen model. Without it
      (and without ``lr``), the decay is also continued when the existing groups carry
      one: the ``layer_decay`` key that ``param_groups(..., layer_decay=...)`` writes into
      every group (so an optimizer built from the head alone continues it), or groups at
      two or more depths whose lrs fall by one factor per block (logged).

    Learning-rate schedulers: pass ``scheduler=`` (or set [`scheduler`][] once it is
    built) and every new group joins it at its current step, scaled to the group's lr,
    as if it had been there from the start (see
    [`transferkit.schedules.extend_scheduler`][]; ``LambdaLR``, ``OneCycleLR``,
    ``CosineAnnealingLR``, ``SequentialLR``, Hugging Face warmup schedules, ...). Without
    it, a scheduler built earlier does not know the new groups: ``LambdaLR`` then fails at
    its next step, ``OneCycleLR`` with ``KeyError: 'max_lr'`` (a warning says so). The
    group's lr (``lr``, or the head lr with ``layer_decay``) is its *base* lr: the peak
    of a one-cycle schedule, the starting lr of the others.

    [`state_dict`][] holds the step count; [`load_state_dict`][] re-applies the
    freezing of that stage and re-adds the groups (and extends the scheduler) in the
    original order. When resuming, build the scheduler, load the schedule's state, then
    ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``, so the group layout
    matches.

    Build ``optimizer`` from the parameters that train before the first stage (e.g. after
    ``freeze(model, exclude="fc")``, from [`param_groups`][]); stage parameters it
    already holds are not added again and keep their group's settings (a warning says so).

    Args:
        model: the network, or its ``DistributedDataParallel`` wrapper built with every
            parameter trainable and ``find_unused_parameters=True`` (checked at
            construction): every rank must call [`step`][] equally often, so all ranks
            unfreeze together. Or re-wrap after each stage. Under ``torch.compile`` each
            stage change causes one recompilation.
        stages: from the top of the network down; each stage a glob pattern or a list of
            patterns, e.g. ``["layer4", "layer3", ["layer2", "layer1"]]``.
        optimizer: receives the newly trainable parameters; ``None`` only toggles freezing.
        every: calls to [`step`][] between two stages.
        lr: base learning rate of the new groups: one value, one per stage, or ``None``
            for the base lr of the optimizer's first group (its OneCycleLR ``max_lr`` or
            CyclicLR upper bound, else its ``initial_lr``, else its ``lr``). With
            ``layer_decay``: the head's lr (one value; ``None`` reads it off the existing
            groups' base lrs, the same way).
        bn: BatchNorm policy for frozen stages (see [`freeze`][]).
        weight_decay: weight decay of the new decayed groups (``None``: inherited, see above).
        no_decay: names that get no weight decay, as in [`param_groups`][].
        layer_decay: factor in ``(0, 1]`` per block below the head, as in
            [`param_groups`][].
        scheduler: a learning-rate scheduler built on ``optimizer``, extended at each stage.
        train_bn: keep the BatchNorm affine terms of frozen stages trainable (fastai's
            ``train_bn``; see [`freeze`][]); they are added to the optimizer at
            construction, with their stage's settings.

    Raises:
        ValueError: empty stages, a stage pattern that matches nothing, bad
            ``every``/``lr``/``layer_decay``, a scheduler of another optimizer, or a DDP
            wrapper that cannot unfreeze the stages.

    Examples:
        >>> import torch, transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.1)
        >>> schedule = tk.GradualUnfreezing(net, ["neck", "features"], optimizer, lr=0.01)
        >>> net.neck[1].weight.requires_grad, len(optimizer.param_groups)
        (False, 1)
        >>> schedule.step()
        ['neck.1.weight', 'neck.1.bias']
        >>> [g["lr"] for g in optimizer.param_groups]
        [0.1, 0.01, 0.01]
        >>> schedule.state_dict()
        {'steps': 1, 'stage': 1}

        With a scheduler and layer-wise decay:

        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> _ = tk.freeze(net, exclude="fc")
        >>> optimizer = torch.optim.AdamW(tk.param_groups(net, 1e-3, weight_decay=0.05))
        >>> scheduler = tk.schedules.warmup_cosine(optimizer, 100, warmup_steps=10)
        >>> schedule = tk.GradualUnfreezing(
        ...     net, ["neck", "features"], optimizer, layer_decay=0.5, scheduler=scheduler
        ... )
        >>> _ = schedule.step()
        >>> [(g["name"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('fc', 0.001, 0.05), ('fc (no_decay)', 0.001, 0.0),
         ('stage 0: neck.1', 0.0005, 0.05), ('stage 0: neck.1 (no_decay)', 0.0005, 0.0)]
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[str | Sequence[str]],
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 1,
        lr: float | Sequence[float] | None = None,
        *,
        bn: BNPolicy = "eval",
        weight_decay: float | None = None,
        no_decay: str | Sequence[str] = ("bias", "norm"),
        layer_decay: float | None = None,
        scheduler: Scheduler | None = None,
        train_bn: bool = False,
    ) -> None:
        self._ddp = find_ddp(model) if isinstance(model, nn.Module) else None
        self.model = unwrap_model(model)
        self._target: nn.Module = self._ddp if self._ddp is not None else self.model
        if isinstance(stages, str) or not isinstance(stages, Sequence):
            raise TypeError(
                "stages: expected a list of patterns (one entry per stage, top first), e.g. "
                f"['fc', 'layer4'], got {type(stages).__name__} {stages!r}"
            )
        if not stages:
            raise ValueError("stages: expected at least one stage, got an empty list")
        self.stages: list[list[str]] = []
        for i, stage in enumerate(stages):
            patterns = _as_patterns(stage, f"stages[{i}]")
            if patterns is None:
                raise TypeError(f"stages[{i}]: expected a glob pattern or a list of them, got None")
            # Checked here, so that a pattern matching nothing is reported as stages[i].
            _Selection(self.model, patterns, None, None, None, include_name=f"stages[{i}]")
            self.stages.append(patterns)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.every = int(check_positive(every, "every", integer=True))
        if lr is None or isinstance(lr, (int, float)):
            self.lrs: list[float | None] = [
                None if lr is None else check_positive(lr, "lr") for _ in self.stages
            ]
        else:
            values = list(lr)
            if len(values) != len(self.stages):
                raise ValueError(
                    f"lr: expected one value per stage ({len(self.stages)}), got {len(values)}"
                )
            self.lrs = [check_positive(v, "lr") for v in values]
        self.layer_decay = None
        if layer_decay is not None:
            self.layer_decay = check_in_range(layer_decay, "layer_decay", 0.0, 1.0)
            if self.layer_decay == 0.0:
                raise ValueError("layer_decay: expected a value in (0, 1], got 0.0")
            if lr is not None and not isinstance(lr, (int, float)):
                raise ValueError(
                    "lr: with layer_decay, give one lr (the head's; each block gets "
                    "lr * layer_decay**depth), not one per stage"
                )
        self.bn: BNPolicy = check_option(bn, "bn", _BN_POLICIES)
        train_bn = check_bool(train_bn, "train_bn")
        if train_bn and self.bn == "frozen":
            raise ValueError("train_bn: True needs bn='train' or 'eval', not 'frozen'")
        self.train_bn = train_bn
        self.weight_decay = (
            None
            if weight_decay is None
            else check_positive(weight_decay, "weight_decay", strict=False)
        )
        self.no_decay = _no_decay_tokens(no_decay)
        self._tokens = _decay_exempt(self.model, self.no_decay)
        self.scheduler = scheduler
        self._check_scheduler()
        self._warned_scheduler = False
        self.steps = 0
        self.stage = 0
        if self._ddp is not None:
            patterns = [p for stage in self.stages for p in stage]
            entries = _Selection(self.model, patterns, None, None, None).entries
            _check_ddp_synced(
                self._ddp, [(n, p) for n, _, p in entries if p is not None], "GradualUnfreezing"
            )
        held = set() if optimizer is None else self._held()
        self._freeze_all()
        if optimizer is None:
            return
        patterns = [p for stage in self.stages for p in stage]
        staged = _Selection(self.model, patterns, None, None, None).entries
        overlap = sum(
            1
            for _, owner, p in staged
            if p is not None and id(p) in held and not (train_bn and _holds_bn_affine(owner))
        )
        if overlap:
            logger.warning(
                "GradualUnfreezing: the optimizer already holds %d parameter tensors of "
                "the stages; they will train with their existing group's lr when "
                "unfrozen. Build the optimizer after freezing (tk.freeze(model, "
                "exclude='fc'); tk.param_groups(model, lr)) to give each stage its own "
                "group.",
                overlap,
            )
        if train_bn:
            for k in range(len(self.stages)):
                self._add_to_optimizer(k, batchnorm_only=True)

    @property
    def done(self) -> bool:
        """Whether every stage is unfrozen."""
        return self.stage >= len(self.stages)

    def _check_scheduler(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        if not isinstance(scheduler, _SCHEDULER_TYPES):
            raise TypeError(
                "scheduler: expected a torch.optim.lr_scheduler scheduler, got "
                f"{type(scheduler).__name__}"
            )
        if self.optimizer is None or scheduler.optimizer is not self.optimizer:
            raise ValueError(
                "scheduler: it must be built on the optimizer given to GradualUnfreezing "
                "(the one that receives the unfrozen groups)"
            )

    def _held(self) -> set[int]:
        assert self.optimizer is not None
        return {id(p) for group in self.optimizer.param_groups for p in group["params"]}

    def _freeze_all(self) -> None:
        patterns = [p for stage in self.stages for p in stage]
        freeze(self._target, include=patterns, bn=self.bn, train_bn=self.train_bn)

    def _unfreeze_stage(self, k: int) -> list[str]:
        names = unfreeze(self._target, include=self.stages[k])
        if self.optimizer is not None:
            self._add_to_optimizer(k)
        logger.info("GradualUnfreezing: stage %d (%s) unfrozen", k, ", ".join(self.stages[k]))
        return names

    # ---------------------------------------------------------------- inherited settings

    def _block_depths(self) -> tuple[list[str], dict[int, tuple[int, int]]]:
        """Block names, and ``id(param) -> (block index, depth below the head)``."""
        blocks = _blocks(self.model)
        names = [name for name, _, _ in blocks]
        depths = _depths(names, _head_name(self.model))
        where = {
            id(p): (i, depth)
            for i, ((_, _, params), depth) in enumerate(zip(blocks, depths, strict=True))
            for _, p in params
        }
        return names, where

    def _base_lr(self, index: int) -> float:
        """The lr group ``index`` was built with (its peak under a cyclic schedule).

        OneCycleLR's ``max_lr`` key, CyclicLR's ``max_lrs`` entry, else a scheduler's
        ``initial_lr``, else ``lr``.
        """
        assert self.optimizer is not None
        if self.scheduler is not None:
            for node in _scheduler_nodes(self.scheduler):
                if isinstance(node, torch.optim.lr_scheduler.CyclicLR) and index < len(
                    node.max_lrs
                ):
                    return float(node.max_lrs[index])  # CyclicLR keeps its peaks in a list
        group = self.optimizer.param_groups[index]
        for key in ("max_lr", "initial_lr", "lr"):
            if key in group:
                return float(group[key])
        raise ValueError("optimizer: a parameter group has no 'lr'")

    def _reference_lr(self) -> float:
        """The base lr of the optimizer's first group."""
        return self._base_lr(0)

    def _existing_depths(self) -> list[tuple[float, int]]:
        """``(base lr, depth)`` of the existing groups whose parameters share one depth."""
        assert self.optimizer is not None
        _, where = self._block_depths()
        found: list[tuple[float, int]] = []
        for index, group in enumerate(self.optimizer.param_groups):
            depths = {where[id(p)][1] for p in group["params"] if id(p) in where}
            if len(depths) == 1:
                found.append((self._base_lr(index), depths.pop()))
        return found

    def _recorded_layer_decay(self) -> float | None:
        """The ``layer_decay`` that [`param_groups`][] wrote into the existing groups."""
        assert self.optimizer is not None
        values = {group.get("layer_decay") for group in self.optimizer.param_groups}
        if len(values) != 1:
            return None
        value = values.pop()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not 0.0 < value <= 1.0 or not self._existing_depths():
            return None
        return float(value)

    def _layer_pattern(self) -> tuple[float, float] | None:
        """``(head lr, factor)`` when the existing groups decay by one factor per block."""
        found = self._existing_depths()
        depths = sorted({d for _, d in found})
        if len(depths) < 2:
            return None
        by_depth = {d: lr for lr, d in found}
        top, bottom = depths[0], depths[-1]
        if by_depth[top] <= 0 or by_depth[bottom] <= 0:
            return None
        factor = (by_depth[bottom] / by_depth[top]) ** (1.0 / (bottom - top))
        head = by_depth[top] / factor**top
        if not 0.0 < factor < 1.0 or any(
            not math.isclose(lr, head * factor**d, rel_tol=1e-6) for lr, d in found
        ):
            return None
        return head, factor

    def _stage_lrs(self, k: int) -> tuple[float | None, float | None]:
        """``(lr, layer factor)``: one lr for the stage, or the head lr and the factor."""
        assert self.optimizer is not None
        lr = self.lrs[k]
        if self.layer_decay is not None:
            if lr is not None:
                return lr, self.layer_decay
            found = self._existing_depths()
            if not found:
                return self._reference_lr(), self.layer_decay
            base, depth = min(found, key=lambda item: item[1])
            return base / self.layer_decay**depth, self.layer_decay
        if lr is not None:
            return lr, None
        recorded = self._recorded_layer_decay()
        if recorded is not None:
            found = self._existing_depths()
            base, depth = min(found, key=lambda item: item[1])
            logger.info(
                "GradualUnfreezing: continuing the layer_decay=%.3g of the optimizer's groups "
                "(from param_groups)",
                recorded,
            )
            return base / recorded**depth, recorded
        pattern = self._layer_pattern()
        if pattern is not None:
            logger.info(
                "GradualUnfreezing: continuing the layer-wise lr decay of the optimizer's "
                "groups (head lr %.3g, factor %.3g per block)",
                *pattern,
            )
            return pattern
        return self._reference_lr(), None

    def _add_to_optimizer(self, k: int, *, batchnorm_only: bool = False) -> None:
        optimizer = self.optimizer
        assert optimizer is not None
        held = self._held()
        selection = _Selection(self.model, self.stages[k], None, None, None)
        fresh = [
            (n, p)
            for n, owner, p in selection.entries
            if p is not None
            and p.requires_grad
            and id(p) not in held
            and (not batchnorm_only or _holds_bn_affine(owner))
        ]
        if not fresh:
            return
        lr, factor = self._stage_lrs(k)
        assert lr is not None
        decay_value = (
            _decayed_groups_weight_decay(self.model, optimizer, self._tokens)
            if self.weight_decay is None
            else self.weight_decay
        )
        label = f"stage {k}{' batchnorm' if batchnorm_only else ''}"
        chunks: list[tuple[str, list[tuple[str, nn.Parameter]], float]] = []
        if factor is None:
            chunks.append((f"{label}: {', '.join(self.stages[k])}", fresh, lr))
        else:
            block_names, where = self._block_depths()
            by_block: dict[int, list[tuple[str, nn.Parameter]]] = {}
            for name, p in fresh:
                by_block.setdefault(where[id(p)][0], []).append((name, p))
            for index in sorted(by_block):
                params = by_block[index]
                depth = where[id(params[0][1])][1]
                chunks.append((f"{label}: {block_names[index]}", params, lr * factor**depth))
        owners = _owners(self.model)
        set_initial = self.scheduler is None and "initial_lr" in optimizer.param_groups[0]
        for name, params, group_lr in chunks:
            for group in _decay_split_groups(
                name,
                params,
                owners,
                self._tokens,
                lr=group_lr,
                weight_decay=decay_value,
                factor=factor,
            ):
                if set_initial:
                    group["initial_lr"] = group_lr
                optimizer.add_param_group(group)
        if self.scheduler is not None:
            self._check_scheduler()
            extend_scheduler(self.scheduler)
        elif set_initial and not self._warned_scheduler:
            self._warned_scheduler = True
            logger.warning(
                "GradualUnfreezing: a learning-rate scheduler was built on this optimizer "
                "but does not know the new groups (LambdaLR fails at its next step, "
                "OneCycleLR with KeyError 'max_lr', others leave the new lr constant); pass "
                "scheduler= to GradualUnfreezing or set schedule.scheduler"
            )

    def step(self) -> list[str]:
        """Count one epoch (or step); unfreeze the next stage when it is due.

        Returns:
            Names of the parameters unfrozen by this call (usually empty).
        """
        self.steps += 1
        due = min(self.steps // self.every, len(self.stages))
        names: list[str] = []
        while self.stage < due:
            names += self._unfreeze_stage(self.stage)
            self.stage += 1
        return names

    def state_dict(self) -> dict[str, int]:
        """The schedule's progress: ``{"steps": ..., "stage": ...}``."""
        return {"steps": self.steps, "stage": self.stage}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the progress and re-apply exactly that stage's freezing.

        Every stage is frozen again, then stages ``0 .. stage-1`` are unfrozen in order,
        adding their groups to the optimizer (and the scheduler) if it does not hold them
        yet. Call it before ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``.

        Raises:
            ValueError: ``state`` is not from a schedule with as many stages.
        """
        if not isinstance(state, Mapping) or not {"steps", "stage"} <= set(state):
            raise ValueError(f"state: expected keys 'steps' and 'stage', got {state!r}")
        steps, stage = int(state["steps"]), int(state["stage"])
        if steps < 0 or not 0 <= stage <= len(self.stages):
            raise ValueError(f"state: stage {stage} is out of range for {len(self.stages)} stages")
        self._freeze_all()
        self.steps, self.stage = steps, 0
        while self.stage < stage:
            self._unfreeze_stage(self.stage)
            self.stage += 1
