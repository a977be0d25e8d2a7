"""transferkit: transfer-learning primitives for PyTorch.

Compose the pieces into your own training loop::

    import transferkit as tk

The public names below are the contract described in the documentation; submodules
(``tk.kernels``, ``tk.losses``, ``tk.datasets``, ...) hold the rest.
"""

from __future__ import annotations

import logging

from . import datasets, distributed, models
from .device import autocast, dataloader_kwargs, resolve_device, seed_everything, to_device

# [exports:kernels-losses]
from . import kernels, losses
# [exports:freezing-heads]
from .freezing import GradualUnfreezing, freeze, param_groups, trainable_summary, unfreeze
from .heads import ClassifierHead, find_head, replace_head
# [exports:features]
from .features import FeatureExtractor, extract_features
# [exports:adversarial]
from .adversarial import (
    ConditionalDomainAdversarialLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    GradientReversal,
    WarmStartSchedule,
    grad_reverse,
)
# [exports:sklearn]
from . import sklearn
# [exports:selection-metrics]
from . import meta, metrics, selection
# [exports:distributed]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "autocast",
    "dataloader_kwargs",
    "datasets",
    "distributed",
    "models",
    "resolve_device",
    "seed_everything",
    "to_device",
    # [all:kernels-losses]
    "kernels",
    "losses",
    # [all:freezing-heads]
    "ClassifierHead",
    "GradualUnfreezing",
    "find_head",
    "freeze",
    "param_groups",
    "replace_head",
    "trainable_summary",
    "unfreeze",
    # [all:features]
    "FeatureExtractor",
    "extract_features",
    # [all:adversarial]
    "ConditionalDomainAdversarialLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "WarmStartSchedule",
    "grad_reverse",
    # [all:sklearn]
    "sklearn",
    # [all:selection-metrics]
    "meta",
    "metrics",
    "selection",
    # [all:distributed]
]
