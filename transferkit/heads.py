"""What sits on top: pooling + MLP classifier heads, and finding/replacing a model's head.

* [`ClassifierHead`][] pools convolutional maps ``(N, C, H, W)``, token sequences
  ``(N, T, D)`` or ready features ``(N, D)`` and maps them to logits through optional
  hidden layers (in the spirit of fastai's ``create_head`` and timm's classifier).
* [`find_head`][] locates the final classifier of torchvision, timm and Hugging Face
  models and of plain ``nn.Sequential`` stacks; [`replace_head`][] swaps it in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import _pooling
from ._surgery import last_linear, replace_module, unwrap_model
from ._validation import (
    check_in_range,
    check_module_data,
    check_option,
    check_positive,
    check_tensor,
)
from .freezing import FrozenBatchNorm

__all__ = ["ClassifierHead", "find_head", "replace_head"]

logger = logging.getLogger(__name__)

PoolType = _pooling.PoolName
Activation = Literal["relu", "gelu", "silu", "tanh"]
NormType = Literal["batch", "layer"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_NORMS: tuple[NormType, ...] = ("batch", "layer")
_HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head", "score", "last_linear")


class ClassifierHead(nn.Module):
    """Pooling, optional hidden layers and a linear classifier.

    Each hidden layer is ``Linear -> norm -> activation -> Dropout``; the output layer
    ``fc`` is ``Linear(hidden[-1], num_classes)``. Without hidden layers, dropout is
    applied to the pooled features before ``fc``.

    The defaults (``hidden=(512,)``, ``dropout=0.5``) give a one-hidden-layer MLP head,
    more capacity for a new task on frozen features. timm's default classifier is
    linear: global average pooling, ``Dropout(drop_rate=0.0)`` and one ``Linear``, which is
    ``ClassifierHead(C, n, hidden=(), dropout=0.0)`` exactly (use it for a linear probe
    or LP-FT). fastai's ``create_head`` is close to
    ``ClassifierHead(C, n, pool="avgmax", norm="batch")`` (fastai also puts BatchNorm and
    dropout before the first Linear).

    Pooling by input rank:

    * ``(N, C, H, W)`` maps: ``"avg"``/``"max"`` over ``H, W``; ``"avgmax"`` concatenates
      both (``2 * C`` features, as fastai's concat pooling); ``"token"`` is an error.
    * ``(N, T, D)`` tokens (transformer layout): ``"avg"``/``"max"``/``"avgmax"`` over
      ``T``; ``"token"`` takes the first token (``[CLS]``).
    * ``(N, D)`` features: one position, so avg = max = token = the features themselves
      (``"avgmax"`` gives ``[x, x]``).
    * ``pool=None``: no pooling; the input must be ``(N, in_features)``.

    This is the pooling of [`transferkit.FeatureExtractor`][] (features pooled there
    and here agree exactly): averages are accumulated in float32 for float16/bfloat16
    input (then returned in the input's dtype), and an ``attention_mask`` ``(N, T)``
    passed to ``forward`` makes avg/max ignore padding tokens, as
    [`transferkit.features.masked_mean`][] does (``"token"`` ignores the mask: the first
    token is always real).

    Args:
        in_features: channels ``C`` or feature size ``D`` of the input.
        num_classes: number of logits.
        hidden: sizes of the hidden layers (``()`` for a linear head).
        dropout: dropout probability in ``[0, 1)``.
        pool: ``"avg"``, ``"max"``, ``"avgmax"``, ``"token"`` or ``None``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        norm: ``None``, ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm) in hidden layers.

    Shape:
        - Input: ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)`` with ``C = D = in_features``.
        - attention_mask (optional): ``(N, T)`` of 0/1 for ``(N, T, D)`` input.
        - Output: ``(N, num_classes)``.

    Raises:
        ValueError: bad sizes or options at construction; a wrong input rank or feature
            size, or a mask that is not ``(N, T)`` of 0/1, in ``forward``.

    Examples:
        >>> import torch
        >>> head = ClassifierHead(64, 10, hidden=(32,), pool="avgmax")
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 10])
        >>> ClassifierHead(16, 3, hidden=(), pool="token")(torch.randn(2, 5, 16)).shape
        torch.Size([2, 3])
        >>> tokens, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0]] * 2)
        >>> ClassifierHead(16, 3, hidden=())(tokens, attention_mask=mask).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.5,
        pool: PoolType | None = "avg",
        activation: Activation = "relu",
        norm: NormType | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(check_positive(in_features, "in_features", integer=True))
        self.num_classes = int(check_positive(num_classes, "num_classes", integer=True))
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden: expected a sequence of layer sizes, got {hidden!r}")
        for size in hidden:
            check_positive(size, "hidden", integer=True)
        check_in_range(dropout, "dropout", 0.0, 1.0)
        if dropout >= 1.0:
            raise ValueError(f"dropout: expected a probability below 1, got {dropout!r}")
        self.pool_type: PoolType | None = (
            None if pool is None else check_option(pool, "pool", _pooling.POOLS)
        )
        act = _ACTIVATIONS[check_option(activation, "activation", tuple(_ACTIVATIONS))]
        norm_type = None if norm is None else check_option(norm, "norm", _NORMS)

        width = self.in_features * (2 if self.pool_type == "avgmax" else 1)
        layers: list[nn.Module] = []
        for size in hidden:
            layers.append(nn.Linear(width, int(size)))
            if norm_type == "batch":
                layers.append(nn.BatchNorm1d(int(size)))
            elif norm_type == "layer":
                layers.append(nn.LayerNorm(int(size)))
            layers += [act(), nn.Dropout(float(dropout))]
            width = int(size)
        if not hidden and dropout > 0:
            layers.append(nn.Dropout(float(dropout)))
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, self.num_classes)

    def pool(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pool ``x`` to ``(N, in_features)`` (``2 * in_features`` for ``"avgmax"``).

        The same pooling as [`transferkit.FeatureExtractor`][] for maps and tokens.
        """
        check_tensor(x, "input", ndim=(2, 3, 4), floating=True, finite=False, min_samples=1)
        channels = x.shape[1] if x.dim() in (2, 4) else x.shape[2]
        if channels != self.in_features:
            axis = "C (dim 1)" if x.dim() == 4 else "D (last dim)"
            raise ValueError(
                f"input: expected {axis} = in_features = {self.in_features}, got shape "
                f"{tuple(x.shape)}"
            )
        mode = self.pool_type
        if mode is None and x.dim() != 2:
            raise ValueError(
                f"input: pool=None expects (N, {self.in_features}) features, got shape "
                f"{tuple(x.shape)}; choose pool='avg', 'max', 'avgmax' or 'token'"
            )
        if mode == "token" and x.dim() == 4:
            raise ValueError(
                "input: pool='token' needs (N, T, D) tokens, got an (N, C, H, W) map "
                f"of shape {tuple(x.shape)}"
            )
        if attention_mask is not None and (x.dim() != 3 or mode is None):
            raise ValueError(
                "attention_mask: only (N, T, D) token input is masked (pool 'avg', 'max' or "
                f"'avgmax'), got input of shape {tuple(x.shape)} with pool={mode!r}"
            )
        mask = None if mode == "token" else attention_mask
        # averages accumulate in float32; the head's layers take the input's dtype back
        return _pooling.pool(x, mode, mask=mask, name="input").to(x.dtype)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits, ``(N, num_classes)``; ``attention_mask`` ``(N, T)`` ignores padding tokens."""
        check_module_data(self, "ClassifierHead")
        out: Tensor = self.fc(self.hidden(self.pool(x, attention_mask)))
        return out

    def extra_repr(self) -> str:
        """``in_features, num_classes, pool``."""
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"pool={self.pool_type!r}"
        )


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


