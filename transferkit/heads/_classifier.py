"""[`ClassifierHead`][]: the shared pooling, optional hidden layers and a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from .. import _pooling
from .._validation import (
    check_in_range,
    check_module_data,
    check_option,
    check_positive,
    check_tensor,
)

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

    A 1-D convolutional map ``(N, C, L)`` has the rank of a token sequence: transpose it
    to ``(N, L, C)`` first (when ``L = C`` nothing could tell the two apart).

    This is the pooling of [`transferkit.FeatureExtractor`][] (features pooled there
    and here agree exactly): averages are accumulated in float32 for float16/bfloat16
    input (then returned in the input's dtype), and an ``attention_mask`` ``(N, T)``
    passed to ``forward`` makes avg/max ignore padding tokens, as
    [`transferkit.features.masked_mean`][] does. With ``"token"`` the mask is checked
    and the first token of every row must be real: a left-padded batch (padding first)
    raises instead of classifying a padding token.

    Args:
        in_features: channels ``C`` or feature size ``D`` of the input.
        num_classes: number of logits.
        hidden: sizes of the hidden layers (``()`` for a linear head).
        dropout: dropout probability in ``[0, 1)``.
        pool: ``"avg"``, ``"max"``, ``"avgmax"``, ``"token"`` or ``None``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        norm: ``None``, ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm) in hidden
            layers (an error with ``hidden=()``, which has none).

    Shape:
        - Input: ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)`` with ``C = D = in_features``.
        - attention_mask (optional): ``(N, T)`` of 0/1 for ``(N, T, D)`` input.
        - Output: ``(N, num_classes)``.

    Raises:
        ValueError: bad sizes or options at construction (``norm`` without hidden
            layers); a wrong input rank or feature size, a mask that is not ``(N, T)``
            of 0/1, or (``"token"``) a mask whose first token is padding, in ``forward``.

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
        if norm_type is not None and not hidden:
            raise ValueError(
                f"norm: {norm_type!r} normalises hidden layers, but hidden=() has none; "
                "pass hidden sizes, or norm=None for a linear head"
            )

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
            hint = ""
            if x.dim() == 3 and x.shape[1] == self.in_features:
                hint = (
                    "; 3-D input is read as tokens (N, T, D): for a 1-D map (N, C, L) "
                    "pass x.transpose(1, 2)"
                )
            raise ValueError(
                f"input: expected {axis} = in_features = {self.in_features}, got shape "
                f"{tuple(x.shape)}{hint}"
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
        # "token" checks the mask too: the first token must be real (not left padding)
        mask = attention_mask
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
