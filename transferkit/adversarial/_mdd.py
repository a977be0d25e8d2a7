"""MDD: margin disparity discrepancy with its adversarial classifier head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._precision import as_compute, no_autocast
from .._validation import check_pair, check_positive
from ._adversary import (
    adversary_and_grl,
    check_predictions,
    run_adversary,
)
from ._reversal import GradientReversal


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
        self.adversarial_head, self.grl = adversary_and_grl(
            adversarial_head, "adversarial_head", grl, 0.1
        )
        self.margin = check_positive(margin, "margin")
        self.offset = check_positive(offset, "offset", strict=False)
        if self.offset >= 1.0:
            raise ValueError(f"offset: expected a value in [0, 1), got {offset!r}")
        self._disagreement: Tensor | None = None

    @property
    def target_disagreement(self) -> float:
        """Target samples where the heads' argmax differ, last call (NaN before any).

        The fraction of the target batch on which the adversarial head disagrees with
        the main classifier; it rises as the head learns the discrepancy.
        """
        return math.nan if self._disagreement is None else float(self._disagreement)

    def _check_inputs(self, logits: Tensor, features: Tensor, prefix: str) -> None:
        check_predictions(logits, features, prefix)
        if logits.shape[1] < 2:
            raise ValueError(
                f"{prefix}_logits: expected logits over at least 2 classes, got shape "
                f"{tuple(logits.shape)}"
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
        adversarial = run_adversary(self.adversarial_head, "adversarial_head", features)
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
