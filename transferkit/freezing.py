"""What trains: freezing policies, BatchNorm handling, parameter groups, gradual unfreezing.

Freezing a pretrained backbone goes wrong in a few well-known ways, and every function
here is built to rule them out:

* BatchNorm running statistics keep moving in "frozen" layers after ``model.train()``.
  [`freeze`][] with ``bn="eval"`` (the default) keeps frozen BatchNorm layers in eval
  mode whatever ``train()``/``eval()`` calls follow; ``bn="frozen"`` replaces them by
  [`FrozenBatchNorm`][], whose statistics and affine terms are buffers.
* Frozen parameters still move through momentum or weight decay. [`freeze`][] sets
  ``requires_grad=False`` *and* clears ``.grad``: every torch optimizer skips parameters
  whose gradient is ``None``, so nothing moves even if they were handed to an optimizer.
  [`param_groups`][] never hands them over in the first place.
* Parameters unfrozen after the optimizer was built never train.
  [`GradualUnfreezing`][] adds them to the live optimizer as new parameter groups.
* A resumed run silently freezes a different set. [`GradualUnfreezing.load_state_dict`][]
  re-applies the stage's freezing.
* Layer-wise learning-rate decay ignored by schedulers: [`param_groups`][] writes the
  decay into real per-group ``lr`` values, which every torch scheduler scales.
* Unfrozen groups that break the lr scheduler or drop the user's settings:
  [`GradualUnfreezing`][] puts new groups on the schedule (``scheduler=``, see
  [`transferkit.schedules`][]) and gives them the weight decay, no-decay split and
  layer-wise lr decay of the existing groups, not the optimizer's defaults.
* DDP "unused parameters" errors and ranks drifting apart. Freezing *before* wrapping
  with ``DistributedDataParallel`` always works (frozen parameters are never registered).
  To freeze or unfreeze *after* wrapping, build DDP with every parameter trainable and
  ``find_unused_parameters=True``; [`freeze`][], [`unfreeze`][] and
  [`GradualUnfreezing`][] accept the wrapper (patterns mean the same as on the bare
  model: the ``module.`` prefix is not part of the names) and raise a clear error when the
  wrapper was built in a way that would fail or desynchronise the ranks.

Parameter names are the qualified names of ``model.named_parameters()``. A glob pattern
selects a parameter when it matches its name, or the name of a module that holds it:
``"fc"`` and ``"fc*"`` both select ``fc.weight`` and ``fc.bias``, ``"*.bias"`` every bias.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ._surgery import find_ddp, matches, replace_module, unwrap_model
from ._validation import check_bool, check_in_range, check_option, check_positive, did_you_mean
from .schedules import _SCHEDULER_TYPES, Scheduler, extend_scheduler
from .schedules import _nodes as _scheduler_nodes

__all__ = [
    "FrozenBatchNorm",
    "GradualUnfreezing",
    "freeze",
    "param_groups",
    "trainable_summary",
    "unfreeze",
]

logger = logging.getLogger(__name__)

BNPolicy = Literal["eval", "train", "frozen"]
_BN_POLICIES: tuple[BNPolicy, ...] = ("eval", "train", "frozen")
_POLICY_ATTR = "_transferkit_bn_policy"
_REPLACEABLE_BN: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
_INPUT_DIMS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (_NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
    if isinstance(t, type)
)


# --------------------------------------------------------------------------- FrozenBatchNorm


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers.

    A drop-in replacement for ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` that always
    normalises with the running statistics, whatever the module's mode. Its state-dict
    keys are those of the layer it replaces (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so checkpoints load either way. It has no
    parameters, so no optimizer, weight decay or DDP gradient bucket ever sees it.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for numerical stability.
        affine: whether ``weight``/``bias`` exist (as buffers).
        track_running_stats: whether ``running_mean``/``running_var`` exist; without them
            the layer normalises with batch statistics (as the original would in eval mode).
        bn_class: the BatchNorm class it replaces; [`to_batchnorm`][] restores it and
            the forward pass checks the input rank it expects.

    Shape:
        - Input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, as the
          replaced class accepts.
        - Output: same shape as the input.

    Examples:
        >>> import torch
        >>> bn = nn.BatchNorm2d(3)
        >>> frozen = FrozenBatchNorm.from_batchnorm(bn).train()
        >>> frozen(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
        >>> sorted(frozen.state_dict()) == sorted(bn.state_dict())
        True
        >>> len(list(frozen.parameters()))
        0
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        bn_class: type[_BatchNorm] = nn.BatchNorm2d,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        check_positive(num_features, "num_features", integer=True)
        check_positive(eps, "eps")
        if not (isinstance(bn_class, type) and issubclass(bn_class, _BatchNorm)):
            raise TypeError(f"bn_class: expected a BatchNorm class, got {bn_class!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.bn_class = bn_class
        self.momentum = momentum
        self.register_buffer("weight", torch.ones(num_features) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features) if affine else None)
        stats = track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features) if stats else None)
        self.register_buffer("running_var", torch.ones(num_features) if stats else None)
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long) if stats else None
        )

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> FrozenBatchNorm:
        """Build a frozen copy of ``bn`` (values copied, detached, same device and dtype).

        Examples:
            >>> FrozenBatchNorm.from_batchnorm(nn.BatchNorm1d(4))
            FrozenBatchNorm(4, eps=1e-05, bn_class=BatchNorm1d)
        """
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats and bn.running_mean is not None,
            bn_class=type(bn),
            momentum=bn.momentum,
        )
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(bn, name, None)
                if source is not None and getattr(frozen, name) is not None:
                    setattr(frozen, name, source.detach().clone())
        frozen.training = bn.training
        return frozen

    def to_batchnorm(self) -> _BatchNorm:
        """Return a trainable BatchNorm of the original class holding the same values.

        Examples:
            >>> frozen = FrozenBatchNorm(4, bn_class=nn.BatchNorm1d)
            >>> type(frozen.to_batchnorm()).__name__
            'BatchNorm1d'
        """
        bn = self.bn_class(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )
        reference = next(iter(t for t in self.buffers() if t.is_floating_point()), None)
        if reference is not None:
            bn = bn.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(self, name)
                target = getattr(bn, name, None)
                if source is not None and target is not None:
                    target.copy_(source)
        bn.train(self.training)
        return bn

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with the stored statistics."""
        allowed = _INPUT_DIMS.get(self.bn_class)
        if (allowed is None and x.dim() < 2) or (allowed is not None and x.dim() not in allowed):
            want = " or ".join(f"{d}-D" for d in allowed) if allowed else "at least 2-D"
            raise ValueError(
                f"input: {self.bn_class.__name__} expects a {want} tensor, got shape "
                f"{tuple(x.shape)}"
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.running_mean is None,
            momentum=0.0,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        """``num_features, eps, bn_class``."""
        return f"{self.num_features}, eps={self.eps}, bn_class={self.bn_class.__name__}"


# --------------------------------------------------------------------------- BN "eval" policy


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a BatchNorm under the "eval" policy always runs in eval mode."""
    if module.training:
        module.training = False


class _EvalOnlyTrain:
    """Instance-level ``train``: a frozen BatchNorm ignores ``model.train()``.

    Stored in the module instance's ``__dict__`` (never on the class), so only the layers
    that [`freeze`][] selected are affected; it survives ``copy.deepcopy`` and pickling.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        self.module.training = False
        return self.module


def _bn_policy(module: nn.Module) -> str:
    if isinstance(module, FrozenBatchNorm):
        return "frozen"
    return "eval" if vars(module).get(_POLICY_ATTR) == "eval" else "train"


def _set_eval_policy(module: nn.Module) -> None:
    if vars(module).get(_POLICY_ATTR) != "eval":
        vars(module)[_POLICY_ATTR] = "eval"
        vars(module)["train"] = _EvalOnlyTrain(module)
        module.register_forward_pre_hook(_keep_eval)
    module.training = False


def _clear_eval_policy(module: nn.Module, training: bool) -> None:
    if vars(module).pop(_POLICY_ATTR, None) is not None:
        vars(module).pop("train", None)
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _keep_eval]:
            del hooks[key]
    module.training = training


