"""Module surgery shared by freezing, heads, meta-learning and the distributed helpers.

One implementation each of: looking through wrappers (``DistributedDataParallel``,
``DataParallel``, ``torch.compile``), replacing a submodule by its dotted name, finding
the last ``nn.Linear`` of a module and a model's classifier (the public
[`transferkit.heads.find_head`][], here so that freezing's layer-wise decay can find the
head without importing heads), and matching dotted parameter/module names against
glob patterns. Bottom layer: imports nothing from the rest of the package except
``_validation``.

``FullyShardedDataParallel`` is deliberately not looked through: its flat parameters
live on the wrapper, so the inner module holds no trainable parameters to select.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = [
    "find_ddp",
    "find_head",
    "last_linear",
    "matches",
    "replace_module",
    "unwrap_model",
]

#: How many nested wrappers are looked through (DDP(compile(DataParallel(net))) is three).
_MAX_WRAPPERS = 8


def _wrapper_chain(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each module wrapped inside it, outermost first."""
    yield model
    for _ in range(_MAX_WRAPPERS):
        inner: object = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        else:
            inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return
        model = inner
        yield model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Args:
        model: a module, possibly wrapped (nested wrappers are looked through).

    Returns:
        The innermost wrapped module (``model`` itself when it is not a wrapper).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(nn.DataParallel(net))) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    *_, inner = _wrapper_chain(model)
    return inner


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The outermost ``DistributedDataParallel`` in a chain of wrappers, if any.

    Examples:
        >>> find_ddp(nn.DataParallel(nn.Linear(2, 2))) is None
        True
    """
    for layer in _wrapper_chain(model):
        if isinstance(layer, nn.parallel.DistributedDataParallel):
            return layer
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (a dotted path) in ``model``.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
        >>> replace_module(net, "1.0", nn.Tanh())
        >>> net[1][0]
        Tanh()
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def last_linear(module: nn.Module, prefix: str = "") -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` of ``module`` in definition order, with its qualified name.

    A module registered twice counts at its last place (``Sequential(a, relu, b, a)``
    ends in ``a``, named ``"3"``), not only where it first appeared.

    Args:
        module: where to look (``module`` itself counts).
        prefix: prepended to the names, as in ``named_modules(prefix=...)``.

    Returns:
        ``(name, linear)``, or ``None`` when ``module`` holds no ``nn.Linear``.

    Examples:
        >>> last_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "head")
        ('head.2', Linear(in_features=8, out_features=2, bias=True))
    """
    found: tuple[str, nn.Linear] | None = None
    for name, child in module.named_modules(prefix=prefix, remove_duplicate=False):
        if isinstance(child, nn.Linear):
            found = (name, child)
    return found


def matches(name: str, patterns: str | Sequence[str]) -> bool:
    """Whether a dotted ``name`` matches a glob pattern, itself or through a parent.

    ``"layer1"`` matches ``"layer1.0.conv1.weight"`` (the pattern names a module and
    covers everything inside it); ``"*.bias"`` matches every bias. Case-sensitive.

    Examples:
        >>> matches("layer1.0.conv1.weight", "layer1")
        True
        >>> matches("layer10.weight", ["layer1", "fc*"])
        False
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head", "score", "last_linear")


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return str(name)
    return None


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Direct children by name, a module registered under two names under both.

    (``named_children`` lists a shared module once, under its first name only.)
    """
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _last_linear(container: nn.Module, prefix: str) -> tuple[str, nn.Module] | None:
    children = _children(container)
    if children and isinstance(children[-1][1], nn.Identity):
        # a headless classifier block (``classifier[-1] = nn.Identity()``): the identity
        # is the head, not the hidden Linear before it
        leaf = children[-1][0]
        return (f"{prefix}.{leaf}" if prefix else leaf), children[-1][1]
    return last_linear(container, prefix)


