"""Which parameters a freeze/unfreeze call targets: by name pattern, depth (``until``) and type.

Parameter names are the qualified names of ``model.named_parameters()``; a glob pattern
selects a parameter when it matches its name or the name of a module that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from .._domain_bn import DomainSpecificBatchNorm
from .._surgery import matches
from .._validation import did_you_mean
from ._batchnorm import FrozenBatchNorm, _bn_class, _is_bn_like


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
        # the per-domain layers of a DomainSpecificBatchNorm count as what the wrapper is:
        # types=DomainSpecificBatchNorm selects their statistics with the shared terms
        self._wrappers = {
            id(inner): wrapper
            for wrapper in model.modules()
            if isinstance(wrapper, DomainSpecificBatchNorm)
            for inner in wrapper.norms.values()
        }
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
            self._is_type(module)
            or (id(module) in self._wrappers and self._is_type(self._wrappers[id(module)]))
        ):
            return False
        return not any(matches(name, p) for p in self.exclude)

    def _is_type(self, module: nn.Module) -> bool:
        assert self.types is not None
        return isinstance(module, self.types) or issubclass(_bn_class(module), self.types)
