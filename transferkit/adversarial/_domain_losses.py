"""DANN and CDAN(+E): balanced domain BCE of a discriminator on reversed features."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._precision import as_compute, no_autocast
from .._validation import (
    check_bool,
    check_features,
    check_pair,
    check_positive,
    check_seed,
    check_tensor,
)
from ._adversary import (
    adversary_and_grl,
    check_predictions,
    run_adversary,
)
from ._reversal import GradientReversal

#: Above this many multilinear features (``feature_dim * num_classes``) CDAN switches to
#: the randomized multilinear map by default, as in Long et al. (2018).
RANDOMIZE_ABOVE = 4096


def _check_weights(weights: object, name: str, num_samples: int, like: Tensor) -> Tensor | None:
    if weights is None:
        return None
    tensor = check_tensor(weights, name, ndim=1, floating=True)
    if tensor.shape[0] != num_samples:
        raise ValueError(f"{name}: expected {num_samples} weights, got {tensor.shape[0]}")
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got {tensor.device}")
    if bool((tensor < 0).any()):
        raise ValueError(f"{name}: expected non-negative weights")
    return tensor


def _logits_of(discriminator: nn.Module, inputs: Tensor) -> Tensor:
    logits = run_adversary(discriminator, "discriminator", inputs)
    if not isinstance(logits, Tensor) or logits.numel() != inputs.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"discriminator: expected one logit per sample ({inputs.shape[0]}), got {got}"
        )
    return logits.reshape(inputs.shape[0])


def _domain_bce(
    logits: Tensor,
    num_source: int,
    source_weights: Tensor | None,
    target_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Balanced BCE-with-logits (source = 1, target = 0) and balanced accuracy, in fp32."""
    with no_autocast(logits.device):
        logits = as_compute(logits)
        source, target = logits[:num_source], logits[num_source:]
        w_s = None if source_weights is None else source_weights.to(logits.dtype)
        w_t = None if target_weights is None else target_weights.to(logits.dtype)
        # softplus(-z) = -log sigmoid(z), softplus(z) = -log(1 - sigmoid(z)): the BCE with
        # logits, written out so that the weights may carry gradients too.
        bce_s, bce_t = F.softplus(-source), F.softplus(target)
        loss_s = (bce_s if w_s is None else w_s * bce_s).mean()
        loss_t = (bce_t if w_t is None else w_t * bce_t).mean()
        loss = 0.5 * (loss_s + loss_t)
        with torch.no_grad():
            accuracy = 0.5 * ((source > 0).float().mean() + (target <= 0).float().mean())
    return loss, accuracy


class _AdversarialLossBase(nn.Module):
    def __init__(self, discriminator: nn.Module, grl: GradientReversal | None) -> None:
        super().__init__()
        self.discriminator, self.grl = adversary_and_grl(discriminator, "discriminator", grl, 1.0)
        self._accuracy: Tensor | None = None

    @property
    def domain_accuracy(self) -> float:
        """Balanced accuracy of the discriminator in the last call (NaN before any call).

        Near 0.5 means the domains are indistinguishable to the discriminator; near 1
        means the features still separate them.
        """
        return math.nan if self._accuracy is None else float(self._accuracy)


class DomainAdversarialLoss(_AdversarialLossBase):
    r"""DANN domain-adversarial loss (Ganin et al., 2016).

    $$
    \mathcal{L} = \tfrac12\Big[\tfrac{1}{n_s}\sum_i w^s_i\,
        \mathrm{BCE}(D(R(f^s_i)), 1) + \tfrac{1}{n_t}\sum_j w^t_j\,
        \mathrm{BCE}(D(R(f^t_j)), 0)\Big]
    $$

    where ``R`` is gradient reversal and ``D`` the discriminator. Minimising it trains
    the discriminator to separate the domains while the reversed gradient trains the
    feature extractor to confuse it. The module owns the discriminator, so pass
    ``criterion.parameters()`` to the optimizer together with the network's. Both
    domains go through the discriminator in one batch (its BatchNorm sees both).

    Args:
        discriminator: a module mapping ``(N, D)`` features to ``(N,)`` or ``(N, 1)``
            logits, e.g. [`DomainDiscriminator`][].
        grl: the reversal layer; default ``GradientReversal(1.0)``. Use
            ``GradientReversal(WarmStartSchedule(max_steps))`` for the DANN ramp.

    Call arguments:
        source: source features ``f_s``.
        target: target features ``f_t``.
        source_weights / target_weights: optional non-negative per-sample weights; each
            domain's term is ``mean(w * bce)`` (the ``weight`` of torch's BCE).

    Shape:
        - ``source``: ``(N_s, D)``, ``target``: ``(N_t, D)`` (``N_s`` and ``N_t`` may differ).
        - ``source_weights``: ``(N_s,)``, ``target_weights``: ``(N_t,)``.
        - Output: scalar, fp32 (also under autocast).

    Raises:
        TypeError: for non-tensor or non-floating input, or mismatched dtypes.
        ValueError: for non-2-D, empty or non-finite features, mismatched feature sizes or
            devices, weights of the wrong length or negative weights.

    Examples:
        >>> from transferkit.adversarial import DomainDiscriminator
        >>> _ = torch.manual_seed(0)
        >>> criterion = DomainAdversarialLoss(DomainDiscriminator(16, hidden=32))
        >>> loss = criterion(torch.randn(8, 16), torch.randn(6, 16) + 3)
        >>> loss.shape, 0.0 <= criterion.domain_accuracy <= 1.0
        (torch.Size([]), True)
    """

    def __init__(self, discriminator: nn.Module, grl: GradientReversal | None = None) -> None:
        super().__init__(discriminator, grl)

    def forward(
        self,
        source: Tensor,
        target: Tensor,
        *,
        source_weights: Tensor | None = None,
        target_weights: Tensor | None = None,
    ) -> Tensor:
        """Domain-adversarial loss of source and target features."""
        check_features(source, "source")
        check_features(target, "target")
        check_pair(source, target, ("source", "target"))
        w_s = _check_weights(source_weights, "source_weights", source.shape[0], source)
        w_t = _check_weights(target_weights, "target_weights", target.shape[0], target)
        features = self.grl(torch.cat([source, target], dim=0))
        logits = _logits_of(self.discriminator, features)
        loss, self._accuracy = _domain_bce(logits, source.shape[0], w_s, w_t)
        return loss