# --------------------------------------------------------------------------- selection


_DDP_PATTERN = (
    "build DistributedDataParallel with every parameter trainable and "
    "find_unused_parameters=True, then freeze/unfreeze through the wrapper; or freeze "
    "before wrapping (the frozen parameters are then never synchronised)"
)


def _check_ddp_dynamic(ddp: nn.parallel.DistributedDataParallel, caller: str) -> None:
    """Changing ``requires_grad`` after wrapping needs DDP's unused-parameter search."""
    if not getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        raise ValueError(
            f"model: {caller} changes which parameters train, but this DistributedDataParallel "
            "was built with find_unused_parameters=False (or static_graph=True): it would wait "
            "for gradients that never come and fail at the next step with an "
            f"'unused parameters' error. Either {_DDP_PATTERN}."
        )


def _check_ddp_synced(
    ddp: nn.parallel.DistributedDataParallel,
    params: Iterable[tuple[str, nn.Parameter]],
    caller: str,
) -> None:
    """Raise unless DDP synchronises the gradients of every parameter in ``params``.

    DDP registers only the parameters that require grad when it is built; a parameter
    unfrozen later would train on each rank's own gradient and drift apart silently.
    """
    _check_ddp_dynamic(ddp, caller)
    module_params: list[nn.Parameter] = list(getattr(ddp, "_module_parameters", []))
    known = {id(p) for p in module_params}
    unknown = [name for name, p in params if id(p) not in known]
    if unknown:
        raise ValueError(
            f"model: {caller} cannot make {unknown[:3]} trainable through DistributedDataParallel:"
            " they did not exist when DDP was built (e.g. a FrozenBatchNorm turned back into "
            "BatchNorm), so DDP would never synchronise their gradients. Use bn='eval' (not "
            f"'frozen') with a DDP model, or re-wrap the model afterwards."
        )
    try:
        registered = int(ddp._get_ddp_logging_data()["num_parameter_tensors"])  # type: ignore[no-untyped-call]
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        logger.warning(
            "%s: cannot check which parameters DistributedDataParallel synchronises", caller
        )
        return
    if registered < len(known):
        raise ValueError(
            f"model: {caller} through DistributedDataParallel needs every parameter to have "
            f"been trainable when DDP was built; DDP synchronises only {registered} of "
            f"{len(known)} parameter tensors (the rest were frozen at wrap time), so unfrozen "
            f"ones would drift apart across ranks. Either {_DDP_PATTERN}, or re-wrap the "
            "model after unfreezing."
        )


