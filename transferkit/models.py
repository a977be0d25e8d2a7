"""Small reference networks for examples, tests and benchmarks.

Real users bring their own pretrained network; these two exist so that every example
runs offline on a 2-core CPU. Both follow the ``backbone -> neck -> fc`` layout that
[`transferkit.find_head`][] and the freezing helpers understand, and expose
``forward_features`` (the input of the classifier) like timm models do.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ._validation import check_option, check_positive

__all__ = ["MLP", "SmallCNN"]


class SmallCNN(nn.Module):
    """A LeNet-style CNN: two conv blocks, a bottleneck and a linear classifier.

    Modules, in definition order: ``features`` (conv-BN-ReLU-pool x2), ``neck``
    (flatten + Linear + ReLU to ``feature_dim``; with ``neck_norm="batch"``, flatten +
    Linear + BatchNorm1d + ReLU, TLlib's bottleneck) and ``fc`` (the classifier).

    AFN (``tk.losses.adaptive_feature_norm``) needs the normalised bottleneck: at the
    paper's weight it grows a plain ReLU bottleneck's norms through a shared offset until
    every prediction is one class, while with ``neck_norm="batch"`` it trains and beats
    AdaBN on MNIST -> digits (77.1 vs 71.9%, 3 seeds), though not on MNIST -> MNIST-M-lite.
    The adaptation results page compares every recipe on both bottlenecks.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        width: channels of the first conv block (the second has twice as many).
        feature_dim: size of the bottleneck features returned by ``forward_features``.
        neck_norm: ``None`` (Linear + ReLU) or ``"batch"`` (Linear + BatchNorm1d + ReLU;
            training then needs batches of at least 2 samples).

    Shape:
        - Input: ``(N, in_channels, H, W)`` with ``H, W >= 4``.
        - Output: ``(N, num_classes)`` logits.

    Examples:
        >>> import torch
        >>> net = SmallCNN(num_classes=10)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
        >>> net.forward_features(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 128])
        >>> [type(m).__name__ for m in SmallCNN(neck_norm="batch").neck]
        ['Flatten', 'Linear', 'BatchNorm1d', 'ReLU']
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
        neck_norm: Literal["batch"] | None = None,
    ) -> None:
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (num_classes, "num_classes")):
            check_positive(value, name, integer=True)
        check_positive(width, "width", integer=True)
        check_positive(feature_dim, "feature_dim", integer=True)
        if neck_norm is not None:
            check_option(neck_norm, "neck_norm", ("batch",))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        norm: list[nn.Module] = [] if neck_norm is None else [nn.BatchNorm1d(feature_dim)]
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            *norm,
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward_features(self, x: Tensor) -> Tensor:
        """Bottleneck features, ``(N, feature_dim)``."""
        out: Tensor = self.neck(self.features(x))
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, ``(N, num_classes)``."""
        out: Tensor = self.fc(self.forward_features(x))
        return out


class MLP(nn.Module):
    """A ReLU multi-layer perceptron with a separate classifier ``fc``.

    Args:
        in_features: input size.
        num_classes: number of output logits.
        hidden: sizes of the hidden layers (the last one is ``feature_dim``).

    Shape:
        - Input: ``(N, in_features)``; output: ``(N, num_classes)``.

    Examples:
        >>> import torch
        >>> MLP(2, 2, hidden=(16, 16))(torch.zeros(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64, 64)
    ) -> None:
        super().__init__()
        check_positive(in_features, "in_features", integer=True)
        check_positive(num_classes, "num_classes", integer=True)
        if not hidden:
            raise ValueError("hidden: expected at least one hidden layer size")
        layers: list[nn.Module] = []
        previous = in_features
        for size in hidden:
            check_positive(size, "hidden", integer=True)
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, num_classes)
        self.feature_dim = previous

    def forward_features(self, x: Tensor) -> Tensor:
        """Hidden features, ``(N, hidden[-1])``."""
        out: Tensor = self.features(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, ``(N, num_classes)``."""
        out: Tensor = self.fc(self.features(x))
        return out
