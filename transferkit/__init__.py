"""transferkit: transfer-learning primitives for PyTorch.

Compose the pieces into your own training loop::

    import transferkit as tk

The public names below are the contract described in the documentation; submodules
(``tk.kernels``, ``tk.losses``, ``tk.datasets``, ...) hold the rest.
"""

from __future__ import annotations

import logging

from . import (
    augment,
    datasets,
    distributed,
    kernels,
    losses,
    meta,
    metrics,
    models,
    recipes,
    schedules,
    selection,
    sklearn,
    training,
)
from .adversarial import (
    ConditionalDomainAdversarialLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    GradientReversal,
    MarginDisparityDiscrepancy,
    WarmStartSchedule,
    grad_reverse,
)
from .averaging import ModelEMA
from .batchnorm import DomainSpecificBatchNorm, adapt_batchnorm, bn_domain, convert_domain_bn
from .device import autocast, dataloader_kwargs, resolve_device, seed_everything, to_device
from .features import FeatureExtractor, extract_features
from .freezing import GradualUnfreezing, freeze, param_groups, trainable_summary, unfreeze
from .heads import ClassifierHead, find_head, replace_head
from .recipes import Recipe, recipe
from .self_training import FixMatchLoss, PseudoLabeler, PseudoLabels
from .training import EarlyStopping, class_weights

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    # ``tk.plot`` needs matplotlib (the optional ``plot`` extra): import it on first use.
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


__all__ = [
    "ClassifierHead",
    "ConditionalDomainAdversarialLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "DomainSpecificBatchNorm",
    "EarlyStopping",
    "FeatureExtractor",
    "FixMatchLoss",
    "GradientReversal",
    "GradualUnfreezing",
    "MarginDisparityDiscrepancy",
    "ModelEMA",
    "PseudoLabeler",
    "PseudoLabels",
    "Recipe",
    "WarmStartSchedule",
    "__version__",
    "adapt_batchnorm",
    "augment",
    "autocast",
    "bn_domain",
    "class_weights",
    "convert_domain_bn",
    "dataloader_kwargs",
    "datasets",
    "distributed",
    "extract_features",
    "find_head",
    "freeze",
    "grad_reverse",
    "kernels",
    "losses",
    "meta",
    "metrics",
    "models",
    "param_groups",
    "recipe",
    "recipes",
    "replace_head",
    "resolve_device",
    "schedules",
    "seed_everything",
    "selection",
    "sklearn",
    "to_device",
    "trainable_summary",
    "training",
    "unfreeze",
]