def _sizes(module: nn.Module) -> tuple[int | None, int | None]:
    """``(in, out)`` feature sizes of a head candidate, where its ``nn.Linear`` layers say."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears or any(m.in_features == 0 for m in linears):  # none, or lazy
        return None, None
    return int(linears[0].in_features), int(linears[-1].out_features)


def _latest(candidates: list[tuple[str, nn.Module]]) -> tuple[str, nn.Module]:
    """The head among several head-like attributes: the one the others feed.

    ``fc = Linear(2048, 512)`` and ``classifier = Linear(512, 10)`` on one model: ``fc``
    is a projection whose output ``classifier`` takes, so ``classifier`` is the head,
    whatever the order of the names in ``_HEAD_ATTRIBUTES``. Without such evidence the
    first in that order is kept, with a warning naming the alternatives.
    """
    unique: list[tuple[str, nn.Module]] = []
    for name, module in candidates:
        if all(module is not other for _, other in unique):
            unique.append((name, module))
    chosen = unique[0]
    if len(unique) == 1:
        return chosen
    sizes = {id(module): _sizes(module) for _, module in unique}
    for _ in unique:  # follow the chain: each step moves to a candidate fed by the last
        size_in, size_out = sizes[id(chosen[1])]
        fed = [
            (name, module)
            for name, module in unique
            if module is not chosen[1]
            and size_out is not None
            and sizes[id(module)][0] == size_out
            and sizes[id(module)][1] != size_in
        ]
        if len(fed) != 1:
            break
        chosen = fed[0]
    chosen_in, chosen_out = sizes[id(chosen[1])]
    fed_by_another = chosen_in is not None and any(
        sizes[id(module)][1] == chosen_in and sizes[id(module)][0] != chosen_out
        for _, module in unique
        if module is not chosen[1]
    )
    if not fed_by_another:
        logging.getLogger("transferkit.heads").warning(
            "find_head: %s are all head-like; using %r (pass the head's name where a "
            "function takes one, e.g. replace_head(model, n, name=...))",
            [name for name, _ in unique],
            chosen[0],
        )
    return chosen


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the final classifier of a model: ``(qualified name, module)``.

    Looked up in this order:

    1. timm: ``model.get_classifier()`` (``fc``, ``head``, ``head.fc``, ``classifier``).
    2. An attribute ``fc``, ``classifier``, ``heads``, ``head``, ``score`` (HF causal-LM
       classifiers) or ``last_linear``. When it is an ``nn.Sequential`` (torchvision VGG,
       MobileNet, EfficientNet ``classifier``; ViT ``heads``) the last ``nn.Linear`` in it
       is the head (``classifier.6``, ``heads.head``); any other module (a ``Linear``, a
       [`transferkit.heads.ClassifierHead`][], HF ``RobertaClassificationHead``) is the head itself.
       A Sequential that ends in ``nn.Identity`` (a headless model) has that identity as
       its head.
    3. A plain ``nn.Sequential`` model: its last ``nn.Linear``.

    When a model has several of these attributes, the one the others feed is the head
    (``fc = Linear(2048, 512)`` then ``classifier = Linear(512, 10)``: ``classifier``);
    without that evidence the first in the order above is taken and a warning names the
    others.

    Args:
        model: the network (``DataParallel``/DDP/``torch.compile`` wrappers are unwrapped).

    Returns:
        The head's qualified name (usable with ``model.get_submodule``) and the module.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: no head was found; the message lists what was tried.

    Examples:
        >>> import transferkit as tk
        >>> from torch import nn
        >>> find_head(tk.models.SmallCNN())[0]
        'fc'
        >>> find_head(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ('2', Linear(in_features=8, out_features=2, bias=True))
    """
    model = unwrap_model(model)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except Exception:  # a user method: fall back to attributes
            classifier = None
        if isinstance(classifier, nn.Module):
            name = _name_of(model, classifier)
            if name is not None:
                return name, classifier
    children = dict(_children(model))
    candidates: list[tuple[str, nn.Module]] = []
    for attribute in _HEAD_ATTRIBUTES:
        candidate = children.get(attribute)
        if candidate is None:
            continue
        if type(candidate) is nn.Sequential:
            found = _last_linear(candidate, attribute)
            if found is not None:
                candidates.append(found)
            continue
        candidates.append((attribute, candidate))
    if candidates:
        return _latest(candidates)
    if isinstance(model, nn.Sequential):
        found = _last_linear(model, "")
        if found is not None:
            return found
    raise ValueError(
        f"model: cannot find the classifier of {type(model).__name__}: it has no "
        f"get_classifier() (timm), no attribute among {list(_HEAD_ATTRIBUTES)} and is not "
        "an nn.Sequential ending in nn.Linear; pass the head's name explicitly, e.g. "
        "replace_head(model, 10, name='my_head')"
    )
