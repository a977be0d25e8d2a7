"""Self-training on unlabelled target data: pseudo-labels and FixMatch-style consistency.

A network's own confident predictions on target data become training labels. Used
naively this reinforces the network's errors and drifts towards the classes it already
predicts most; the pieces here carry the usual remedies and slot into your own loop:

* [`PseudoLabeler`][] -- turns logits into pseudo-labels with a confidence mask:
  a threshold, class balancing (per-class thresholds or distribution alignment) and a
  ramp-up of the loss weight, so that early, poor predictions count little.
* [`FixMatchLoss`][] -- FixMatch (Sohn et al., 2020): pseudo-labels come from a
  weakly augmented view, the loss is the cross-entropy of the strongly augmented view
  against them, counted only where the weak prediction is confident. The augmentations
  are callables you supply ([`transferkit.augment`][] has batched ones for images).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_in_range, check_option, check_positive, check_tensor
from .batchnorm import _domain_layers

__all__ = ["FixMatchLoss", "PseudoLabeler", "PseudoLabels"]

logger = logging.getLogger(__name__)

Balance = Literal["none", "class_threshold", "distribution"]
Ramp = Literal["sigmoid", "linear", "dann"]


@dataclasses.dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labels of one batch.

    Attributes:
        labels: ``(N,)`` int64 predicted classes.
        mask: ``(N,)`` bool, ``True`` where the prediction passes its class's threshold.
        confidence: ``(N,)`` float32 probability of the predicted class (after
            distribution alignment, when used).
    """

    labels: Tensor
    mask: Tensor
    confidence: Tensor

    @property
    def fraction(self) -> float:
        """Fraction of the batch whose pseudo-label is used."""
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


def ramp_value(progress: float, kind: Ramp = "sigmoid") -> float:
    """A ramp-up from 0 to 1 over ``progress`` in ``[0, 1]`` (1 afterwards).

    * ``"sigmoid"``: ``exp(-5 (1 - p)^2)`` (Laine & Aila, 2017; starts at 0.0067);
    * ``"linear"``: ``p``;
    * ``"dann"``: ``2 / (1 + exp(-10 p)) - 1`` (Ganin & Lempitsky, 2015).

    Examples:
        >>> ramp_value(0.0, "linear"), ramp_value(0.5, "linear"), ramp_value(2.0, "sigmoid")
        (0.0, 0.5, 1.0)
    """
    check_option(kind, "ramp", ("sigmoid", "linear", "dann"))
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress: expected a number, got {type(progress).__name__}")
    p = min(max(float(progress), 0.0), 1.0)
    if p >= 1.0:
        return 1.0
    if kind == "sigmoid":
        return math.exp(-5.0 * (1.0 - p) ** 2)
    if kind == "linear":
        return p
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


