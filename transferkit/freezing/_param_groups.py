"""[`param_groups`][]: trainable parameters only, a decay/no-decay split, layer-wise lr decay."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .._domain_bn import DomainSpecificBatchNorm
from .._surgery import unwrap_model
from .._validation import check_in_range, check_positive
from ._blocks import _blocks, _depths, _head_name

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        _NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        DomainSpecificBatchNorm,  # its shared affine terms are BatchNorm terms
    )
    if isinstance(t, type)
)


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


def _decayed_groups_weight_decay(
    model: nn.Module, optimizer: torch.optim.Optimizer, tokens: Sequence[str]
) -> float:
    """The weight decay of the optimizer's first group that holds a decayed parameter.

    Falls back to the optimizer's default when every group holds only no-decay names.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owners = _owners(model)
    for group in optimizer.param_groups:
        decayed = [
            p
            for p in group["params"]
            if id(p) in names
            and not _is_no_decay(names[id(p)], owners.get(id(p), nn.Module()), tokens)
        ]
        if decayed and "weight_decay" in group:
            return float(group["weight_decay"])
    return float(optimizer.defaults.get("weight_decay", 0.0))


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
