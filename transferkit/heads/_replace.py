"""[`replace_head`][]: swap a model's classifier in place, headless models included."""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin

from .._domain_bn import DomainSpecificBatchNorm
from .._surgery import find_ddp, find_head, last_linear, replace_module, unwrap_model
from .._validation import check_positive, did_you_mean
from ..freezing import FrozenBatchNorm
from ._classifier import ClassifierHead

logger = logging.getLogger("transferkit.heads")


def _is_unsized(module: nn.Module) -> bool:
    """A lazy module (``nn.LazyLinear``) that has not seen an input yet: sizes are 0."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _in_features(head: nn.Module, name: str) -> int | None:
    """The head's input size; ``None`` for a lazy head that has not run yet."""
    if any(_is_unsized(m) for m in head.modules()):
        return None
    if isinstance(head, (nn.Linear, ClassifierHead)):
        return int(head.in_features)
    if isinstance(head, nn.Conv2d):
        return int(head.in_channels)
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    value = getattr(head, "in_features", None)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"model: cannot infer the input size of head {name!r} ({type(head).__name__}); "
        "build the new head yourself and pass it to replace_head"
    )


def _is_headless(head: nn.Module) -> bool:
    """An ``nn.Identity`` (timm ``num_classes=0``, ``model.fc = nn.Identity()``) or no weights."""
    return isinstance(head, nn.Identity) or not any(True for _ in head.parameters())


