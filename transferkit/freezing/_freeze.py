"""[`freeze`][] and [`unfreeze`][]: the selection, ``requires_grad`` and the BatchNorm policy."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._surgery import find_ddp, replace_module, unwrap_model
from .._validation import check_bool, check_option
from ._batchnorm import (
    _BN_POLICIES,
    _REPLACEABLE_BN,
    BNPolicy,
    FrozenBatchNorm,
    _clear_eval_policy,
    _holds_bn_affine,
    _set_eval_policy,
)
from ._ddp import _check_ddp_dynamic, _check_ddp_synced
from ._selection import _entries, _Selection

logger = logging.getLogger("transferkit.freezing")


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
        if train_bn and _holds_bn_affine(owner):
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
