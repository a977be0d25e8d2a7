"""Adversarial domain adaptation: gradient reversal, its warm-up, discriminators, DANN/CDAN.

A domain discriminator learns to tell source features from target features; the feature
extractor is trained to fool it. Both are optimised with one backward pass by a gradient
reversal layer (GRL) between them: identity in the forward pass, gradient multiplied by
``-coeff`` in the backward pass (Ganin & Lempitsky, 2015; Ganin et al., JMLR 2016).

* [`grad_reverse`][] / [`GradientReversal`][] -- the reversal itself.
* [`WarmStartSchedule`][] -- the DANN ramp of the reversal coefficient from ``lo`` to
  ``hi``; it reaches ``hi`` exactly at ``max_steps`` and its step is saved by
  ``state_dict`` so resumed runs continue the ramp.
* [`DomainDiscriminator`][] -- an MLP with one output logit (no sigmoid inside).
* [`DomainAdversarialLoss`][] -- DANN: binary cross-entropy of the discriminator on
  reversed features, with optional per-sample weights.
* [`ConditionalDomainAdversarialLoss`][] -- CDAN(+E) (Long et al., NeurIPS 2018): the
  discriminator sees the multilinear map of features and class predictions (randomized
  when large), optionally weighted by prediction certainty.
* [`MarginDisparityDiscrepancy`][] -- MDD (Zhang et al., ICML 2019): an adversarial
  classifier head behind the reversal, trained to disagree with the main classifier on
  the target and agree on the source.

Source samples are domain 1, target samples domain 0. Both losses average each domain's
term separately and take their mean, so unequal batch sizes do not tilt the loss.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._precision import as_compute, no_autocast
from ._validation import (
    check_bool,
    check_features,
    check_module_data,
    check_pair,
    check_positive,
    check_tensor,
)

__all__ = [
    "ConditionalDomainAdversarialLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "MarginDisparityDiscrepancy",
    "WarmStartSchedule",
    "grad_reverse",
]

logger = logging.getLogger(__name__)

#: Above this many multilinear features (``features_dim * num_classes``) CDAN switches to
#: the randomized multilinear map by default, as in Long et al. (2018).
RANDOMIZE_ABOVE = 4096


# --------------------------------------------------------------------------- reversal


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-coeff * grad`` backward."""

    @staticmethod
    def forward(x: Tensor, coeff: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.coeff = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad_output, None


def _check_coeff(coeff: object) -> float:
    return check_positive(coeff, "coeff", strict=False)


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Reverse (and scale) the gradient flowing through ``x``.

    Forward: the identity (a view of ``x``, same dtype and device). Backward: the incoming
    gradient multiplied by ``-coeff``, exactly. Works under autocast, with
    ``torch.compile`` (it is a plain ``torch.autograd.Function``) and supports double
    backward (the reversal is linear).

    Args:
        x: any floating tensor.
        coeff: the non-negative scale of the reversed gradient (``lambda`` in DANN).

    Returns:
        ``x`` unchanged in value.

    Shape:
        Any; the output has the shape of ``x``.

    Raises:
        TypeError: if ``x`` is not a floating tensor or ``coeff`` is not a number.
        ValueError: if ``coeff`` is negative, NaN or infinite.

    Examples:
        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, coeff=0.5).sum().backward()
        >>> x.grad.tolist()
        [-0.5, -0.5, -0.5]
    """
    check_tensor(x, "x", floating=True, finite=False)
    value = _check_coeff(coeff)
    out: Tensor = _GradReverse.apply(x, value)  # type: ignore[no-untyped-call]
    return out


class WarmStartSchedule:
    r"""The DANN ramp of the reversal coefficient, reaching ``hi`` exactly at ``max_steps``.

    $$
    \lambda(p) = lo + (hi - lo) \frac{2 / (1 + e^{-\alpha p}) - 1}
                                      {2 / (1 + e^{-\alpha}) - 1},
    \qquad p = \min(\text{step} / \text{max\_steps}, 1)
    $$

    The numerator is the schedule of Ganin et al. (2016, sec. 5.2.2); dividing by its
    value at ``p = 1`` makes the coefficient equal ``hi`` at ``max_steps`` for any
    ``alpha`` (without it, ``alpha = 1`` would stop at 46% of ``hi``). Past
    ``max_steps`` it stays at ``hi``. It is computed as the equal, overflow-free
    ``tanh(alpha * p / 2) / tanh(alpha / 2)``.

    Call [`step`][] once per training iteration. [`state_dict`][] and
    [`load_state_dict`][] save and restore the step (with the hyper-parameters), so a
    resumed run continues the ramp; a [`GradientReversal`][] that uses the schedule
    stores it in its module ``state_dict`` too.

    Args:
        max_steps: number of steps of the ramp (positive integer).
        alpha: steepness (``gamma = 10`` in the DANN paper).
        lo: coefficient at step 0.
        hi: coefficient from ``max_steps`` on (``hi >= lo``).

    Raises:
        TypeError: for non-numeric arguments.
        ValueError: for non-positive ``max_steps``/``alpha`` or ``hi < lo``.

    Examples:
        >>> schedule = WarmStartSchedule(max_steps=100, alpha=10.0)
        >>> schedule.value
        0.0
        >>> for _ in range(100):
        ...     schedule.step()
        >>> schedule.value, schedule.step_count
        (1.0, 100)
    """

    def __init__(
        self, max_steps: int, alpha: float = 10.0, lo: float = 0.0, hi: float = 1.0
    ) -> None:
        self.max_steps = int(check_positive(max_steps, "max_steps", integer=True))
        self.alpha = check_positive(alpha, "alpha")
        self.lo, self.hi = self._check_bounds(lo, hi)
        self.step_count = 0

    @staticmethod
    def _check_bounds(lo: object, hi: object) -> tuple[float, float]:
        for value, name in ((lo, "lo"), (hi, "hi")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        low, high = float(lo), float(hi)  # type: ignore[arg-type]
        if high < low:
            raise ValueError(f"hi: expected hi >= lo, got lo={low!r}, hi={high!r}")
        return low, high

    @property
    def progress(self) -> float:
        """Training progress ``p = min(step / max_steps, 1)``."""
        return min(self.step_count / self.max_steps, 1.0)

    @property
    def value(self) -> float:
        """The coefficient at the current step."""
        p = self.progress
        if p >= 1.0:
            return self.hi
        ramp = math.tanh(self.alpha * p / 2.0) / math.tanh(self.alpha / 2.0)
        return self.lo + (self.hi - self.lo) * ramp

    def step(self) -> None:
        """Advance the schedule by one training step."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """The current step and hyper-parameters, for checkpoints."""
        return {
            "step": self.step_count,
            "max_steps": self.max_steps,
            "alpha": self.alpha,
            "lo": self.lo,
            "hi": self.hi,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by [`state_dict`][].

        Raises:
            ValueError: if ``state`` lacks the ``"step"`` key or holds invalid values.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("state: expected a dict from WarmStartSchedule.state_dict()")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step']: expected a non-negative integer, got {step!r}")
        max_steps = int(check_positive(state.get("max_steps", self.max_steps), "max_steps"))
        alpha = check_positive(state.get("alpha", self.alpha), "alpha")
        lo, hi = self._check_bounds(state.get("lo", self.lo), state.get("hi", self.hi))
        self.max_steps, self.alpha, self.lo, self.hi = max_steps, alpha, lo, hi
        self.step_count = step

    def __repr__(self) -> str:
        return (
            f"WarmStartSchedule(max_steps={self.max_steps}, alpha={self.alpha:g}, "
            f"lo={self.lo:g}, hi={self.hi:g}, step={self.step_count})"
        )


class GradientReversal(nn.Module):
    """Gradient reversal layer with a fixed coefficient or a [`WarmStartSchedule`][].

    The module's [`coeff`][] reads the schedule's current value at every forward pass;
    advance the schedule with ``grl.schedule.step()`` once per iteration. With a schedule
    the module's ``state_dict`` holds the schedule's state (as extra state), so saving the
    model or the loss that owns this layer also saves the ramp's position.

    Args:
        coeff: a non-negative number or a [`WarmStartSchedule`][].

    Shape:
        Any; the output has the shape of the input.

    Raises:
        TypeError: if ``coeff`` is neither a number nor a schedule.
        ValueError: if ``coeff`` is negative or not finite.

    Examples:
        >>> grl = GradientReversal(WarmStartSchedule(max_steps=10))
        >>> grl.coeff
        0.0
        >>> grl.schedule.step()
        >>> round(grl.coeff, 4)
        0.4621
        >>> x = torch.ones(2, requires_grad=True)
        >>> GradientReversal(2.0)(x).sum().backward()
        >>> x.grad.tolist()
        [-2.0, -2.0]
    """

    def __init__(self, coeff: float | WarmStartSchedule = 1.0) -> None:
        super().__init__()
        self.schedule: WarmStartSchedule | None
        if isinstance(coeff, WarmStartSchedule):
            self.schedule = coeff
            self._coeff = coeff.value
        else:
            if isinstance(coeff, bool) or not isinstance(coeff, (int, float)):
                raise TypeError(
                    f"coeff: expected a number or a WarmStartSchedule, got {type(coeff).__name__}"
                )
            self.schedule = None
            self._coeff = _check_coeff(coeff)

    @property
    def coeff(self) -> float:
        """The current reversal coefficient (the schedule's value when there is one)."""
        return self.schedule.value if self.schedule is not None else self._coeff

    def forward(self, x: Tensor) -> Tensor:
        """Identity forward; ``-coeff * grad`` backward."""
        return grad_reverse(x, self.coeff)

    def get_extra_state(self) -> dict[str, Any]:
        """Schedule state (or the fixed coefficient) for the module's ``state_dict``."""
        if self.schedule is not None:
            return {"schedule": self.schedule.state_dict()}
        return {"coeff": self._coeff}

    def set_extra_state(self, state: Any) -> None:
        """Restore what [`get_extra_state`][] saved."""
        if not isinstance(state, dict):
            raise ValueError("state: expected a dict saved by GradientReversal")
        if "schedule" in state:
            if self.schedule is None:
                raise ValueError(
                    "state: the checkpoint has a WarmStartSchedule but this GradientReversal "
                    "has a fixed coefficient; construct it with a schedule"
                )
            self.schedule.load_state_dict(state["schedule"])
        elif "coeff" in state:
            if self.schedule is not None:
                raise ValueError(
                    "state: the checkpoint has a fixed coefficient but this GradientReversal "
                    "uses a WarmStartSchedule"
                )
            self._coeff = _check_coeff(state["coeff"])
        else:
            raise ValueError("state: expected a 'schedule' or 'coeff' entry")

    def extra_repr(self) -> str:
        """The coefficient or schedule, for ``print(module)``."""
        return repr(self.schedule) if self.schedule is not None else f"coeff={self._coeff:g}"


# --------------------------------------------------------------------------- discriminator


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
        """Domain logits, ``(N,)``."""
        out: Tensor = self.layers(x)
        return out.squeeze(-1)


# --------------------------------------------------------------------------- losses


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
    # Features may come in any floating dtype (fp16/bf16 from autocast or a half model,
    # fp64 in tests): the discriminator gets them in its own parameters' dtype, and the
    # cast sends gradients back in the features' dtype.
    check_module_data(discriminator, "discriminator")
    param = next((p for p in discriminator.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype != inputs.dtype:
        inputs = inputs.to(param.dtype)
    logits = discriminator(inputs)
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


def _check_grl(grl: object) -> None:
    if grl is not None and not isinstance(grl, GradientReversal):
        raise TypeError(
            f"grl: expected a GradientReversal or None, got {type(grl).__name__}; "
            "wrap a schedule as GradientReversal(WarmStartSchedule(...))"
        )


class _AdversarialLossBase(nn.Module):
    def __init__(self, discriminator: nn.Module, grl: GradientReversal | None) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(
                f"discriminator: expected an nn.Module, got {type(discriminator).__name__}"
            )
        _check_grl(grl)
        self.discriminator = discriminator
        self.grl = grl if grl is not None else GradientReversal(1.0)
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
        features_dim: ``F``; required for the randomized map, checked against input.
        entropy_conditioning: CDAN+E entropy weighting.
        randomized: use the randomized map; ``None`` chooses it when ``num_classes`` and
            ``features_dim`` are given and ``F * C > 4096``.
        randomized_dim: ``d``, output size of the randomized map.
        grl: the reversal layer; default ``GradientReversal(1.0)``.
        seed: seed of the random matrices (``None`` uses torch's global generator).

    Call arguments:
        source_logits, source_features, target_logits, target_features (in that order:
        ``criterion(g_s, f_s, g_t, f_t)``), plus optional keyword ``source_weights`` /
        ``target_weights`` multiplied into the (entropy) weights.

    Shape:
        - ``source_logits``: ``(N_s, C)``, ``source_features``: ``(N_s, F)``.
        - ``target_logits``: ``(N_t, C)``, ``target_features``: ``(N_t, F)``.
        - Output: scalar, fp32 (also under autocast).

    Raises:
        TypeError: for non-tensor, non-floating or mismatched-dtype input.
        ValueError: for wrong ranks, sizes or devices, non-finite values, or
            ``randomized=True`` without ``num_classes`` and ``features_dim``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> disc = DomainDiscriminator(10 * 4, hidden=32)
        >>> criterion = ConditionalDomainAdversarialLoss(
        ...     disc, num_classes=4, features_dim=10, entropy_conditioning=True)
        >>> loss = criterion(torch.randn(8, 4), torch.randn(8, 10),
        ...                  torch.randn(5, 4), torch.randn(5, 10))
        >>> loss.shape, criterion.randomized
        (torch.Size([]), False)
        >>> big = ConditionalDomainAdversarialLoss(
        ...     DomainDiscriminator(1024, hidden=32), num_classes=10, features_dim=512)
        >>> big.randomized, big.random_features.shape
        (True, torch.Size([512, 1024]))
    """

    random_features: Tensor | None
    random_classes: Tensor | None

    def __init__(
        self,
        discriminator: nn.Module,
        num_classes: int | None = None,
        features_dim: int | None = None,
        *,
        entropy_conditioning: bool = False,
        randomized: bool | None = None,
        randomized_dim: int = 1024,
        grl: GradientReversal | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(discriminator, grl)
        self.num_classes = (
            None
            if num_classes is None
            else int(check_positive(num_classes, "num_classes", integer=True))
        )
        self.features_dim = (
            None
            if features_dim is None
            else int(check_positive(features_dim, "features_dim", integer=True))
        )
        check_bool(entropy_conditioning, "entropy_conditioning")
        check_bool(randomized, "randomized", optional=True)
        self.entropy_conditioning = entropy_conditioning
        self.randomized_dim = int(check_positive(randomized_dim, "randomized_dim", integer=True))
        known = self.num_classes is not None and self.features_dim is not None
        if randomized is None:
            randomized = known and self.num_classes * self.features_dim > RANDOMIZE_ABOVE  # type: ignore[operator]
        if randomized and not known:
            raise ValueError(
                "randomized: the randomized multilinear map needs num_classes and "
                "features_dim to draw its random matrices; pass both"
            )
        self.randomized = bool(randomized)
        if self.randomized:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            shape_f = (self.features_dim, self.randomized_dim)
            shape_g = (self.num_classes, self.randomized_dim)
            self.register_buffer("random_features", torch.randn(shape_f, generator=generator))  # type: ignore[arg-type]
            self.register_buffer("random_classes", torch.randn(shape_g, generator=generator))  # type: ignore[arg-type]
        else:
            self.random_features = None
            self.random_classes = None

    def _check_inputs(self, logits: Tensor, features: Tensor, prefix: str) -> None:
        check_features(logits, f"{prefix}_logits")
        check_features(features, f"{prefix}_features")
        if logits.shape[0] != features.shape[0]:
            raise ValueError(
                f"{prefix}_logits and {prefix}_features: expected the same number of samples, "
                f"got {logits.shape[0]} and {features.shape[0]}"
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{prefix}_logits: expected {self.num_classes} classes, got {logits.shape[1]}"
            )
        if self.features_dim is not None and features.shape[1] != self.features_dim:
            raise ValueError(
                f"{prefix}_features: expected {self.features_dim} features, got {features.shape[1]}"
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
        if source_logits.device != source_features.device:
            raise ValueError(
                "source_logits and source_features: expected tensors on the same device, "
                f"got {source_logits.device} and {source_features.device}"
            )
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
            f"num_classes={self.num_classes}, features_dim={self.features_dim}, "
            f"entropy_conditioning={self.entropy_conditioning}, randomized={self.randomized}"
        )


# --------------------------------------------------------------------------- MDD


class MarginDisparityDiscrepancy(nn.Module):
    r"""Margin disparity discrepancy (MDD, Zhang et al., ICML 2019) with its adversarial head.

    The module owns an auxiliary classifier ``f'`` (the adversarial head) that sees the
    features through gradient reversal ``R``. With ``y = argmax`` of the main
    classifier's logits (no gradient), ``p' = softmax(f'(R(f)))`` and margin factor
    ``gamma``, it returns

    $$
    \mathcal{L}_{mdd} = \gamma\,\frac{1}{n_s}\sum_{i} -\log p'_{i, y_i}
        \;+\; \frac{1}{n_t}\sum_{j} -\log\big(1 - p'_{j, y_j}\big)
    $$

    (source terms over source samples, target terms over target samples). Minimising
    it trains the adversarial head to agree with the main classifier on the source and
    to disagree with it on the target, i.e. to maximise the disparity discrepancy
    $D = \mathbb{E}_t[\log(1 - p')] + \gamma\,\mathbb{E}_s[\log p'] = -\mathcal{L}$;
    the reversed gradient trains the feature extractor to minimise it. ``gamma > 1``
    (4 in the paper and TLlib) is the margin: it weights source agreement more.

    The target term is the shifted log-loss $-\log(1 - p' + \epsilon)$ (clamped
    at 0) with ``offset`` $\epsilon$ = 1e-6, as in TLlib. ``1 - p'`` itself is
    computed exactly (``logsumexp`` over the other classes minus ``logsumexp`` over
    all). The offset is not only numerical: it caps the target term at
    $-\log \epsilon \approx 13.8$ and flattens its gradient once the adversary
    agrees with the main classifier almost surely, which keeps the feature extractor
    (which maximises this term through the reversal) from pushing without bound;
    ``offset=0`` gives the exact $-\log(1 - p')$.

    How to use it in a training loop:

    ```python
    features_s, features_t = backbone(x_s), backbone(x_t)   # e.g. bottleneck features
    logits_s, logits_t = head(features_s), head(features_t)
    loss = F.cross_entropy(logits_s, y_s) + trade_off * mdd(
        logits_s, features_s, logits_t, features_t)
    loss.backward()
    ```

    * ``features_*`` are the inputs of the main classifier ``head`` (the adversarial
      head must accept them); ``logits_*`` are ``head``'s outputs (only their argmax is
      used, so the main head gets no gradient from this term).
    * The optimizer must hold ``mdd.parameters()`` (the adversarial head) together with
      the network's parameters; the adversarial head learns at the same rate.
    * The reversal coefficient scales the gradient reaching the features. The default
      is a fixed ``0.1`` (the value TLlib ramps to); for TLlib's ramp pass
      ``grl=GradientReversal(WarmStartSchedule(max_steps, alpha=1.0, hi=0.1))`` and call
      ``mdd.grl.schedule.step()`` once per iteration.
    * Give the adversarial head at least one hidden layer (TLlib uses the main head's
      2-layer architecture), e.g. ``ClassifierHead(D, C, hidden=(256,), pool=None)``.
      With a single linear adversary on the 8x8-digits tests, the features collapsed
      (source accuracy fell to chance, ``target_disagreement`` stuck at 1.0). Use
      normalised (BatchNorm) bottleneck features, and start from a network that
      already classifies the source (pretrained, or a source-only warm-up).

    Args:
        adversarial_head: a module mapping ``(N, D)`` features to ``(N, C)`` logits,
            e.g. a fresh [`ClassifierHead`][transferkit.heads.ClassifierHead] with a
            hidden layer (see above).
        margin: the margin factor ``gamma > 0`` (4.0 in the paper).
        offset: the shift $\epsilon \in [0, 1)$ of the target log-loss.
        grl: the reversal layer; default ``GradientReversal(0.1)``.

    Call arguments:
        source_logits, source_features, target_logits, target_features (the order of
        [`ConditionalDomainAdversarialLoss`][]).

    Shape:
        - ``source_logits``: ``(N_s, C)``, ``source_features``: ``(N_s, D)``.
        - ``target_logits``: ``(N_t, C)``, ``target_features``: ``(N_t, D)``.
        - Output: scalar, fp32 (also under autocast), ``>= 0``.

    Raises:
        TypeError: for non-tensor, non-floating or mismatched-dtype input, a head that is
            not an ``nn.Module`` or a non-numeric margin.
        ValueError: for wrong ranks, sizes or devices, fewer than 2 classes, non-finite
            values, a non-positive margin, or a head whose output is not ``(N, C)``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> mdd = MarginDisparityDiscrepancy(head, margin=4.0)
        >>> loss = mdd(torch.randn(8, 4), torch.randn(8, 16), torch.randn(6, 4),
        ...            torch.randn(6, 16))
        >>> loss.shape, bool(loss > 0), mdd.grl.coeff
        (torch.Size([]), True, 0.1)
    """

    def __init__(
        self,
        adversarial_head: nn.Module,
        *,
        margin: float = 4.0,
        offset: float = 1e-6,
        grl: GradientReversal | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(adversarial_head, nn.Module):
            raise TypeError(
                f"adversarial_head: expected an nn.Module, got {type(adversarial_head).__name__}"
            )
        _check_grl(grl)
        self.adversarial_head = adversarial_head
        self.margin = check_positive(margin, "margin")
        self.offset = check_positive(offset, "offset", strict=False)
        if self.offset >= 1.0:
            raise ValueError(f"offset: expected a value in [0, 1), got {offset!r}")
        self.grl = grl if grl is not None else GradientReversal(0.1)
        self._disagreement: Tensor | None = None

    @property
    def target_disagreement(self) -> float:
        """Target samples where the heads' argmax differ, last call (NaN before any).

        The fraction of the target batch on which the adversarial head disagrees with
        the main classifier; it rises as the head learns the discrepancy.
        """
        return math.nan if self._disagreement is None else float(self._disagreement)

    def _check_inputs(self, logits: Tensor, features: Tensor, prefix: str) -> None:
        check_features(logits, f"{prefix}_logits")
        check_features(features, f"{prefix}_features")
        if logits.shape[1] < 2:
            raise ValueError(
                f"{prefix}_logits: expected logits over at least 2 classes, got shape "
                f"{tuple(logits.shape)}"
            )
        if logits.shape[0] != features.shape[0]:
            raise ValueError(
                f"{prefix}_logits and {prefix}_features: expected the same number of samples, "
                f"got {logits.shape[0]} and {features.shape[0]}"
            )
        if logits.device != features.device:
            raise ValueError(
                f"{prefix}_logits and {prefix}_features: expected tensors on the same device, "
                f"got {logits.device} and {features.device}"
            )

    def forward(
        self,
        source_logits: Tensor,
        source_features: Tensor,
        target_logits: Tensor,
        target_features: Tensor,
    ) -> Tensor:
        """The MDD loss term (to minimise) of one source and one target batch."""
        self._check_inputs(source_logits, source_features, "source")
        self._check_inputs(target_logits, target_features, "target")
        check_pair(source_features, target_features, ("source_features", "target_features"))
        check_pair(source_logits, target_logits, ("source_logits", "target_logits"))
        num_source, classes = source_logits.shape
        features = self.grl(torch.cat([source_features, target_features], dim=0))
        # As for the discriminators: the head gets the features in its parameters' dtype
        # (fp16/bf16/fp64 features, fp32 head); the cast sends gradients back unchanged.
        check_module_data(self.adversarial_head, "adversarial_head")
        param = next((p for p in self.adversarial_head.parameters() if p.is_floating_point()), None)
        if param is not None and param.dtype != features.dtype:
            features = features.to(param.dtype)
        adversarial = self.adversarial_head(features)
        expected = (features.shape[0], classes)
        if not isinstance(adversarial, Tensor) or tuple(adversarial.shape) != expected:
            got = (
                tuple(adversarial.shape)
                if isinstance(adversarial, Tensor)
                else type(adversarial).__name__
            )
            raise ValueError(
                f"adversarial_head: expected logits of shape {expected} (one row per sample, "
                f"one column per class of the main classifier), got {got}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(adversarial).all()):
            raise ValueError(
                "adversarial_head: produced non-finite logits (NaN/inf); the features or "
                "the head's weights are too large for its dtype"
            )
        with no_autocast(features.device):
            adversarial = as_compute(adversarial)
            labels = torch.cat([source_logits, target_logits], dim=0).detach().argmax(dim=1)
            log_p = adversarial.log_softmax(dim=1)
            source_term = F.nll_loss(log_p[:num_source], labels[:num_source])
            target_adv, target_labels = adversarial[num_source:], labels[num_source:]
            chosen = F.one_hot(target_labels, classes).bool()
            # log(1 - p_y) = logsumexp over the other classes - logsumexp over all: exact,
            # no cancellation in 1 - p_y when p_y is close to 1.
            log_rest = torch.logsumexp(target_adv.masked_fill(chosen, -math.inf), dim=1)
            log_not_y = log_rest - torch.logsumexp(target_adv, dim=1)
            if self.offset > 0:
                log_not_y = torch.log((log_not_y.exp() + self.offset).clamp(max=1.0))
            loss = self.margin * source_term - log_not_y.mean()
            with torch.no_grad():
                self._disagreement = (target_adv.argmax(dim=1) != target_labels).float().mean()
        return loss

    def extra_repr(self) -> str:
        """The margin and offset, for ``print(module)``."""
        return f"margin={self.margin:g}, offset={self.offset:g}"