def _as_patterns(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{name}: expected at least one pattern, got an empty list")
        return list(value)
    raise TypeError(f"{name}: expected a glob pattern or a list of them, got {value!r}")


def _is_bn_like(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, FrozenBatchNorm))


def _bn_class(module: nn.Module) -> type[nn.Module]:
    return module.bn_class if isinstance(module, FrozenBatchNorm) else type(module)


def _entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter | None]]:
    """``(qualified name, owner module, parameter)`` for every parameter.

    FrozenBatchNorm layers contribute their ``weight``/``bias`` names with ``None`` so that
    patterns can select them for [`unfreeze`][].
    """
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{prefix}.{leaf}" if prefix else leaf), module, param
        if isinstance(module, FrozenBatchNorm) and module.affine:
            for leaf in ("weight", "bias"):
                yield (f"{prefix}.{leaf}" if prefix else leaf), module, None


def _until_prefixes(model: nn.Module, until: str) -> list[str]:
    """Names frozen by ``until``: every child before it in definition order, and itself."""
    if not isinstance(until, str) or not until:
        raise TypeError(f"until: expected a module name such as 'layer3', got {until!r}")
    prefixes: list[str] = []
    module, path = model, ""
    for part in until.split("."):
        children = dict(module.named_children())
        if part not in children:
            known = [name for name, _ in model.named_modules() if name]
            raise ValueError(
                f"until: {until!r} is not a module of {type(model).__name__}"
                f"{did_you_mean(until, known)}"
            )
        # parameters held directly by a module on the path (ViT cls_token, pos_embed) come
        # before its children
        prefixes += [
            f"{path}.{n}" if path else n for n, _ in module.named_parameters(recurse=False)
        ]
        for name in children:
            if name == part:
                break
            prefixes.append(f"{path}.{name}" if path else name)
        path = f"{path}.{part}" if path else part
        module = children[part]
    prefixes.append(path)
    return prefixes


