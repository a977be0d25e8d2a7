"""The domain discriminator: an MLP with one output logit."""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_positive, check_tensor


class DomainDiscriminator(nn.Module):
    """An MLP that outputs one domain logit per sample (no sigmoid inside).

    ``depth`` hidden blocks ``Linear -> BatchNorm1d -> ReLU -> Dropout`` followed by
    ``Linear(hidden, 1)``. Feed its logits to ``binary_cross_entropy_with_logits`` (the
    losses below do): a sigmoid or a softmax over a single unit inside the network would
    saturate or produce no gradient at all.

    Args:
        in_features: size of the input features.
        hidden: width of the hidden blocks.
        depth: number of hidden blocks (0 gives a logistic-regression discriminator).
        dropout: dropout probability after each block (0 disables it).

    Shape:
        - Input: ``(N, in_features)``.
        - Output: ``(N,)`` logits; positive means "source".

    Raises:
        TypeError: for non-integer sizes.
        ValueError: for non-positive sizes, negative ``depth`` or ``dropout`` outside
            ``[0, 1)``.

    Examples:
        >>> import torch
        >>> disc = DomainDiscriminator(128, hidden=64)
        >>> disc(torch.randn(8, 128)).shape
        torch.Size([8])
    """

    def __init__(
        self, in_features: int, hidden: int = 1024, depth: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.in_features = int(check_positive(in_features, "in_features", integer=True))
        width = int(check_positive(hidden, "hidden", integer=True))
        blocks = int(check_positive(depth, "depth", strict=False, integer=True))
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout: expected a number, got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        previous = self.in_features
        for _ in range(blocks):
            layers += [nn.Linear(previous, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(float(dropout)))
            previous = width
        layers.append(nn.Linear(previous, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Domain logits, ``(N,)``.

        Raises:
            ValueError: ``x`` is not ``(N, in_features)``.
            TypeError: ``x`` is not a floating tensor.
        """
        check_tensor(x, "x", ndim=2, floating=True, finite=False)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"x: expected {self.in_features} features per sample (in_features), got shape "
                f"{tuple(x.shape)}"
            )
        out: Tensor = self.layers(x)
        return out.squeeze(-1)
