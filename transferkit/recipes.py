"""Training recipes for domain adaptation: the published defaults, per method.

A method's loss alone does not reproduce its paper: the optimiser, the annealed
learning rate, the ramp of the trade-off, the bottleneck and the handling of
BatchNorm matter as much. [`recipe`][] returns them as a frozen [`Recipe`][],
with helpers that put them into your loop::

    r = tk.recipe("dann")
    optimizer = r.optimizer(params)                 # SGD, momentum 0.9, Nesterov
    scheduler = r.scheduler(optimizer, max_steps)   # lr0 * (1 + 10 p) ** -0.75
    weight = r.tradeoff_at(step / max_steps)        # trade-off * ramp(p)

Values follow the papers and the Transfer-Learning-Library (TLlib) defaults; the
``bn`` field is our addition, measured on the benchmarks (domain-specific BatchNorm
during training, target statistics at test time; shared statistics made DANN worse than
source-only there). See the adaptation guide for the measured effect of each piece.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from ._validation import (
    check_bool,
    check_in_range,
    check_option,
    check_positive,
    did_you_mean,
)
from .averaging import ModelEMA
from .freezing import param_groups
from .self_training import PseudoLabeler

__all__ = ["Recipe", "available", "recipe"]

logger = logging.getLogger(__name__)

RampKind = Literal["dann", "sigmoid", "linear", "none"]
BNMode = Literal["domain", "adabn", "shared"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training settings of one adaptation method.

    Attributes:
        method: the method's name (see [`available`][]).
        lr: initial learning rate ``lr0`` of SGD.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay.
        lr_gamma: ``gamma`` of the annealing ``lr0 * (1 + gamma * p) ** -lr_power``,
            ``p = step / max_steps`` (Ganin & Lempitsky, 2015: 10).
        lr_power: its exponent (0.75).
        tradeoff: final weight of the adaptation term.
        ramp: how the weight rises from 0 to ``tradeoff`` over training: ``"dann"``
            (``2 / (1 + exp(-10 p)) - 1``, rescaled to reach 1 at ``p = 1``),
            ``"sigmoid"`` (``exp(-5 (1 - p)^2)``), ``"linear"`` or ``"none"``.
        warmup: fraction of training, in ``[0, 1)``, before the adaptation term starts
            (weight 0: the network learns from the labelled source first); the ramp
            then runs over the rest of training.
        bottleneck_dim: width of the bottleneck between backbone and classifier that
            the reference implementations use on ResNet-50 (the digit benchmarks use
            ``tk.models.SmallCNN``'s 128-d neck).
        batch_size: source and target samples per step, each.
        bn: BatchNorm handling: ``"domain"`` (per-domain statistics in training with
            [`transferkit.convert_domain_bn`][] / [`transferkit.bn_domain`][], the
            target's at test time), ``"adabn"`` (shared BatchNorm, forward each domain's
            batch separately, then [`transferkit.adapt_batchnorm`][] on target before
            testing) or ``"shared"`` (one concatenated batch, as in the original code).
        options: method-specific settings (e.g. MCC's ``temperature``, MDD's
            ``margin``, self-training's ``threshold``).
        reference: where the values come from.

    Examples:
        >>> r = recipe("dann")
        >>> r.lr, r.tradeoff, r.bn
        (0.01, 0.3, 'domain')
        >>> round(r.lr_at(1.0), 5)  # 0.01 * 11 ** -0.75
        0.00166
        >>> r.tradeoff_at(0.0), r.tradeoff_at(1.0)
        (0.0, 0.3)
    """

    method: str
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_gamma: float = 10.0
    lr_power: float = 0.75
    tradeoff: float = 1.0
    ramp: RampKind = "dann"
    warmup: float = 0.0
    bottleneck_dim: int = 256
    batch_size: int = 32
    bn: BNMode = "domain"
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    reference: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise TypeError(f"method: expected a str, got {type(self.method).__name__}")
        for name in ("lr", "weight_decay", "lr_gamma", "lr_power", "tradeoff"):
            check_positive(getattr(self, name), name, strict=name == "lr")
        check_in_range(self.momentum, "momentum", 0.0, 1.0)
        _check_warmup(self.warmup)
        check_bool(self.nesterov, "nesterov")
        check_option(self.ramp, "ramp", ("dann", "sigmoid", "linear", "none"))
        check_option(self.bn, "bn", ("domain", "adabn", "shared"))
        for name in ("bottleneck_dim", "batch_size"):
            check_positive(getattr(self, name), name, integer=True)
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def lr_factor(self, progress: float) -> float:
        """``(1 + lr_gamma * p) ** -lr_power`` for ``p`` clipped to ``[0, 1]``."""
        p = _progress(progress)
        return float((1.0 + self.lr_gamma * p) ** -self.lr_power)

    def lr_at(self, progress: float) -> float:
        """The annealed learning rate ``lr * lr_factor(progress)``."""
        return self.lr * self.lr_factor(progress)

    def tradeoff_at(self, progress: float) -> float:
        """The ramped weight of the adaptation term at training progress ``p``.

        0 during the warm-up (``p < warmup``); then ``tradeoff * ramp(q)`` with
        ``q = (p - warmup) / (1 - warmup)``.
        """
        p = _progress(progress)
        if p < self.warmup:
            return 0.0
        p = (p - self.warmup) / (1.0 - self.warmup)
        if self.ramp == "none":
            ramp = 1.0
        elif self.ramp == "linear":
            ramp = p
        elif self.ramp == "sigmoid":
            ramp = 1.0 if p >= 1.0 else math.exp(-5.0 * (1.0 - p) ** 2)
        else:
            top = 2.0 / (1.0 + math.exp(-10.0)) - 1.0
            ramp = (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0) / top
        return self.tradeoff * ramp

    def optimizer(self, params: Iterable[Any]) -> torch.optim.SGD:
        """SGD with this recipe's learning rate, momentum, Nesterov and weight decay.

        ``params`` may be parameters or param-group dicts (e.g. from
        [`Recipe.param_groups`][transferkit.Recipe.param_groups]); groups that set their
        own ``lr`` or ``weight_decay`` keep them, and every ``lr`` is annealed by the same
        factor. A warning is logged when every decayed group sets weight decay 0.0 while
        the recipe has some: usually ``tk.param_groups(model, lr)`` without
        ``weight_decay`` (``recipe.param_groups(model)`` passes the recipe's).
        """
        params = list(params)
        decayed = [
            float(g["weight_decay"])
            for g in params
            if isinstance(g, Mapping)
            and "weight_decay" in g
            and not str(g.get("name", "")).endswith("(no_decay)")
        ]
        if self.weight_decay > 0 and decayed and not any(decayed):
            logger.warning(
                "Recipe.optimizer: every parameter group sets weight_decay=0.0, not the "
                "recipe's %g; use recipe.param_groups(model), or tk.recipe(%r, "
                "weight_decay=0.0) if no decay is intended",
                self.weight_decay,
                self.method,
            )
        return torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov and self.momentum > 0,
            weight_decay=self.weight_decay,
        )

    def param_groups(
        self,
        model: nn.Module,
        *,
        layer_decay: float | None = None,
        no_decay: str | Sequence[str] = ("bias", "norm"),
    ) -> list[dict[str, Any]]:
        """[`transferkit.param_groups`][] with this recipe's ``lr`` and ``weight_decay``.

        Examples:
            >>> import transferkit as tk
            >>> groups = recipe("dann").param_groups(tk.models.SmallCNN(num_classes=3))
            >>> groups[0]["lr"], groups[0]["weight_decay"], groups[1]["weight_decay"]
            (0.01, 0.0005, 0.0)
        """
        decay = self.weight_decay
        return param_groups(
            model, self.lr, layer_decay=layer_decay, weight_decay=decay, no_decay=no_decay
        )

    def scheduler(
        self, optimizer: torch.optim.Optimizer, max_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` that anneals every group's learning rate over ``max_steps``.

        Call ``scheduler.step()`` once per training step, after ``optimizer.step()``.
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_factor(step / max_steps)
        )

    def at_lr(self, lr: float) -> Recipe:
        """This recipe for training at learning rate ``lr``.

        ``lr`` replaces the recipe's. For methods whose term moves the features by a
        fixed step per update (option ``scale_tradeoff_with_lr`` != 0: stepwise AFN,
        whose norms grow by about ``lr * tradeoff * delta`` per step) the trade-off is
        scaled by ``self.lr / lr`` so that the step stays the published one; for the
        others only the learning rate changes (as ``recipe(method, lr=lr)``).

        Examples:
            >>> recipe("afn").at_lr(0.1).tradeoff  # 0.05 * 0.001 / 0.1
            0.0005
            >>> recipe("dann").at_lr(0.1).tradeoff
            0.3
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        if not math.isfinite(lr):
            raise ValueError(f"lr: expected a finite number, got {lr!r}")
        tradeoff = self.tradeoff
        if self.options.get("scale_tradeoff_with_lr"):
            tradeoff = self.tradeoff * self.lr / lr
        return dataclasses.replace(self, lr=float(lr), tradeoff=tradeoff)

    def pseudo_labeler(self, num_classes: int, max_steps: int) -> PseudoLabeler:
        """A [`transferkit.PseudoLabeler`][] with this recipe's settings for ``max_steps``.

        Threshold (option ``threshold``, default 0.95), distribution alignment (option
        ``distribution_alignment`` != 0), weight ``tradeoff``, the warm-up
        (``warmup * max_steps`` steps at weight 0) and the ramp over the remaining
        steps (``"none"`` ramps linearly over zero steps, i.e. full weight at once).

        Examples:
            >>> labeler = recipe("self_training").pseudo_labeler(10, max_steps=100)
            >>> labeler.warmup_steps, labeler.rampup_steps, labeler.threshold
            (50, 50, 0.95)
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: expected a positive integer, got {max_steps!r}")
        warmup_steps = round(self.warmup * max_steps)
        ramp = "linear" if self.ramp == "none" else self.ramp
        return PseudoLabeler(
            num_classes,
            threshold=float(self.options.get("threshold", 0.95)),
            balance="distribution" if self.options.get("distribution_alignment") else "none",
            max_weight=self.tradeoff,
            warmup_steps=warmup_steps,
            rampup_steps=0 if self.ramp == "none" else max_steps - warmup_steps,
            ramp=ramp,
        )

    def mean_teacher(self, model: torch.nn.Module) -> ModelEMA:
        """A [`transferkit.ModelEMA`][] of ``model`` to produce the pseudo-labels.

        Uses option ``teacher_decay`` (``recipe("self_training")``: 0.99, the mean
        teacher's decay for short runs, Tarvainen & Valpola, 2017). Build it after
        [`transferkit.convert_domain_bn`][], call ``teacher.update(model)`` after every
        ``optimizer.step()`` and pass ``teacher=teacher`` to
        [`transferkit.FixMatchLoss`][] (inside ``tk.bn_domain(teacher, "target")``
        when the model has domain-specific BatchNorm).

        Raises:
            ValueError: the recipe has no ``teacher_decay`` option.

        Examples:
            >>> import torch
            >>> teacher = recipe("self_training").mean_teacher(torch.nn.Linear(2, 2))
            >>> teacher.decay
            0.99
        """
        decay = self.options.get("teacher_decay")
        if decay is None:
            raise ValueError(
                f"teacher_decay: recipe {self.method!r} has no mean teacher; use "
                "recipe('self_training') or pass options={'teacher_decay': 0.99, ...}"
            )
        return ModelEMA(model, decay=float(decay))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for logging or JSON)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = dict(self.options)
        return out

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # the read-only options mapping does not pickle; rebuild from plain values
        return (_from_dict, (self.to_dict(),))


def _from_dict(values: dict[str, Any]) -> Recipe:
    return Recipe(**values)


def _check_warmup(warmup: object) -> float:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise TypeError(f"warmup: expected a number, got {type(warmup).__name__}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup: expected a fraction in [0, 1), got {warmup!r}")
    return float(warmup)


def _progress(progress: object) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress: expected a number, got {type(progress).__name__}")
    if math.isnan(progress):
        raise ValueError("progress: expected a number in [0, 1], got nan")
    return min(max(float(progress), 0.0), 1.0)


_GANIN = "Ganin & Lempitsky, ICML 2015 (lr 0.01, gamma 10, power 0.75, momentum 0.9)"
_TLLIB = "TLlib (thuml/Transfer-Learning-Library) defaults"

_RECIPES: dict[str, Recipe] = {
    "source_only": Recipe("source_only", tradeoff=0.0, ramp="none", reference=_GANIN),
    "dann": Recipe(
        "dann",
        tradeoff=0.3,
        reference=(
            f"{_GANIN}; bottleneck 256 from {_TLLIB}. Trade-off 0.3 is ours (the papers "
            "use 1.0), chosen without target labels on held-out source accuracy: 96.4% at "
            "0.3 vs 94.0% at 1.0 (MNIST -> MNIST-M-lite and MNIST -> digits, 3 seeds, "
            "lr 0.1)"
        ),
    ),
    "cdan": Recipe(
        "cdan",
        tradeoff=0.3,
        options={"entropy_conditioning": 0.0},
        reference=f"Long et al., NeurIPS 2018; {_TLLIB}. Trade-off 0.3 is ours, as for DANN",
    ),
    "cdan_e": Recipe(
        "cdan_e",
        tradeoff=1.0,
        options={"entropy_conditioning": 1.0},
        reference=f"Long et al., NeurIPS 2018 (CDAN+E); {_TLLIB}",
    ),
    "dan": Recipe(
        "dan",
        tradeoff=1.0,
        reference=f"Long et al., ICML 2015 (5 Gaussian kernels, bandwidths 2^-3..2^1); {_TLLIB}",
    ),
    "jan": Recipe(
        "jan",
        tradeoff=1.0,
        options={"softmax_bandwidth": 0.92},
        reference=f"Long et al., ICML 2017 (JMMD on features and softmax); {_TLLIB}",
    ),
    "coral": Recipe("coral", tradeoff=1.0, reference="Sun & Saenko, ECCV-W 2016"),
    "mcc": Recipe(
        "mcc",
        tradeoff=1.0,
        bottleneck_dim=1024,
        options={"temperature": 2.5},
        reference=f"Jin et al., ECCV 2020 (temperature 2.5); {_TLLIB}",
    ),
    "bnm": Recipe(
        "bnm",
        tradeoff=1.0,
        bottleneck_dim=1024,
        reference="Cui et al., CVPR 2020 (BNM, trade-off 1)",
    ),
    "mdd": Recipe(
        "mdd",
        tradeoff=0.3,
        bottleneck_dim=1024,
        options={"margin": 4.0},
        reference=(
            f"Zhang et al., ICML 2019 (margin gamma 4); {_TLLIB}. Trade-off 0.3 is ours: "
            "1.0 diverged (NaN) at lr 0.03 on MNIST -> MNIST-M-lite; TLlib trains MDD at lr 0.004"
        ),
    ),
    "afn": Recipe(
        "afn",
        lr=0.001,
        tradeoff=0.05,
        ramp="none",
        bottleneck_dim=1000,
        options={"delta": 1.0, "dropout": 0.5, "scale_tradeoff_with_lr": 1.0},
        reference=(
            "Xu et al., ICCV 2019 (stepwise AFN: lambda 0.05, delta_r 1.0, on each domain's "
            "bottleneck features after an L2-preserving dropout of 0.5); TLlib (lr 0.001). "
            "SAFN enlarges every feature norm by about lr * lambda * delta_r per step: at "
            "another learning rate keep that step: Recipe.at_lr scales lambda by 0.001 / lr. "
            "TLlib's digit scripts (LeNet/DTN from scratch) keep lambda 0.05 at lr 0.01-0.1 "
            "with delta_r 0.1-0.3 and entropy weight 0.03, but their AFN bottleneck has "
            "BatchNorm; on tk.models.SmallCNN (none in the bottleneck) lambda 0.05 or 0.005 "
            "at lr 0.1 drove every target prediction to one class (14-16% on MNIST -> "
            "digits, 3 seeds), so the scaled step stays. With a BatchNorm bottleneck "
            "(tk.models.SmallCNN(neck_norm='batch')) the unscaled lambda 0.05 trains: 77.1% "
            "vs AdaBN 71.9% on MNIST -> digits (3 seeds), 34.6% on MNIST -> MNIST-M-lite"
        ),
    ),
    "self_training": Recipe(
        "self_training",
        tradeoff=1.0,
        ramp="linear",
        warmup=0.5,
        options={"threshold": 0.95, "distribution_alignment": 1.0, "teacher_decay": 0.99},
        reference=(
            "Sohn et al., NeurIPS 2020 (FixMatch: threshold 0.95, lambda_u 1); distribution "
            "alignment (Berthelot et al., ICLR 2020) with bias-corrected class statistics; "
            "pseudo-labels from a mean teacher (Tarvainen & Valpola, NeurIPS 2017: decay "
            "0.99, their value for the first phase of training, since our runs are a few "
            "hundred steps); the source-only warm-up over the first half of training and "
            "the linear ramp over the second half are ours"
        ),
    ),
}


def available() -> list[str]:
    """The method names [`recipe`][] knows.

    Examples:
        >>> "dann" in available() and "self_training" in available()
        True
    """
    return sorted(_RECIPES)


def recipe(method: str, **overrides: Any) -> Recipe:
    """The published training defaults of ``method``, optionally with some fields changed.

    Args:
        method: one of [`available`][] (``"dann"``, ``"cdan"``, ``"dan"``, ``"mcc"``,
            ``"self_training"``, ...).
        **overrides: fields of [`Recipe`][] to replace (e.g. ``tradeoff=0.3``);
            ``options`` is merged into the method's options (``options={"threshold":
            0.9}`` changes the threshold and keeps the rest).

    Returns:
        A frozen [`Recipe`][].

    Raises:
        ValueError: an unknown method or field, or an invalid value.

    Examples:
        >>> recipe("mcc").options["temperature"]
        2.5
        >>> recipe("dann", tradeoff=0.3).tradeoff
        0.3
    """
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str, got {type(method).__name__}")
    if method not in _RECIPES:
        hint = did_you_mean(method, _RECIPES)
        raise ValueError(f"method: expected one of {', '.join(available())}, got {method!r}{hint}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"method"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hint = did_you_mean(unknown[0], fields)
        raise ValueError(f"overrides: unknown Recipe field {unknown[0]!r}{hint}")
    base = _RECIPES[method]
    if isinstance(overrides.get("options"), Mapping):
        overrides["options"] = {**base.options, **overrides["options"]}
    result = dataclasses.replace(base, **overrides)
    for name in ("lr", "weight_decay", "lr_gamma", "lr_power", "tradeoff"):
        value = getattr(result, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    check_in_range(result.momentum, "momentum", 0.0, 1.0)
    _check_warmup(result.warmup)
    if result.ramp not in ("dann", "sigmoid", "linear", "none"):
        raise ValueError(
            f"ramp: expected 'dann', 'sigmoid', 'linear' or 'none', got {result.ramp!r}"
        )
    if result.bn not in ("domain", "adabn", "shared"):
        raise ValueError(f"bn: expected 'domain', 'adabn' or 'shared', got {result.bn!r}")
    for name in ("bottleneck_dim", "batch_size"):
        value = getattr(result, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not isinstance(result.nesterov, bool):
        raise TypeError(f"nesterov: expected a bool, got {type(result.nesterov).__name__}")
    return result