class _Selection:
    """The parameters (and BatchNorm layers) that a freeze/unfreeze call targets."""

    def __init__(
        self,
        model: nn.Module,
        include: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
        until: str | None,
        types: type[nn.Module] | tuple[type[nn.Module], ...] | None,
        *,
        include_name: str = "include",
    ) -> None:
        self.include = _as_patterns(include, include_name)
        self.exclude = _as_patterns(exclude, "exclude") or []
        self.until = None if until is None else _until_prefixes(model, until)
        if types is not None:
            as_tuple = types if isinstance(types, tuple) else (types,)
            if not as_tuple or not all(
                isinstance(t, type) and issubclass(t, nn.Module) for t in as_tuple
            ):
                raise TypeError(f"types: expected nn.Module classes, got {types!r}")
            present = any(
                issubclass(_bn_class(m), as_tuple) or isinstance(m, as_tuple)
                for m in model.modules()
            )
            if not present:
                wanted = ", ".join(t.__name__ for t in as_tuple)
                raise ValueError(f"types: {type(model).__name__} has no module of type {wanted}")
            self.types: tuple[type[nn.Module], ...] | None = as_tuple
        else:
            self.types = None
        entries = list(_entries(model))
        entry_names = [name for name, _, _ in entries]
        modules = [name for name, _ in model.named_modules() if name]
        for label, patterns in ((include_name, self.include or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(matches(name, pattern) for name in entry_names):
                    hint = did_you_mean(pattern, modules + entry_names) or (
                        f"; top-level modules are {[n for n, _ in model.named_children()]}"
                    )
                    raise ValueError(
                        f"{label}: pattern {pattern!r} matches no parameter of "
                        f"{type(model).__name__}{hint}"
                    )
        self.entries = [(n, m, p) for n, m, p in entries if self.selects(n, m)]
        self.batchnorms = [
            (name, m)
            for name, m in model.named_modules()
            if _is_bn_like(m)
            and all(
                self.selects(f"{name}.{leaf}" if name else leaf, m) for leaf in ("weight", "bias")
            )
        ]

    def selects(self, name: str, module: nn.Module) -> bool:
        if self.include is not None and not any(matches(name, p) for p in self.include):
            return False
        if self.until is not None and not any(
            name == p or name.startswith(p + ".") for p in self.until
        ):
            return False
        if self.types is not None and not (
            isinstance(module, self.types) or issubclass(_bn_class(module), self.types)
        ):
            return False
        return not any(matches(name, p) for p in self.exclude)


# --------------------------------------------------------------------------- freeze / unfreeze


def freeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    until: str | None = None,
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    bn: BNPolicy = "eval",
    train_bn: bool = False,
) -> list[str]:
    """Freeze the selected parameters and apply a BatchNorm policy to frozen BN layers.

    A parameter is selected when it matches ``include`` (default: every parameter), lies in
    the ``until`` range, belongs to a module of one of ``types``, and matches no ``exclude``
    pattern. Selected parameters get ``requires_grad=False`` and their ``.grad`` is cleared,
    so an optimizer that already holds them skips them (no momentum, no weight decay).

    A BatchNorm layer whose ``weight`` and ``bias`` names are both selected (also when it
    has no affine terms) is handled by ``bn``:

    * ``"eval"``: it stays in eval mode, so its running statistics never change, even after
      ``model.train()``: the layer ignores ``train()`` calls and a forward pre-hook re-checks
      the mode (per instance; no class is patched). [`unfreeze`][] removes both.
    * ``"train"``: it keeps the model's mode; its statistics follow the new data.
    * ``"frozen"``: it is replaced by a [`FrozenBatchNorm`][] (BatchNorm1d/2d/3d and
      SyncBatchNorm; subclasses such as timm's ``BatchNormAct2d`` get the ``"eval"`` policy
      instead, since replacing them would drop their extra behaviour).

    ``train_bn=True`` keeps the affine ``weight`` and ``bias`` of those BatchNorm layers
    trainable (fastai's ``train_bn=True``; also when an earlier call froze them):
    everything else in the selection freezes, the BatchNorm layers still get the ``bn``
    policy for their *statistics*. fastai's
    behaviour is ``bn="train", train_bn=True`` (statistics and affine terms adapt to the
    new data); ``bn="eval", train_bn=True`` keeps the statistics fixed and trains only the
    affine terms. LayerNorm/GroupNorm are not BatchNorm: exclude them by name
    (``exclude="*norm*"``) to keep them trainable.

    With ``DistributedDataParallel``, freeze before wrapping, or pass the wrapper itself
    when it was built with ``find_unused_parameters=True`` (otherwise DDP would wait for
    the frozen gradients; a ValueError says so). Under ``torch.compile``, changing
    ``requires_grad`` triggers a recompilation of the compiled training step.

    Args:
        model: the network; ``DistributedDataParallel``, ``DataParallel`` and
            ``torch.compile`` wrappers are unwrapped, so patterns name the bare model's
            parameters.
        include: glob pattern(s) on qualified parameter or module names.
        exclude: glob pattern(s) of parameters to leave alone, e.g. the new head ``"fc*"``.
        until: a module name; every child module defined before it (in definition order)
            and the module itself are selected. A dotted name (``"layer3.1"``) walks into
            the children of ``layer3``. Parameters held directly by a module on that path
            (e.g. a ViT's ``cls_token``) count as coming first.
        types: module class(es); only parameters held directly by such modules are
            selected, e.g. ``types=nn.BatchNorm2d``.
        bn: the BatchNorm policy, ``"eval"``, ``"train"`` or ``"frozen"``.
        train_bn: keep BatchNorm affine terms trainable (not with ``bn="frozen"``).

    Returns:
        The qualified names of the parameters that were trainable and are now frozen, in
        model order (already-frozen parameters are not repeated).

    Raises:
        TypeError: ``model`` is not a module, or an argument has the wrong type.
        ValueError: a pattern matches no parameter (the message suggests close names),
            ``until`` names no module, the combined selection is empty, ``train_bn=True``
            with ``bn="frozen"``, or ``model`` is a DDP wrapper built without
            ``find_unused_parameters=True`` (or ``bn="frozen"`` is asked through DDP).

    Examples:
        >>> import transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> frozen = tk.freeze(net, exclude="fc")
        >>> frozen[:2], [n for n, p in net.named_parameters() if p.requires_grad]
        (['features.0.weight', 'features.0.bias'], ['fc.weight', 'fc.bias'])
        >>> net.train().features[1].training  # frozen BatchNorm stays in eval mode
        False
        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> _ = tk.freeze(net, exclude="fc", bn="train", train_bn=True)  # fastai train_bn
        >>> [n for n, p in net.named_parameters() if p.requires_grad]
        ['features.1.weight', 'features.1.bias', 'features.5.weight', 'features.5.bias', \
'fc.weight', 'fc.bias']
        >>> tk.freeze(net, include="featurs")
        Traceback (most recent call last):
        ...
        ValueError: include: pattern 'featurs' matches no parameter of SmallCNN; did you ...
    """
    ddp = find_ddp(model) if isinstance(model, nn.Module) else None
    model = unwrap_model(model)
    bn = check_option(bn, "bn", _BN_POLICIES)
    train_bn = check_bool(train_bn, "train_bn")
    if train_bn and bn == "frozen":
        raise ValueError(
            "train_bn: True keeps BatchNorm weight/bias trainable, but bn='frozen' turns them "
            "into fixed buffers; use bn='train' (fastai's train_bn) or bn='eval' with it"
        )
    if ddp is not None:
        _check_ddp_dynamic(ddp, "freeze")
        if bn == "frozen":
            raise ValueError(
                "bn: 'frozen' replaces BatchNorm layers, whose new parameters a "
                "DistributedDataParallel built earlier would never synchronise when unfrozen; "
                "use bn='eval' through DDP, or freeze with bn='frozen' before wrapping"
            )
    selection = _Selection(model, include, exclude, until, types)
    if not selection.entries and not selection.batchnorms:
        raise ValueError(
            "freeze: the policy selects no parameter (include/exclude/until/types leave "
            "nothing); check the patterns against trainable_summary(model)"
        )
    changed: list[str] = []
    for name, owner, param in selection.entries:
        if param is None:
            continue
        if train_bn and isinstance(owner, _BatchNorm):
            param.requires_grad_(True)  # trainable afterwards, even if frozen before
            continue
        if param.requires_grad:
            changed.append(name)
        param.requires_grad_(False)
        param.grad = None
    replaced = 0
    for name, module in selection.batchnorms:
        if isinstance(module, FrozenBatchNorm):
            continue
        if bn == "train":
            _clear_eval_policy(module, model.training)
        elif bn == "frozen" and type(module) in _REPLACEABLE_BN:
            assert isinstance(module, _BatchNorm)
            _clear_eval_policy(module, module.training)
            replace_module(model, name, FrozenBatchNorm.from_batchnorm(module))
            replaced += 1
        else:
            if bn == "frozen":
                logger.warning(
                    "freeze: %s (%s) is a BatchNorm subclass; keeping it in eval mode "
                    "instead of replacing it by FrozenBatchNorm",
                    name,
                    type(module).__name__,
                )
            _set_eval_policy(module)
    logger.info(
        "froze %d parameter tensors (%d BatchNorm layers, bn=%r, %d replaced)",
        len(changed),
        len(selection.batchnorms),
        bn,
        replaced,
    )
    return changed


def unfreeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    until: str | None = None,
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
) -> list[str]:
    """Make the selected parameters trainable again and restore their BatchNorm layers.

    The selection works as in [`freeze`][]. Selected BatchNorm layers lose the
    ``"eval"`` policy (they follow the model's mode again) and [`FrozenBatchNorm`][]
    layers become trainable BatchNorm layers of their original class, holding the same
    values. Their new ``weight``/``bias`` parameters are new tensor objects: add them to
    the optimizer ([`GradualUnfreezing`][] does).

    Through a ``DistributedDataParallel`` wrapper, every parameter to unfreeze must be one
    that DDP synchronises: build DDP with all parameters trainable and
    ``find_unused_parameters=True``, then freeze and unfreeze through the wrapper.

    Args:
        model: the network; DDP, ``DataParallel`` and ``torch.compile`` wrappers are
            unwrapped.
        include: glob pattern(s) on qualified parameter or module names (default: all).
        exclude: glob pattern(s) to leave frozen.
        until: a module name, as in [`freeze`][].
        types: module class(es), as in [`freeze`][].

    Returns:
        The qualified names of the parameters that were frozen and are now trainable.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a pattern matches no parameter, ``until`` names no module, or ``model``
            is a DDP wrapper that does not synchronise a parameter to unfreeze.

    Examples:
        >>> import transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> _ = tk.freeze(net, bn="frozen")
        >>> tk.unfreeze(net, include="features.1")
        ['features.1.weight', 'features.1.bias']
        >>> type(net.features[1]).__name__, net.features[1].weight.requires_grad
        ('BatchNorm2d', True)
    """
    ddp = find_ddp(model) if isinstance(model, nn.Module) else None
    model = unwrap_model(model)
    selection = _Selection(model, include, exclude, until, types)
    if ddp is not None:
        _check_ddp_synced(
            ddp, [(n, p) for n, _, p in selection.entries if p is not None], "unfreeze"
        )
        if any(isinstance(m, FrozenBatchNorm) for _, m in selection.batchnorms):
            raise ValueError(
                "model: unfreeze cannot turn a FrozenBatchNorm back into BatchNorm through "
                "DistributedDataParallel: the new parameters would never be synchronised. "
                "Unfreeze model.module and re-wrap it, or freeze with bn='eval' under DDP."
            )
    changed: list[str] = []
    for name, _, param in selection.entries:
        if param is None:
            continue
        if not param.requires_grad:
            changed.append(name)
        param.requires_grad_(True)
    for name, module in selection.batchnorms:
        if isinstance(module, FrozenBatchNorm):
            restored = module.to_batchnorm()
            restored.train(model.training)
            replace_module(model, name, restored)
            changed += [f"{name}.{leaf}" for leaf, _ in restored.named_parameters()]
        else:
            _clear_eval_policy(module, model.training)
    order = {name: i for i, (name, _, _) in enumerate(_entries(model))}
    changed.sort(key=lambda n: order.get(n, len(order)))
    logger.info("unfroze %d parameter tensors", len(changed))
    return changed


