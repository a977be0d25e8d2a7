"""How a model is cut into blocks (for param groups and layer-wise decay), and the summary table."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .._domain_bn import DomainSpecificBatchNorm
from .._surgery import find_head, unwrap_model
from ._batchnorm import _bn_policy, _is_bn_like


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _should_split(module: nn.Module, name: str, head: str | None) -> bool:
    if head is not None and head.startswith(name + "."):
        return True
    if isinstance(module, DomainSpecificBatchNorm):
        return False  # one layer: its per-domain copies sit at the same depth
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
