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

# The doctests of the public objects below run in this namespace.
import torch  # noqa: F401
from torch import nn  # noqa: F401

from .._public import publish
from ._discriminator import DomainDiscriminator
from ._domain_losses import RANDOMIZE_ABOVE as RANDOMIZE_ABOVE  # public, not in __all__
from ._domain_losses import ConditionalDomainAdversarialLoss, DomainAdversarialLoss
from ._mdd import MarginDisparityDiscrepancy
from ._reversal import GradientReversal, grad_reverse
from ._schedule import WarmStartSchedule

__all__ = [
    "ConditionalDomainAdversarialLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "MarginDisparityDiscrepancy",
    "WarmStartSchedule",
    "grad_reverse",
]

# Public objects report the package as their module (see transferkit._public).
publish(__name__, globals(), __all__)
