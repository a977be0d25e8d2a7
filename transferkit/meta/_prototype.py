"""[`prototype_init`][]: a final linear layer that scores classes by their prototypes."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from .._surgery import last_linear
from .._validation import (
    check_labels,
    check_not_meta,
    check_option,
    check_positive,
    check_tensor,
)

logger = logging.getLogger("transferkit.meta")


def _final_linear(head: nn.Module) -> nn.Linear:
    found = last_linear(head)
    if found is None:
        raise ValueError(f"head: expected an nn.Linear or a module containing one, got {head!r}")
    return found[1]


def prototype_init(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    metric: Literal["cosine", "euclidean"] = "cosine",
    scale: float | None = None,
) -> nn.Linear:
    r"""Initialise a classifier's final linear layer from class prototypes, in place.

    ``head`` is an ``nn.Linear`` or any module whose last ``nn.Linear`` (in definition
    order) produces the logits, e.g. a [`transferkit.ClassifierHead`][] or a whole
    network. ``features`` are what ``head`` takes as input; the inputs of the final linear
    layer are recorded with a forward pre-hook (``head`` runs once in eval mode, without
    gradients), so prototypes live in the space that layer sees. With $\mu_c$ the
    mean of class $c$ and $s$ = ``scale``:

    * ``"cosine"``: $W_c = s\,\mu_c / \|\mu_c\|$, $b_c = 0$. The logits are
      $s\,\|h\| \cos(h, \mu_c)$, so the argmax is the nearest prototype in cosine
      similarity. Default ``scale`` 10 (a softmax temperature that fine-tunes well).
    * ``"euclidean"``: $W_c = 2 s\,\mu_c$, $b_c = -s\,\|\mu_c\|^2$, i.e.
      $-s\,\|h - \mu_c\|^2$ up to a per-sample constant (Snell et al., 2017):
      the argmax is the nearest prototype in Euclidean distance. Default ``scale`` 1.

    Args:
        head: the classifier (modified in place).
        features: labelled few-shot inputs of ``head``.
        labels: their classes in ``[0, out_features)``; every class needs a sample.
        metric: ``"cosine"`` or ``"euclidean"``.
        scale: logit scale; ``None`` for the metric's default.

    Returns:
        The final ``nn.Linear`` that was initialised.

    Shape:
        - ``features``: ``(N, ...)`` as ``head`` accepts; ``labels``: ``(N,)``.

    Raises:
        ValueError: no linear layer, a class without samples, mismatched lengths, NaN,
            or features the head cannot take (wrong shape or device; the message names
            ``features``). Features in another floating dtype are cast to the head's.
        TypeError: non-tensor inputs or non-integer labels.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> layer = prototype_init(nn.Linear(2, 2), features, labels)
        >>> layer(features).argmax(1).tolist()
        [0, 0, 1, 1]
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"head: expected an nn.Module, got {type(head).__name__}")
    x = check_tensor(features, "features", floating=True, min_samples=1)
    linear = _final_linear(head)
    num_classes = linear.out_features
    y = check_labels(labels, "labels", num_samples=x.shape[0], num_classes=num_classes)
    check_option(metric, "metric", ("cosine", "euclidean"))
    default_scale = 10.0 if metric == "cosine" else 1.0
    s = default_scale if scale is None else check_positive(scale, "scale")

    recorded: list[Tensor] = []

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        recorded.append(inputs[0].detach())

    param = next((p for p in head.parameters() if p.is_floating_point()), None)
    if param is not None:
        check_not_meta(param, "head")
        x = x.to(param.dtype)  # features in another precision than the head's weights
    was_training = head.training
    handle = linear.register_forward_pre_hook(record)
    try:
        head.eval()
        with torch.no_grad():
            head(x)
    except RuntimeError as error:  # a shape or device the head cannot take
        raise ValueError(
            f"features: head {type(head).__name__} cannot take features of shape "
            f"{tuple(x.shape)} on {x.device}: {error}"
        ) from error
    finally:
        handle.remove()
        head.train(was_training)
    if not recorded:
        raise ValueError("head: its final nn.Linear was not called in the forward pass")
    hidden = recorded[-1].reshape(-1, linear.in_features).to(torch.float64)
    if hidden.shape[0] != y.shape[0]:
        raise ValueError(
            f"features: the final linear layer saw {hidden.shape[0]} rows for "
            f"{y.shape[0]} labels; prototype_init needs one row per sample"
        )
    y = y.to(hidden.device)
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"labels: classes {missing} have no samples; every one of the {num_classes} "
            "outputs needs at least one"
        )
    sums = torch.zeros(num_classes, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, y, hidden)
    prototypes = sums / counts[:, None].to(hidden.dtype)
    if metric == "cosine":
        weight = s * nn.functional.normalize(prototypes, dim=1)
        bias = torch.zeros(num_classes, dtype=hidden.dtype, device=hidden.device)
    else:
        weight = 2.0 * s * prototypes
        bias = -s * (prototypes**2).sum(1)
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(bias.to(linear.bias.dtype))
        elif metric == "euclidean":
            logger.warning("prototype_init: the layer has no bias; dropping -|mu_c|^2 terms")
    return linear