# --------------------------------------------------------------------------- blocks


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _should_split(module: nn.Module, name: str, head: str | None) -> bool:
    if head is not None and head.startswith(name + "."):
        return True
    if isinstance(module, _CONTAINERS):
        return True
    total = _numel(module)
    for inner in module.modules():
        if inner is not module and isinstance(inner, _CONTAINERS):
            stateful = sum(1 for child in inner.children() if _has_state(child))
            if stateful >= 2 and 2 * _numel(inner) > total:
                return True
    return False


def _head_name(model: nn.Module) -> str | None:
    from .heads import find_head

    try:
        return find_head(model)[0]
    except (TypeError, ValueError):
        return None


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """Split ``model`` into blocks in definition order: ``(name, module, named params)``.

    Containers (``Sequential``/``ModuleList``) are split into their items, a module that
    holds the head is split, and so is a module whose bulk lies in a container of repeated
    blocks (HF ``bert.encoder.layer``). Parameters held directly by a split module form a
    block of their own (named after it, ``"(root)"`` for the model).
    """
    head = _head_name(model)
    blocks: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        own = [
            (f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
        ]
        if own or (not prefix and any(True for _ in module.buffers(recurse=False))):
            blocks.append((prefix or "(root)", module, own))
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not _has_state(child):
                continue
            if _should_split(child, full, head):
                visit(child, full)
            else:
                blocks.append((full, child, list(child.named_parameters(prefix=full))))

    if any(True for _ in model.children()):
        visit(model, "")
    else:
        blocks.append(("(root)", model, list(model.named_parameters())))
    return blocks


def _depths(names: Sequence[str], head: str | None) -> list[int]:
    """Depth of each block from the top: head blocks 0, the block below 1, and so on."""
    is_head = [head is not None and (n == head or n.startswith(head + ".")) for n in names]
    if not any(is_head):
        is_head = [i == len(names) - 1 for i in range(len(names))]
    depths = [0] * len(names)
    depth = 0
    for i in reversed(range(len(names))):
        if not is_head[i]:
            depth += 1
            depths[i] = depth
    return depths


# --------------------------------------------------------------------------- summary


def trainable_summary(model: nn.Module) -> str:
    """A table of the model's blocks, their parameter counts and what trains.

    Blocks are those [`param_groups`][] uses: top-level modules, split into their items
    when they are containers or hold the head. The ``bn`` column counts BatchNorm layers by
    policy (``eval``, ``frozen``, ``train``, see [`freeze`][]).

    Args:
        model: the network.

    Returns:
        The table as a string (print it).

    Examples:
        >>> import transferkit as tk
        >>> net = tk.models.MLP(4, 2, hidden=(8,))
        >>> _ = tk.freeze(net, exclude="fc")
        >>> print(tk.trainable_summary(net))
        block       type    params  trainable  bn
        ----------  ------  ------  ---------  --
        features.0  Linear      40          0  -
        fc          Linear      18         18  -
        ----------  ------  ------  ---------  --
        total                   58         18
        trainable share: 31.0%
    """
    model = unwrap_model(model)
    rows: list[tuple[str, ...]] = []
    total = trainable = 0
    for name, module, params in _blocks(model):
        count = sum(p.numel() for _, p in params)
        train = sum(p.numel() for _, p in params if p.requires_grad)
        total += count
        trainable += train
        policies: dict[str, int] = {}
        for inner in module.modules() if name != "(root)" else [module]:
            if _is_bn_like(inner):
                policy = _bn_policy(inner)
                policies[policy] = policies.get(policy, 0) + 1
        bn = ", ".join(f"{n} {p}" if n > 1 else p for p, n in sorted(policies.items())) or "-"
        rows.append((name, type(module).__name__, f"{count:,}", f"{train:,}", bn))
    share = f"{100.0 * trainable / total:.1f}%" if total else "-"
    header = ("block", "type", "params", "trainable", "bn")
    footer = ("total", "", f"{total:,}", f"{trainable:,}", "")
    widths = [max(len(r[i]) for r in [header, *rows, footer]) for i in range(5)]
    right = (False, False, True, True, False)

    def fmt(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = fmt(["-" * w for w in widths])
    lines = [fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(footer)]
    return "\n".join([*lines, f"trainable share: {share}"])


# --------------------------------------------------------------------------- param groups


def _no_decay_tokens(no_decay: str | Sequence[str]) -> list[str]:
    tokens = [no_decay] if isinstance(no_decay, str) else list(no_decay)
    if not all(isinstance(t, str) and t for t in tokens):
        raise TypeError(f"no_decay: expected name patterns (strings), got {no_decay!r}")
    return tokens


def _is_no_decay(name: str, module: nn.Module, tokens: Sequence[str]) -> bool:
    parts = name.lower().split(".")
    for token in tokens:
        if any(c in token for c in "*?["):
            if fnmatchcase(name, token):
                return True
        elif any(token.lower() in part for part in parts) or (
            token.lower() == "norm" and isinstance(module, _NORM_TYPES)
        ):
            return True
    return False


def _decay_exempt(model: nn.Module, no_decay: str | Sequence[str]) -> list[str]:
    """``no_decay`` tokens plus the names a timm model lists in ``no_weight_decay()``."""
    tokens = _no_decay_tokens(no_decay)
    skip = getattr(model, "no_weight_decay", None)  # timm: {"pos_embed", "cls_token", ...}
    if callable(skip):
        tokens += [f"{name}" for name in skip() if isinstance(name, str) and name]
    return tokens


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), module)
    return owners