def _in_features(head: nn.Module, name: str) -> int:
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


def _timm_classifiers(model: nn.Module) -> list[nn.Module]:
    """What timm's ``get_classifier()`` returns, as a list (distilled models give two)."""
    try:
        found = model.get_classifier()  # type: ignore[operator]
    except Exception:  # a user method
        return []
    found = list(found) if isinstance(found, (tuple, list)) else [found]
    return [m for m in found if isinstance(m, nn.Module)]


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
    ``nn.Linear``). A given module is used as it is (a mismatching ``in_features``
    attribute raises). The new head is moved to the model's device and dtype. Class
    counts kept on the model are updated: timm's ``num_classes``, Hugging Face's
    ``num_labels`` and ``config.num_labels`` (used by their loss).

    Headless models work too: a timm model built with ``num_classes=0`` (its classifier
    is an ``nn.Identity``) gets its head from timm's own ``reset_classifier(num_classes)``
    (the input size is ``head_hidden_size``/``num_features``); one built with
    ``global_pool=''`` gets its class's default pool back (logged as a warning), since a
    classifier needs pooled features. timm's distilled models (DeiT, LeViT: both heads
    are reset, the first is returned) and 1x1-conv heads (BiT ``ResNetV2``) also go
    through ``reset_classifier``. A torchvision model whose head was set to
    ``nn.Identity()`` gets a ``Linear`` sized by the output of the last layer with
    weights before it (512 for ResNet-18; the ``fc`` of ResNet/RegNet/ShuffleNet, the
    last item of a ``classifier``/``heads`` Sequential). That guess assumes the identity
    receives pooled, flattened features of that size: when a whole block is replaced
    (ConvNeXt's or VGG's entire ``classifier``) or auxiliary heads come later in the
    definition order (GoogLeNet), build the head yourself and pass it.

    Args:
        model: the network (changed in place).
        head_or_num_classes: a module, or the number of classes of a new linear head.
        name: qualified name of the head to replace; default: [`find_head`][].

    Returns:
        The new head module (already inside ``model``).

    Raises:
        TypeError: wrong argument types.
        ValueError: no head found, ``name`` is not a module, or sizes mismatch.

    Examples:
        >>> import torch, transferkit as tk
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
    model = unwrap_model(model)
    if name is None:
        name, old = find_head(model)
    else:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a module name, got {name!r}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            from ._validation import did_you_mean

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
    reset = getattr(model, "reset_classifier", None)
    classifiers = (
        _timm_classifiers(model) if callable(getattr(model, "get_classifier", None)) else []
    )
    if (
        isinstance(head_or_num_classes, int)
        and callable(reset)
        and any(module is old for module in classifiers)
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
            if isinstance(getattr(model, "num_classes", None), int):
                setattr(model, "num_classes", num_classes)  # noqa: B010 (typed as Module)
            logger.info("replace_head: %s -> %s (timm reset_classifier)", name, new_heads)
            return new_heads[0]
        raise ValueError(
            f"model: {type(model).__name__}.reset_classifier({num_classes}) did not give a "
            f"head with {num_classes} outputs; pass the head module yourself"
        )
    if isinstance(head_or_num_classes, int):
        num_classes = int(check_positive(head_or_num_classes, "head_or_num_classes", integer=True))
        new: nn.Module = nn.Linear(in_features, num_classes)
    else:
        new = head_or_num_classes
        given = getattr(new, "in_features", None)
        if isinstance(given, int) and given != in_features and not isinstance(old, nn.Conv2d):
            raise ValueError(
                f"head_or_num_classes: the new head takes {given} features but {name!r} "
                f"receives {in_features}"
            )
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    replace_module(model, name, new)
    classes = _out_features(new)
    if classes is not None:
        for attribute in ("num_classes", "num_labels"):
            if isinstance(getattr(model, attribute, None), int):
                setattr(model, attribute, classes)
        config = getattr(model, "config", None)
        if config is not None and isinstance(getattr(config, "num_labels", None), int):
            config.num_labels = classes
    logger.info("replace_head: %s -> %s", name, type(new).__name__)
    return new