class PseudoLabeler:
    """Confidence-thresholded, class-balanced pseudo-labels with a ramped loss weight.

    Call it on a batch of target logits to get [`PseudoLabels`][]; pass those with
    the logits you train on to [`loss`][]; call [`step`][] once per training step.

    Selection: with probabilities ``p = softmax(logits)``, the pseudo-label is
    ``argmax p`` and it is used when ``max p >= tau_c`` for its class ``c``.

    Class balancing (``balance``), both driven by ``m``, an exponential moving average
    (rate ``1 - momentum``) of the batch-mean probability vector, updated by every call
    with ``update=True``:

    * ``"none"``: ``tau_c = threshold`` for every class.
    * ``"class_threshold"``: ``tau_c = threshold * m_c / max_k m_k`` (FreeMatch's
      self-adaptive class thresholds, Wang et al., 2023): classes the network rarely
      predicts get lower thresholds, so they are not starved of pseudo-labels.
    * ``"distribution"``: distribution alignment (ReMixMatch, Berthelot et al., 2020):
      ``p`` is replaced by ``normalise(p * prior / m)`` before thresholding, pulling the
      predicted class frequencies towards ``prior`` (uniform unless given). A sample
      whose probability is all on classes of prior 0 gets confidence 0 (never used).

    Weight: [`weight`][] is ``0`` for the first ``warmup_steps`` steps, then
    ``max_weight * ramp_value((step - warmup_steps) / rampup_steps, ramp)``
    (``max_weight`` at once when ``rampup_steps == 0``). A warm-up lets the network
    learn from the labelled source first: pseudo-labels of a network trained from
    scratch are mostly wrong, and training on them reinforces the errors (measured on
    MNIST -> digits in the adaptation results page).

    Args:
        num_classes: number of classes ``C``.
        threshold: confidence threshold ``tau`` in ``[0, 1]`` (FixMatch: 0.95).
        balance: ``"none"``, ``"class_threshold"`` or ``"distribution"``.
        prior: ``(C,)`` target class frequencies for ``"distribution"`` (default
            uniform); normalised to sum to 1.
        momentum: EMA momentum of the class statistics, in ``[0, 1)``.
        max_weight: loss weight after the ramp (``>= 0``).
        rampup_steps: steps of the ramp after the warm-up (``0``: no ramp).
        warmup_steps: steps at the start with weight 0 (``0``: none).
        ramp: ``"sigmoid"``, ``"linear"`` or ``"dann"`` (see [`ramp_value`][]).

    Attributes:
        steps: training steps taken (by [`step`][]).
        class_mean: ``(C,)`` the moving average ``m`` (starts uniform).

    Examples:
        >>> import torch
        >>> labeler = PseudoLabeler(3, threshold=0.9)
        >>> logits = torch.tensor([[5.0, 0.0, 0.0], [0.2, 0.0, 0.1]])
        >>> pseudo = labeler(logits)
        >>> pseudo.labels.tolist(), pseudo.mask.tolist()
        ([0, 0], [True, False])
        >>> float(labeler.loss(logits, pseudo)) > 0
        True
    """

    def __init__(
        self,
        num_classes: int,
        *,
        threshold: float = 0.95,
        balance: Balance = "none",
        prior: Tensor | None = None,
        momentum: float = 0.999,
        max_weight: float = 1.0,
        rampup_steps: int = 0,
        ramp: Ramp = "sigmoid",
        warmup_steps: int = 0,
    ) -> None:
        self.num_classes = int(check_positive(num_classes, "num_classes", integer=True))
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 classes, got {num_classes}")
        self.threshold = check_in_range(threshold, "threshold", 0.0, 1.0)
        self.balance: Balance = check_option(
            balance, "balance", ("none", "class_threshold", "distribution")
        )
        self.momentum = check_in_range(momentum, "momentum", 0.0, 1.0)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1), got {momentum!r}")
        self.max_weight = check_positive(max_weight, "max_weight", strict=False)
        self.rampup_steps = int(
            check_positive(rampup_steps, "rampup_steps", strict=False, integer=True)
        )
        self.warmup_steps = int(
            check_positive(warmup_steps, "warmup_steps", strict=False, integer=True)
        )
        self.ramp: Ramp = check_option(ramp, "ramp", ("sigmoid", "linear", "dann"))
        if prior is None:
            self.prior = torch.full((self.num_classes,), 1.0 / self.num_classes)
        else:
            values = check_tensor(prior, "prior", ndim=1, floating=True)
            if (
                values.shape[0] != self.num_classes
                or bool((values < 0).any())
                or float(values.sum()) <= 0
            ):
                raise ValueError(
                    f"prior: expected {self.num_classes} non-negative frequencies with a positive "
                    f"sum, got {values.tolist()}"
                )
            self.prior = (values / values.sum()).detach().float().cpu()
        self._class_sum = torch.zeros(self.num_classes)
        self.updates = 0
        self.steps = 0

    @property
    def class_mean(self) -> Tensor:
        """``(C,)`` the bias-corrected moving average ``m`` of the batch-mean probabilities.

        Uniform before the first update; afterwards ``s / (1 - momentum ** t)`` with
        ``s`` the moving average started at zero and ``t`` the number of updates (the
        bias correction of Adam, Kingma & Ba, 2015), so that ``m`` is an average of the
        batches seen from the first update on. Without the correction, an average started
        at the uniform vector with ``momentum = 0.999`` moves only 14% of the way to the
        predicted class frequencies in 150 updates, and balancing is nearly off in a
        short run.
        """
        if self.updates == 0:
            return torch.full((self.num_classes,), 1.0 / self.num_classes)
        return self._class_sum / (1.0 - self.momentum**self.updates)

    @property
    def weight(self) -> float:
        """The current loss weight: 0 in the warm-up, then the ramp times ``max_weight``."""
        if self.steps < self.warmup_steps:
            return 0.0
        if self.rampup_steps == 0:
            return self.max_weight
        progress = (self.steps - self.warmup_steps) / self.rampup_steps
        return self.max_weight * ramp_value(progress, self.ramp)

    @property
    def thresholds(self) -> Tensor:
        """``(C,)`` the current per-class thresholds ``tau_c``."""
        if self.balance == "class_threshold":
            return self.threshold * self.class_mean / self.class_mean.max()
        return torch.full((self.num_classes,), self.threshold)

    def step(self) -> None:
        """Advance the ramp by one training step."""
        self.steps += 1

    def _check_logits(self, logits: object, name: str) -> Tensor:
        values = check_tensor(logits, name, ndim=2, floating=True, min_samples=1)
        if values.shape[1] != self.num_classes:
            raise ValueError(
                f"{name}: expected {self.num_classes} classes (columns), got shape "
                f"{tuple(values.shape)}"
            )
        return values

    @torch.no_grad()
    def __call__(self, logits: Tensor, *, update: bool = True) -> PseudoLabels:
        """Pseudo-labels of a batch of (weak-view) target logits; no gradient flows.

        Args:
            logits: ``(N, C)`` target logits.
            update: update the class statistics with this batch (``False`` for
                evaluation batches).

        Returns:
            [`PseudoLabels`][] on the logits' device.

        Shape:
            - Input: ``(N, C)``; outputs: ``(N,)``.
        """
        values = self._check_logits(logits, "logits")
        if not isinstance(update, bool):
            raise TypeError(f"update: expected a bool, got {type(update).__name__}")
        probs = values.detach().float().softmax(dim=1)
        if update and self.balance != "none":
            batch_mean = probs.mean(dim=0).cpu()
            self._class_sum = self.momentum * self._class_sum + (1 - self.momentum) * batch_mean
            self.updates += 1
        if self.balance == "distribution":
            aligned = probs * (self.prior / self.class_mean.clamp_min(1e-12)).to(probs.device)
            total = aligned.sum(dim=1, keepdim=True)
            # all of a sample's mass on classes whose prior is 0: not confident (not 0/0)
            aligned = aligned / torch.where(total > 0, total, 1.0)
            confidence, labels = aligned.max(dim=1)
            labels = torch.where(total[:, 0] > 0, labels, probs.argmax(dim=1))
        else:
            confidence, labels = probs.max(dim=1)
        mask = (confidence >= self.thresholds.to(probs.device)[labels]) & (confidence > 0)
        return PseudoLabels(labels=labels, mask=mask, confidence=confidence)

    def loss(self, logits: Tensor, pseudo: PseudoLabels) -> Tensor:
        """``weight * mean_i(mask_i * CE(logits_i, label_i))``, averaged over the batch.

        The mean runs over *all* ``N`` samples (as in FixMatch), so the loss grows as
        more pseudo-labels pass the threshold. Computed in float32 (also under autocast).

        Args:
            logits: ``(N, C)`` logits to train (e.g. of the strong view).
            pseudo: the pseudo-labels of the same ``N`` samples.

        Returns:
            A scalar tensor.
        """
        values = self._check_logits(logits, "logits")
        if not isinstance(pseudo, PseudoLabels):
            raise TypeError(f"pseudo: expected PseudoLabels, got {type(pseudo).__name__}")
        if pseudo.labels.shape[0] != values.shape[0]:
            raise ValueError(
                f"pseudo: expected labels for {values.shape[0]} samples, "
                f"got {pseudo.labels.shape[0]}"
            )
        with torch.autocast(values.device.type, enabled=False):
            per_sample = F.cross_entropy(
                values.float(), pseudo.labels.to(values.device), reduction="none"
            )
            masked = per_sample * pseudo.mask.to(values.device, per_sample.dtype)
            return self.weight * masked.mean()

    def state_dict(self) -> dict[str, Any]:
        """The step and the class statistics (to resume a run).

        ``class_mean`` is the bias-corrected average (for reading); ``class_sum``, the
        uncorrected one, restores the statistics bit for bit.
        """
        return {
            "steps": self.steps,
            "class_mean": self.class_mean.clone(),
            "class_sum": self._class_sum.clone(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what [`state_dict`][] returned."""
        class_mean = self._check_statistics(state["class_mean"], "class_mean")
        self.steps = int(check_positive(state["steps"], "steps", strict=False, integer=True))
        # states saved before the bias correction hold a converged average: no correction
        updates = state.get("updates", 10**9)
        self.updates = int(check_positive(updates, "updates", strict=False, integer=True))
        if "class_sum" in state:
            class_sum = self._check_statistics(state["class_sum"], "class_sum")
        elif self.updates == 0:  # nothing averaged yet: the sum starts at zero
            class_sum = torch.zeros(self.num_classes)
        else:
            class_sum = class_mean * (1.0 - self.momentum**self.updates)
        self._class_sum = class_sum

    def _check_statistics(self, values: object, name: str) -> Tensor:
        checked = check_tensor(values, name, ndim=1, floating=True)
        if checked.shape[0] != self.num_classes:
            raise ValueError(f"{name}: expected {self.num_classes} values, got {checked.shape[0]}")
        return checked.detach().float().cpu().clone()

    def __repr__(self) -> str:
        return (
            f"PseudoLabeler(num_classes={self.num_classes}, threshold={self.threshold}, "
            f"balance={self.balance!r}, max_weight={self.max_weight}, "
            f"rampup_steps={self.rampup_steps}, ramp={self.ramp!r}, "
            f"warmup_steps={self.warmup_steps})"
        )


class FixMatchLoss:
    """FixMatch-style consistency on unlabelled target images (Sohn et al., 2020).

    ``loss = fixmatch(model, x)`` runs ``model`` on ``weak(x)`` without gradients,
    turns its logits into pseudo-labels with ``labeler`` and returns
    ``labeler.loss(model(strong(x)), pseudo)``: the cross-entropy of the strong view
    against confident weak-view predictions, times the labeler's ramped weight. Call
    ``labeler.step()`` (or [`step`][]) once per training step. With ``teacher=`` (e.g.
    a [`transferkit.ModelEMA`][] of the model: a mean teacher) the weak view goes
    through the teacher instead. Each forward pass runs in its network's current mode:
    in training mode it uses target batch statistics (and, with
    [`transferkit.bn_domain`][], updates the target's running statistics). While the
    labeler's weight is 0 (its warm-up) neither pass runs: the loss is a zero that
    needs no gradient and ``last`` is ``None``.

    Args:
        labeler: the [`PseudoLabeler`][] (threshold, balancing, ramp).
        weak: callable ``x -> x'`` for the weak view (e.g. ``tk.augment.weak``).
        strong: callable ``x -> x''`` for the strong view (e.g. ``tk.augment.strong``).

    Attributes:
        last: the [`PseudoLabels`][] of the last call (``None`` before).

    Examples:
        >>> import torch, transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=10)
        >>> fixmatch = tk.FixMatchLoss(
        ...     tk.PseudoLabeler(10, threshold=0.0), weak=tk.augment.weak, strong=tk.augment.strong
        ... )
        >>> loss = fixmatch(net, torch.rand(8, 1, 28, 28))
        >>> loss.backward()
        >>> fixmatch.last.fraction
        1.0
    """

    def __init__(
        self,
        labeler: PseudoLabeler,
        *,
        weak: Callable[[Tensor], Tensor],
        strong: Callable[[Tensor], Tensor],
    ) -> None:
        if not isinstance(labeler, PseudoLabeler):
            raise TypeError(f"labeler: expected a PseudoLabeler, got {type(labeler).__name__}")
        for fn, name in ((weak, "weak"), (strong, "strong")):
            if not callable(fn):
                raise TypeError(
                    f"{name}: expected a callable x -> augmented x, got {type(fn).__name__}"
                )
        self.labeler = labeler
        self.weak = weak
        self.strong = strong
        self.last: PseudoLabels | None = None

    def __call__(
        self,
        model: Callable[[Tensor], Tensor],
        x: Tensor,
        *,
        teacher: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The consistency loss of ``model`` on the unlabelled batch ``x``.

        Args:
            model: a callable from inputs to ``(N, C)`` logits (a network, or e.g.
                ``lambda x: head(backbone(x))``).
            x: ``(N, ...)`` unlabelled target inputs (not modified).
            teacher: the callable whose weak-view logits give the pseudo-labels
                (default: ``model``). Pass a [`transferkit.ModelEMA`][] of the model
                for a mean teacher: its pseudo-labels follow an average of the recent
                weights instead of the last update, so a few bad steps do not feed
                their own errors back. Under domain-specific BatchNorm the teacher must
                run in the model's domain (``tk.bn_domain(ema, "target")`` next to
                ``tk.bn_domain(model, "target")``).

        Returns:
            A scalar tensor (differentiable through the strong view).

        Raises:
            ValueError: ``model`` and ``teacher`` both have domain-specific BatchNorm
                layers, and their active domains differ (in eval mode the teacher would
                label target data with source statistics).
        """
        if not callable(model):
            raise TypeError(f"model: expected a callable, got {type(model).__name__}")
        if teacher is not None and not callable(teacher):
            raise TypeError(f"teacher: expected a callable or None, got {type(teacher).__name__}")
        check_tensor(x, "x", min_samples=1)
        if teacher is not None:
            _check_same_bn_domain(model, teacher)
        if self.labeler.weight == 0.0:
            self.last = None
            return x.new_zeros((), dtype=torch.float32)
        with torch.no_grad():
            weak_view = self.weak(x)
            weak_logits = (model if teacher is None else teacher)(weak_view)
        pseudo = self.labeler(weak_logits)
        strong_logits = model(self.strong(x))
        self.last = pseudo
        return self.labeler.loss(strong_logits, pseudo)

    def step(self) -> None:
        """Advance the labeler's ramp by one training step."""
        self.labeler.step()

    def __repr__(self) -> str:
        return f"FixMatchLoss({self.labeler!r}, weak={self.weak!r}, strong={self.strong!r})"


def _check_same_bn_domain(model: object, teacher: object) -> None:
    """Refuse a teacher whose domain-specific BatchNorm runs in another domain."""
    if not isinstance(model, torch.nn.Module) or not isinstance(teacher, torch.nn.Module):
        return
    ours = {layer.domain for layer in _domain_layers(model)}
    layers = _domain_layers(teacher)
    if len(ours) != 1 or not layers:
        return
    (domain,) = ours
    if not all(domain in layer.domains for layer in layers):
        return  # a teacher with other domain names: not ours to judge
    theirs = sorted({layer.domain for layer in layers})
    if theirs != [domain]:
        raise ValueError(
            f"teacher: its domain-specific BatchNorm is in domain {', '.join(theirs)}, the "
            f"model's in {domain}; run both in the same one: tk.bn_domain(model, "
            f'"{domain}") and tk.bn_domain(teacher, "{domain}")'
        )