def _split_decay(
    named: Iterable[tuple[str, nn.Parameter]],
    owners: Mapping[int, nn.Module],
    tokens: Sequence[str],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in named:
        owner = owners.get(id(param), nn.Module())
        (plain if _is_no_decay(name, owner, tokens) else decay).append(param)
    return decay, plain


def _decay_split_groups(
    name: str,
    params: Iterable[tuple[str, nn.Parameter]],
    owners: Mapping[int, nn.Module],
    tokens: Sequence[str],
    *,
    lr: float,
    weight_decay: float,
    factor: float | None,
) -> list[dict[str, Any]]:
    """The param groups of one block: ``name`` with ``weight_decay``, ``name (no_decay)`` with 0.

    Empty halves are left out; ``layer_decay`` is recorded for `GradualUnfreezing`.
    """
    decay, plain = _split_decay(params, owners, tokens)
    groups: list[dict[str, Any]] = []
    for tensors, wd, group_name in (
        (decay, weight_decay, name),
        (plain, 0.0, f"{name} (no_decay)"),
    ):
        if tensors:
            group: dict[str, Any] = {
                "params": tensors,
                "lr": lr,
                "weight_decay": wd,
                "name": group_name,
            }
            if factor is not None:
                group["layer_decay"] = factor  # read by GradualUnfreezing
            groups.append(group)
    return groups


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    no_decay: str | Sequence[str] = ("bias", "norm"),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: trainable parameters only, explicit lr and weight decay.

    The model is cut into blocks in definition order (top-level modules; containers such as
    ``layer1`` or ``encoder.layer`` are cut into their items; see [`trainable_summary`][])
    and every block gets its own group(s), named after it in a ``"name"`` key. A parameter
    gets no weight decay when a ``no_decay`` entry is a substring of one of its dotted name
    parts (case-insensitive; ``"bias"``, ``"LayerNorm"``), matches it as a glob pattern,
    or, for ``"norm"``, when it belongs to a normalisation layer (BatchNorm, LayerNorm,
    GroupNorm, ...). Names listed by a timm model's ``no_weight_decay()`` (``pos_embed``,
    ``cls_token``) get none either. They go to a separate ``"<block> (no_decay)"`` group.

    With ``layer_decay``, the head (found by [`transferkit.find_head`][], otherwise the
    last block) gets ``lr`` and the block ``d`` steps below it ``lr * layer_decay**d``.
    The decay is written into each group's ``lr`` (no ``lr_scale`` key), so every torch
    scheduler scales it correctly and no scheduler can apply it twice.

    Args:
        model: the network; frozen parameters (``requires_grad=False``) are left out.
        lr: learning rate of the head (of every group without ``layer_decay``).
        layer_decay: factor in ``(0, 1]`` per block below the head, e.g. ``0.75``.
        weight_decay: weight decay of the decayed groups (``>= 0``).
        no_decay: names whose parameters get ``weight_decay=0.0``.

    Returns:
        A list of dicts with keys ``params``, ``lr``, ``weight_decay`` and ``name`` (and
        ``layer_decay`` when given, so that [`GradualUnfreezing`][] continues the decay
        to the blocks it unfreezes), ready for any ``torch.optim`` optimizer.

    Raises:
        ValueError: ``lr``/``weight_decay``/``layer_decay`` out of range, or no parameter
            is trainable.

    Examples:
        >>> import torch, transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=3)
        >>> _ = tk.freeze(net, until="features")
        >>> groups = tk.param_groups(net, 0.1, layer_decay=0.5, weight_decay=1e-4)
        >>> for group in groups:
        ...     print(group["name"], group["lr"], group["weight_decay"])
        neck.1 0.05 0.0001
        neck.1 (no_decay) 0.05 0.0
        fc 0.1 0.0001
        fc (no_decay) 0.1 0.0
        >>> optimizer = torch.optim.SGD(groups, momentum=0.9)
    """
    model = unwrap_model(model)
    base_lr = check_positive(lr, "lr")
    decay_value = check_positive(weight_decay, "weight_decay", strict=False)
    factor = None if layer_decay is None else check_in_range(layer_decay, "layer_decay", 0.0, 1.0)
    if factor == 0.0:
        raise ValueError("layer_decay: expected a value in (0, 1], got 0.0")
    tokens = _decay_exempt(model, no_decay)
    blocks = _blocks(model)
    depths = _depths([name for name, _, _ in blocks], _head_name(model))
    owners = _owners(model)
    groups: list[dict[str, Any]] = []
    for (name, _, params), depth in zip(blocks, depths, strict=True):
        trainable = [(n, p) for n, p in params if p.requires_grad]
        if not trainable:
            continue
        group_lr = base_lr * factor**depth if factor is not None else base_lr
        groups += _decay_split_groups(
            name, trainable, owners, tokens, lr=group_lr, weight_decay=decay_value, factor=factor
        )
    if not groups:
        raise ValueError(
            "model: no trainable parameter (every parameter has requires_grad=False); "
            "unfreeze something first"
        )
    return groups


# --------------------------------------------------------------------------- gradual unfreezing


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
            for the base lr of the optimizer's first group (its OneCycleLR ``max_lr``, else
            its ``initial_lr``, else its ``lr``). With ``layer_decay``: the head's lr (one
            value; ``None`` reads it off the existing groups).
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
            if p is not None and id(p) in held and not (train_bn and isinstance(owner, _BatchNorm))
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

    @staticmethod
    def _base_lr(group: Mapping[str, Any]) -> float:
        """The lr a group was built with: OneCycleLR's peak, a scheduler's initial lr, or lr."""
        for key in ("max_lr", "initial_lr", "lr"):
            if key in group:
                return float(group[key])
        raise ValueError("optimizer: a parameter group has no 'lr'")

    def _reference_lr(self) -> float:
        """The base lr of the optimizer's first group (CyclicLR keeps its peak in a list)."""
        assert self.optimizer is not None
        if self.scheduler is not None:
            for node in _scheduler_nodes(self.scheduler):
                if isinstance(node, torch.optim.lr_scheduler.CyclicLR):
                    return float(node.max_lrs[0])
        return self._base_lr(self.optimizer.param_groups[0])

    def _existing_depths(self) -> list[tuple[float, int]]:
        """``(base lr, depth)`` of the existing groups whose parameters share one depth."""
        assert self.optimizer is not None
        _, where = self._block_depths()
        found: list[tuple[float, int]] = []
        for group in self.optimizer.param_groups:
            depths = {where[id(p)][1] for p in group["params"] if id(p) in where}
            if len(depths) == 1:
                found.append((self._base_lr(group), depths.pop()))
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

    def _inherited_weight_decay(self) -> float:
        assert self.optimizer is not None
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        owners = _owners(self.model)
        for group in self.optimizer.param_groups:
            decayed = [
                p
                for p in group["params"]
                if id(p) in names
                and not _is_no_decay(names[id(p)], owners.get(id(p), nn.Module()), self._tokens)
            ]
            if decayed and "weight_decay" in group:
                return float(group["weight_decay"])
        return float(self.optimizer.defaults.get("weight_decay", 0.0))

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
            and (not batchnorm_only or isinstance(owner, _BatchNorm))
        ]
        if not fresh:
            return
        lr, factor = self._stage_lrs(k)
        assert lr is not None
        decay_value = (
            self._inherited_weight_decay() if self.weight_decay is None else self.weight_decay
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
