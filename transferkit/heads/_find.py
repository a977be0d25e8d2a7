"""[`find_head`][]: where the final classifier of a model is (timm, torchvision, HF, Sequential)."""

from __future__ import annotations

from torch import nn

from .._surgery import last_linear, unwrap_model

_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head", "score", "last_linear")


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return str(name)
    return None


def _last_linear(container: nn.Module, prefix: str) -> tuple[str, nn.Module] | None:
    children = list(container.named_children())
    if children and isinstance(children[-1][1], nn.Identity):
        # a headless classifier block (``classifier[-1] = nn.Identity()``): the identity
        # is the head, not the hidden Linear before it
        leaf = children[-1][0]
        return (f"{prefix}.{leaf}" if prefix else leaf), children[-1][1]
    return last_linear(container, prefix)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the final classifier of a model: ``(qualified name, module)``.

    Looked up in this order:

    1. timm: ``model.get_classifier()`` (``fc``, ``head``, ``head.fc``, ``classifier``).
    2. An attribute ``fc``, ``classifier``, ``heads``, ``head``, ``score`` (HF causal-LM
       classifiers) or ``last_linear``. When it is an ``nn.Sequential`` (torchvision VGG,
       MobileNet, EfficientNet ``classifier``; ViT ``heads``) the last ``nn.Linear`` in it
       is the head (``classifier.6``, ``heads.head``); any other module (a ``Linear``, a
       [`ClassifierHead`][], HF ``RobertaClassificationHead``) is the head itself.
       A Sequential that ends in ``nn.Identity`` (a headless model) has that identity as
       its head.
    3. A plain ``nn.Sequential`` model: its last ``nn.Linear``.

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
    children = dict(model.named_children())
    for attribute in _HEAD_ATTRIBUTES:
        candidate = children.get(attribute)
        if candidate is None:
            continue
        if type(candidate) is nn.Sequential:
            found = _last_linear(candidate, attribute)
            if found is not None:
                return found
            continue
        return attribute, candidate
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
