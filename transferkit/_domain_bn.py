"""[`DomainSpecificBatchNorm`][]: one set of BatchNorm statistics per domain (private home).

Public as ``transferkit.DomainSpecificBatchNorm`` (``transferkit.batchnorm`` reports it as
its module). It lives in a bottom layer so that freezing can recognise domain-specific
layers (their shared affine terms are BatchNorm terms) without importing AdaBN.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._validation import check_option, did_you_mean

__all__ = ["DomainSpecificBatchNorm"]

AffineMode = Literal["shared", "separate"]
# id(layer) -> (the domain it returns to when its bn_domain blocks close, open blocks).
# A domain chosen on purpose: adapt_batchnorm warns when it re-estimates the default
# domain outside any block; copies made inside a block rest like the model (ModelEMA).
_OPEN_BLOCKS: dict[int, tuple[str, int]] = {}


def enter_block(layer: DomainSpecificBatchNorm) -> None:
    """Count one more open [`bn_domain`][] block on ``layer`` (before it switches)."""
    resting, count = _OPEN_BLOCKS.get(id(layer), (layer.domain, 0))
    _OPEN_BLOCKS[id(layer)] = (resting, count + 1)


def leave_block(layer: DomainSpecificBatchNorm) -> None:
    """Count one block on ``layer`` closed; forget it when none is left open."""
    resting, count = _OPEN_BLOCKS.pop(id(layer), (layer.domain, 1))
    if count > 1:
        _OPEN_BLOCKS[id(layer)] = (resting, count - 1)


def in_block(layer: DomainSpecificBatchNorm) -> bool:
    """Whether a [`bn_domain`][] block on ``layer`` is open."""
    return id(layer) in _OPEN_BLOCKS


def resting_domain(layer: DomainSpecificBatchNorm) -> str:
    """The domain ``layer`` has outside every open [`bn_domain`][] block."""
    return _OPEN_BLOCKS.get(id(layer), (layer.domain, 0))[0]


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class DomainSpecificBatchNorm(nn.Module):
    """A BatchNorm layer with one set of statistics per domain (DSBN).

    Holds one BatchNorm of the wrapped kind per domain in [`norms`][] (a
    ``ModuleDict``), each a copy of the layer it was built from (same running statistics
    at the start). The *active* domain ([`domain`][], set by [`bn_domain`][])
    decides which statistics normalise the input and, in training mode, which running
    statistics are updated; the others are untouched.

    With ``affine="shared"`` (default) the per-domain layers have no affine terms and the
    wrapper owns one ``weight``/``bias`` pair used for every domain (Chang et al. share
    nothing; sharing halves the parameters that the small target batches must fit and
    was as good or better in our benchmarks). With ``affine="separate"`` each domain's
    layer keeps its own affine terms. A BatchNorm *subclass* that does more after the
    affine step (timm's ``BatchNormAct2d``: activation, drop) keeps its affine terms
    inside: with ``"shared"`` every domain's layer holds the wrapper's very
    ``weight``/``bias`` tensors, so the order normalise, scale and shift, activate stays.

    Args:
        norm: the BatchNorm layer to convert (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``
            or a subclass); it is copied, not modified.
        domains: names of the domains (at least two, unique); the first is active at
            the start.
        affine: ``"shared"`` or ``"separate"`` affine terms (ignored when ``norm`` has no
            affine terms).

    Attributes:
        domain: the active domain's name.

    Shape:
        - Input: what the wrapped layer takes, e.g. ``(N, C, H, W)``; output: the same.

    Examples:
        >>> import torch
        >>> dsbn = DomainSpecificBatchNorm(torch.nn.BatchNorm1d(3))
        >>> _ = dsbn(torch.randn(8, 3))  # source statistics are updated
        >>> dsbn.domain = "target"
        >>> _ = dsbn(torch.randn(8, 3) + 5)
        >>> means = {name: float(bn.running_mean.mean()) for name, bn in dsbn.norms.items()}
        >>> means["target"] > means["source"]
        True
    """

    def __init__(
        self,
        norm: _BatchNorm,
        domains: Sequence[str] = ("source", "target"),
        *,
        affine: AffineMode = "shared",
    ) -> None:
        super().__init__()
        if not isinstance(norm, _BatchNorm):
            raise TypeError(f"norm: expected a BatchNorm layer, got {type(norm).__name__}")
        names = _check_domains(domains)
        self.affine_mode: AffineMode = check_option(affine, "affine", ("shared", "separate"))
        shared = norm.affine and self.affine_mode == "shared"
        if shared:
            # a frozen layer (tk.freeze) stays frozen: the shared terms keep requires_grad
            self.weight: nn.Parameter | None = nn.Parameter(
                norm.weight.detach().clone(), requires_grad=norm.weight.requires_grad
            )
            self.bias: nn.Parameter | None = nn.Parameter(
                norm.bias.detach().clone(), requires_grad=norm.bias.requires_grad
            )
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # a subclass may act on the output of the affine step (BatchNormAct2d): the shared
        # terms then stay inside each domain's layer, as the same tensors
        self._affine_inside = shared and type(norm) not in _PLAIN_BN
        layers = {}
        for name in names:
            layer = copy.deepcopy(norm)
            if self._affine_inside:
                layer.weight, layer.bias = self.weight, self.bias  # type: ignore[assignment]
            elif shared:
                layer.affine = False
                layer.weight = None  # type: ignore[assignment]
                layer.bias = None  # type: ignore[assignment]
            layers[name] = layer
        self.norms = nn.ModuleDict(layers)
        self.domains: tuple[str, ...] = names
        self.num_features = norm.num_features
        self._domain = names[0]
        self.train(norm.training)

    @property
    def domain(self) -> str:
        """The active domain: its statistics are used and updated."""
        return self._domain

    @domain.setter
    def domain(self, name: str) -> None:
        self._domain = _check_domain(name, self.domains)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with the active domain's layer, then the shared affine terms."""
        out: Tensor = self.norms[self._domain](x)
        inside = getattr(self, "_affine_inside", False)  # absent from older pickles
        if self.weight is not None and self.bias is not None and not inside:
            shape = (1, -1) + (1,) * (out.dim() - 2)
            out = torch.addcmul(self.bias.view(shape), out, self.weight.view(shape))
        return out

    def extra_repr(self) -> str:
        """Number of features, domain names and affine mode."""
        return f"{self.num_features}, domains={self.domains}, affine={self.affine_mode!r}"


def _check_domains(domains: object) -> tuple[str, ...]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(f"domains: expected a sequence of names, got {type(domains).__name__}")
    names = tuple(domains)
    if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"domains: expected at least two non-empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"domains: expected unique names, got {names!r}")
    if any("." in n for n in names):
        raise ValueError(f"domains: names may not contain '.', got {names!r}")
    return names


def _check_domain(name: object, domains: Sequence[str]) -> str:
    if not isinstance(name, str):
        raise TypeError(f"domain: expected a str, got {type(name).__name__}")
    if name not in domains:
        hint = did_you_mean(name, domains)
        raise ValueError(f"domain: expected one of {tuple(domains)!r}, got {name!r}{hint}")
    return name