class ConditionalDomainAdversarialLoss(_AdversarialLossBase):
    r"""CDAN and CDAN+E (Long et al., 2018): adversarial loss conditioned on predictions.

    The discriminator sees ``h = T(f, g)`` where ``g = softmax(logits)`` (detached, as in
    the reference implementation) and ``T`` is

    * the multilinear map ``f ⊗ g`` (outer product, flattened to ``C * F`` features), or
    * the randomized multilinear map ``(f R_f) ⊙ (g R_g) / sqrt(d)`` with fixed Gaussian
      matrices ``R_f: (F, d)``, ``R_g: (C, d)``, registered as buffers (so they are saved
      and loaded with ``state_dict`` and move with ``.to(device)``).

    With ``entropy_conditioning=True`` (CDAN+E) each sample is weighted by
    ``w = 1 + exp(-H(g))``, normalised to mean 1 within each domain, so confident
    predictions count more. The loss is then the balanced BCE of
    [`DomainAdversarialLoss`][] on the reversed ``h``.

    Args:
        discriminator: maps ``(N, C * F)`` (or ``(N, randomized_dim)``) to ``(N,)`` logits.
        num_classes: ``C``; required for the randomized map, checked against input.
        feature_dim: ``F``, the width of the features (the name the reference models use
            for their ``forward_features`` width); required for the randomized map,
            checked against input. ``features_dim=`` (TLlib's spelling) is accepted with a
            ``FutureWarning`` and will be removed.
        entropy_conditioning: CDAN+E entropy weighting.
        randomized: use the randomized map; ``None`` chooses it when ``num_classes`` and
            ``feature_dim`` are given and ``F * C > 4096``.
        randomized_dim: ``d``, output size of the randomized map.
        grl: the reversal layer; default ``GradientReversal(1.0)``.
        seed: seed of the random matrices, an integer in ``[0, 2**64 - 1]`` (``None``
            uses torch's global generator); the matrices are drawn on the CPU, so a seed
            gives the same map on every device.

    Call arguments:
        source_logits, source_features, target_logits, target_features (in that order:
        ``criterion(g_s, f_s, g_t, f_t)``), plus optional keyword ``source_weights`` /
        ``target_weights`` multiplied into the (entropy) weights.

    Shape:
        - ``source_logits``: ``(N_s, C)``, ``source_features``: ``(N_s, F)``.
        - ``target_logits``: ``(N_t, C)``, ``target_features``: ``(N_t, F)``.
        - Output: scalar, fp32 (also under autocast).

    Raises:
        TypeError: for non-tensor, non-floating or mismatched-dtype input, or a seed
            that is not an integer.
        ValueError: for wrong ranks, sizes or devices, non-finite values, a negative
            seed, or ``randomized=True`` without ``num_classes`` and ``feature_dim``.

    Examples:
        >>> from transferkit.adversarial import DomainDiscriminator
        >>> _ = torch.manual_seed(0)
        >>> disc = DomainDiscriminator(10 * 4, hidden=32)
        >>> criterion = ConditionalDomainAdversarialLoss(
        ...     disc, num_classes=4, feature_dim=10, entropy_conditioning=True)
        >>> loss = criterion(torch.randn(8, 4), torch.randn(8, 10),
        ...                  torch.randn(5, 4), torch.randn(5, 10))
        >>> loss.shape, criterion.randomized
        (torch.Size([]), False)
        >>> big = ConditionalDomainAdversarialLoss(
        ...     DomainDiscriminator(1024, hidden=32), num_classes=10, feature_dim=512)
        >>> big.randomized, big.random_features.shape
        (True, torch.Size([512, 1024]))
    """

    random_features: Tensor | None
    random_classes: Tensor | None

    def __init__(
        self,
        discriminator: nn.Module,
        num_classes: int | None = None,
        feature_dim: int | None = None,
        *,
        entropy_conditioning: bool = False,
        randomized: bool | None = None,
        randomized_dim: int = 1024,
        grl: GradientReversal | None = None,
        seed: int | None = None,
        features_dim: int | None = None,
    ) -> None:
        super().__init__(discriminator, grl)
        if features_dim is not None:
            if feature_dim is not None:
                raise TypeError(
                    "features_dim: pass only feature_dim (features_dim is its deprecated spelling)"
                )
            warnings.warn(
                "features_dim is deprecated; pass feature_dim (the same value)",
                FutureWarning,
                stacklevel=2,
            )
            feature_dim = features_dim
        self.num_classes = (
            None
            if num_classes is None
            else int(check_positive(num_classes, "num_classes", integer=True))
        )
        self.feature_dim = (
            None
            if feature_dim is None
            else int(check_positive(feature_dim, "feature_dim", integer=True))
        )
        check_bool(entropy_conditioning, "entropy_conditioning")
        check_bool(randomized, "randomized", optional=True)
        self.entropy_conditioning = entropy_conditioning
        self.randomized_dim = int(check_positive(randomized_dim, "randomized_dim", integer=True))
        known = self.num_classes is not None and self.feature_dim is not None
        if randomized is None:
            randomized = known and self.num_classes * self.feature_dim > RANDOMIZE_ABOVE  # type: ignore[operator]
        if randomized and not known:
            raise ValueError(
                "randomized: the randomized multilinear map needs num_classes and "
                "feature_dim to draw its random matrices; pass both"
            )
        self.randomized = bool(randomized)
        checked_seed = None if seed is None else check_seed(seed)
        if self.randomized:
            generator = (
                None if checked_seed is None else torch.Generator().manual_seed(checked_seed)
            )
            shape_f = (self.feature_dim, self.randomized_dim)
            shape_g = (self.num_classes, self.randomized_dim)
            self.register_buffer("random_features", torch.randn(shape_f, generator=generator))  # type: ignore[arg-type]
            self.register_buffer("random_classes", torch.randn(shape_g, generator=generator))  # type: ignore[arg-type]
        else:
            self.random_features = None
            self.random_classes = None

    def _check_inputs(self, logits: Tensor, features: Tensor, prefix: str) -> None:
        check_predictions(logits, features, prefix)
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{prefix}_logits: expected {self.num_classes} classes, got {logits.shape[1]}"
            )
        if self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise ValueError(
                f"{prefix}_features: expected {self.feature_dim} features, got {features.shape[1]}"
            )

    def multilinear_map(self, features: Tensor, probs: Tensor) -> Tensor:
        """The (randomized) multilinear map ``T(f, g)`` the discriminator sees.

        Shape:
            ``features``: ``(N, F)``, ``probs``: ``(N, C)``; returns ``(N, C * F)`` or
            ``(N, randomized_dim)``.
        """
        if self.random_features is not None and self.random_classes is not None:
            projected_f = features @ self.random_features.to(features.dtype)
            projected_g = probs @ self.random_classes.to(probs.dtype)
            return projected_f * projected_g / math.sqrt(self.randomized_dim)
        outer = probs.unsqueeze(2) * features.unsqueeze(1)
        return outer.reshape(features.shape[0], -1)

    def forward(
        self,
        source_logits: Tensor,
        source_features: Tensor,
        target_logits: Tensor,
        target_features: Tensor,
        *,
        source_weights: Tensor | None = None,
        target_weights: Tensor | None = None,
    ) -> Tensor:
        """Conditional domain-adversarial loss."""
        self._check_inputs(source_logits, source_features, "source")
        self._check_inputs(target_logits, target_features, "target")
        check_pair(source_features, target_features, ("source_features", "target_features"))
        check_pair(source_logits, target_logits, ("source_logits", "target_logits"))
        num_source = source_features.shape[0]
        w_s = _check_weights(source_weights, "source_weights", num_source, source_features)
        w_t = _check_weights(
            target_weights, "target_weights", target_features.shape[0], target_features
        )
        with no_autocast(source_features.device):
            features = as_compute(torch.cat([source_features, target_features], dim=0))
            logits = as_compute(torch.cat([source_logits, target_logits], dim=0).detach())
            probs = logits.softmax(dim=1)
            mapped = self.multilinear_map(features, probs)
            if self.entropy_conditioning:
                entropy = -(probs * logits.log_softmax(dim=1)).sum(dim=1)
                certainty = 1.0 + torch.exp(-entropy)
                c_s, c_t = certainty[:num_source], certainty[num_source:]
                c_s, c_t = c_s / c_s.mean(), c_t / c_t.mean()
                w_s = c_s if w_s is None else c_s * w_s.to(c_s.dtype)
                w_t = c_t if w_t is None else c_t * w_t.to(c_t.dtype)
        logits_d = _logits_of(self.discriminator, self.grl(mapped))
        loss, self._accuracy = _domain_bce(logits_d, num_source, w_s, w_t)
        return loss

    def extra_repr(self) -> str:
        """The map's configuration, for ``print(module)``."""
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"entropy_conditioning={self.entropy_conditioning}, randomized={self.randomized}"
        )