def _output_size(module: nn.Module) -> int | None:
    """Feature size that ``module`` outputs, for the layers that say so."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return int(module.normalized_shape[-1])
    if isinstance(module, (_NormBase, FrozenBatchNorm)):
        return int(module.num_features)
    return None


def _headless_in_features(model: nn.Module, name: str) -> int:
    """What a headless model feeds its (identity) classifier.

    timm models say it (``head_hidden_size``, else ``num_features``); otherwise the output
    size of the last layer with weights defined before the head (torchvision ResNet
    ``layer4``'s last BatchNorm, VGG's last hidden ``Linear``, ViT's final ``LayerNorm``).
    """
    for attribute in ("head_hidden_size", "num_features"):
        value = getattr(model, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    found: int | None = None
    for qualified, module in model.named_modules():
        if qualified == name or qualified.startswith(name + "."):
            break
        size = _output_size(module)
        if size is not None:
            found = size
    if found is None:
        raise ValueError(
            f"model: head {name!r} is an identity (a headless model) and the size of its input "
            f"cannot be read off {type(model).__name__}; build the head yourself, e.g. "
            "replace_head(model, nn.Linear(num_features, num_classes))"
        )
    return found


def _out_features(head: nn.Module) -> int | None:
    for attribute in ("out_features", "num_classes", "out_channels"):  # conv: timm BiT
        value = getattr(head, attribute, None)
        if isinstance(value, int):
            return value
    found = last_linear(head)
    return None if found is None else int(found[1].out_features)


def _warn_shared_batchnorm(model: nn.Module, heads: list[nn.Module]) -> None:
    """Warn when a new head brings plain BatchNorm layers into a domain-specific model."""
    if not any(isinstance(m, DomainSpecificBatchNorm) for m in model.modules()):
        return
    modules = [m for head in heads for m in head.modules()]
    inner = {
        id(norm)
        for m in modules
        if isinstance(m, DomainSpecificBatchNorm)
        for norm in m.norms.values()
    }
    plain = [
        m for m in modules if isinstance(m, (_BatchNorm, FrozenBatchNorm)) and id(m) not in inner
    ]
    if plain:
        logger.warning(
            "replace_head: the new head has %d BatchNorm layers but the model uses "
            "domain-specific BatchNorm: inside tk.bn_domain these would mix the domains' "
            "statistics. Call tk.convert_domain_bn(model) again (converted layers are left "
            "alone) before building the optimizer",
            len(plain),
        )


def _warn_auxiliary_heads(model: nn.Module, old_classes: int, classes: int) -> None:
    """Warn about auxiliary classifiers that still give ``old_classes`` outputs.

    Inception's ``AuxLogits``, GoogLeNet's ``aux1``/``aux2``: in training mode the model
    returns their logits too.
    """
    left = [
        qualified
        for qualified, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
        and "aux" in qualified.lower()
        and _output_size(module) == old_classes
    ]
    if left:
        logger.warning(
            "replace_head: the auxiliary classifier(s) %s still give %d outputs, not %d; "
            "an auxiliary loss on the new labels would train them as %d-way classifiers. "
            "Replace them too, e.g. replace_head(model, %d, name=%r)",
            left,
            old_classes,
            classes,
            old_classes,
            classes,
            left[0],
        )


def _timm_classifiers(model: nn.Module) -> list[nn.Module]:
    """What timm's ``get_classifier()`` returns, as a list.

    Distilled models (DeiT, LeViT) give a tuple of two; CrossViT an ``nn.ModuleList``
    of one head per branch (``forward`` averages them): both count as several heads.
    """
    try:
        found = model.get_classifier()  # type: ignore[operator]
    except Exception:  # a user method
        return []
    found = list(found) if isinstance(found, (tuple, list, nn.ModuleList)) else [found]
    return [m for m in found if isinstance(m, nn.Module)]


def _is_one_of(old: nn.Module, classifiers: list[nn.Module]) -> bool:
    """``old`` is one of timm's classifiers, or the ModuleList holding them."""
    if any(module is old for module in classifiers):
        return True
    return isinstance(old, nn.ModuleList) and bool(classifiers) and list(old) == classifiers


def _timm_disabled_pool(model: nn.Module) -> str | None:
    """The class default pool of a timm model built with ``global_pool=''``, else None."""
    pool = getattr(model, "global_pool", None)
    if not isinstance(pool, str):
        pools = [pool] if isinstance(pool, nn.Module) else []
        pools += [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "global_pool"]
        kinds = [getattr(m, "pool_type", None) for m in pools]
        pool = next((kind for kind in kinds if isinstance(kind, str)), None)
    if pool != "":
        return None
    import inspect

    for cls in type(model).__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        try:
            parameter = inspect.signature(init).parameters.get("global_pool")
        except (TypeError, ValueError):
            continue
        if parameter is not None and isinstance(parameter.default, str) and parameter.default:
            return parameter.default
    return "avg"


def replace_head(
    model: nn.Module, head_or_num_classes: nn.Module | int, *, name: str | None = None
) -> nn.Module:
    """Swap the model's classifier in place and return the new head.

    With an ``int``, the new head is ``nn.Linear(in_features, num_classes)`` where
    ``in_features`` is read from the old head (its ``in_features``, or that of its first
    ``nn.Linear``); a lazy head that has not run yet (``nn.LazyLinear``) is replaced by
    an ``nn.LazyLinear(num_classes)``. A given module is used as it is (a mismatching
    ``in_features`` attribute raises; a lazy one sizes itself). The new head is moved to
    the model's device and dtype and put in the training mode of the old head (a model
    in ``eval()`` gets a head in eval mode).
    A head with weights registered under several names (``model.fc =
    model.classifier[-1]``) is replaced under all of them. Class
    counts kept on the model are updated: timm's ``num_classes``, Hugging Face's
    ``num_labels`` and ``config.num_labels`` (used by their loss).

    Headless models work too: a timm model built with ``num_classes=0`` (its classifier
    is an ``nn.Identity``) gets its head from timm's own ``reset_classifier(num_classes)``
    (the input size is ``head_hidden_size``/``num_features``); one built with
    ``global_pool=''`` gets its class's default pool back (logged as a warning), since a
    classifier needs pooled features. timm's distilled models (DeiT, LeViT: both heads
    are reset, the first is returned) and 1x1-conv heads (BiT ``ResNetV2``) also go
    through ``reset_classifier``, and so do CrossViT's per-branch heads (an
    ``nn.ModuleList``); a given module for such a model raises (its other head would keep
    its old weights in every prediction) unless ``name`` picks the head to replace. A
    torchvision model whose head was set to ``nn.Identity()`` gets a ``Linear`` sized by
    the output of the last layer with
    weights before it (512 for ResNet-18; the ``fc`` of ResNet/RegNet/ShuffleNet, the
    last item of a ``classifier``/``heads`` Sequential). That guess assumes the identity
    receives pooled, flattened features of that size: when a whole block is replaced
    (ConvNeXt's or VGG's entire ``classifier``) or auxiliary heads come later in the
    definition order (GoogLeNet), build the head yourself and pass it. Auxiliary
    classifiers (Inception's ``AuxLogits.fc``, GoogLeNet's ``aux1.fc2``) are not the head:
    when they keep the old class count a warning names them (replace each with ``name=``).

    On a model converted with [`transferkit.convert_domain_bn`][], a new head with
    BatchNorm layers (``ClassifierHead(..., norm="batch")``) logs a warning: its layers
    would be shared by the domains; call ``convert_domain_bn(model)`` again.

    Args:
        model: the network (changed in place).
        head_or_num_classes: a module, or the number of classes of a new linear head.
        name: qualified name of the head to replace; default: [`find_head`][].

    Returns:
        The new head module (already inside ``model``).

    Raises:
        TypeError: wrong argument types.
        ValueError: no head found, ``name`` is not a module, sizes mismatch, a module
            given for one of several combined heads (DeiT/LeViT) without ``name``, or
            ``model`` is a ``DistributedDataParallel`` wrapper (replace the head before
            wrapping).

    Examples:
        >>> import torch, transferkit as tk
        >>> from torch import nn
        >>> net = tk.models.SmallCNN(num_classes=10)
        >>> replace_head(net, 3)
        Linear(in_features=128, out_features=3, bias=True)
        >>> head = replace_head(net, tk.ClassifierHead(128, 5, hidden=(), pool=None))
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 5])
        >>> net.fc = nn.Identity()  # headless
        >>> replace_head(net, 4)
        Linear(in_features=128, out_features=4, bias=True)
    """
    if isinstance(model, nn.Module) and find_ddp(model) is not None:
        raise ValueError(
            "model: replace_head through DistributedDataParallel would train a head that this "
            "DDP never synchronises (it registers parameters when it is built), so the ranks "
            "would drift apart; replace the head before wrapping, or replace it in "
            "model.module and wrap the model again"
        )
    model = unwrap_model(model)
    given_name = name is not None
    if name is None:
        name, old = find_head(model)
    else:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a module name, got {name!r}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            known = [n for n, _ in model.named_modules() if n]
            raise ValueError(
                f"name: {name!r} is not a module of {type(model).__name__}"
                f"{did_you_mean(name, known)}"
            ) from None
    if isinstance(head_or_num_classes, bool) or not isinstance(
        head_or_num_classes, (int, nn.Module)
    ):
        raise TypeError(
            "head_or_num_classes: expected an nn.Module or a number of classes, got "
            f"{type(head_or_num_classes).__name__}"
        )
    headless = _is_headless(old)
    in_features = _headless_in_features(model, name) if headless else _in_features(old, name)
    reference = next(iter(old.parameters()), None)
    if reference is None:
        reference = next(iter(model.parameters()), None)
    # the new head runs in the mode of the one it replaces (a fresh module is in training
    # mode: in a model set to eval() its dropout and BatchNorm would stay active)
    training = old.training
    reset = getattr(model, "reset_classifier", None)
    classifiers = (
        _timm_classifiers(model) if callable(getattr(model, "get_classifier", None)) else []
    )
    if (
        isinstance(head_or_num_classes, int)
        and callable(reset)
        and _is_one_of(old, classifiers)
        and (headless or len(classifiers) > 1 or isinstance(old, nn.Conv2d))
    ):
        # timm's own way: it also rebuilds pooling/pre-logits bookkeeping for num_classes,
        # the distillation head of DeiT/LeViT and the 1x1-conv head of BiT (ResNetV2)
        num_classes = int(check_positive(head_or_num_classes, "head_or_num_classes", integer=True))
        pool = _timm_disabled_pool(model)
        if pool is None:
            reset(num_classes)
        else:
            logger.warning(
                "replace_head: %s was built with global_pool='' (no pooling); a classifier "
                "needs pooled features, so its default pool %r is restored",
                type(model).__name__,
                pool,
            )
            reset(num_classes, global_pool=pool)
        new_heads = _timm_classifiers(model)
        if new_heads and all(_out_features(h) == num_classes for h in new_heads):
            for timm_head in new_heads:
                if reference is not None:
                    timm_head.to(device=reference.device, dtype=reference.dtype)
                timm_head.train(training)
            if isinstance(getattr(model, "num_classes", None), int):
                setattr(model, "num_classes", num_classes)  # noqa: B010 (typed as Module)
            logger.info("replace_head: %s -> %s (timm reset_classifier)", name, new_heads)
            _warn_shared_batchnorm(model, new_heads)
            return new_heads[0]
        raise ValueError(
            f"model: {type(model).__name__}.reset_classifier({num_classes}) did not give a "
            f"head with {num_classes} outputs; pass the head module yourself"
        )
    if not given_name and len(classifiers) > 1 and _is_one_of(old, classifiers):
        # DeiT/LeViT average their head with a distillation head in forward(): replacing
        # one would keep the other's old weights in every prediction, silently
        names = [n for n, m in model.named_modules() if any(m is c for c in classifiers)]
        raise ValueError(
            f"head_or_num_classes: {type(model).__name__} has {len(classifiers)} classifiers "
            f"{names} whose outputs it combines; one given module cannot stand in for all "
            f"of them (in place of {name!r} the others would keep their old weights, or "
            "forward would break). Pass a number of classes (all are reset), or replace "
            "each one yourself with name=..."
        )
    if isinstance(head_or_num_classes, int):
        num_classes = int(check_positive(head_or_num_classes, "head_or_num_classes", integer=True))
        # a lazy old head has no size yet: the new one sizes itself on the first input
        new: nn.Module = (
            nn.LazyLinear(num_classes)
            if in_features is None
            else nn.Linear(in_features, num_classes)
        )
    else:
        new = head_or_num_classes
        given = getattr(new, "in_features", None)
        if (
            isinstance(given, int)
            and in_features is not None
            and not _is_unsized(new)
            and given != in_features
            and not isinstance(old, nn.Conv2d)
        ):
            raise ValueError(
                f"head_or_num_classes: the new head takes {given} features but {name!r} "
                f"receives {in_features}"
            )
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    new.train(training)
    # every name the old head is registered under (``model.fc = model.classifier[-1]``):
    # replacing only the one found would leave forward() calling the old head
    # (not for an identity: one shared nn.Identity may also stand in for other layers)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    if headless:
        names = [name]
    for alias in dict.fromkeys([name, *names]):
        replace_module(model, alias, new)
    if len(names) > 1:
        logger.warning(
            "replace_head: the head %r is registered under %d names %s; the new head "
            "replaces it under all of them (pass name=... to check which one is meant)",
            name,
            len(names),
            names,
        )
    classes = _out_features(new)
    old_classes = None if headless else _out_features(old)
    if classes is not None and old_classes is not None and classes != old_classes:
        _warn_auxiliary_heads(model, old_classes, classes)
    if classes is not None:
        for attribute in ("num_classes", "num_labels"):
            if isinstance(getattr(model, attribute, None), int):
                setattr(model, attribute, classes)
        config = getattr(model, "config", None)
        if config is not None and isinstance(getattr(config, "num_labels", None), int):
            config.num_labels = classes
    logger.info("replace_head: %s -> %s", name, type(new).__name__)
    _warn_shared_batchnorm(model, [new])
    return new
