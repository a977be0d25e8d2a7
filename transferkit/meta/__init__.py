"""Few-shot head initialisation: from class prototypes, or meta-learned over small tasks.

A classifier trained on a handful of labelled target samples depends heavily on where
its weights start. Two ways to start well:

* [`prototype_init`][] -- no training: set the final linear layer so that it scores
  each class by its similarity to the class prototype (mean feature) of the few labelled
  samples (Snell et al., 2017; Triantafillou et al., 2020). Fine-tuning from there
  starts at the nearest-class-mean classifier instead of at chance.
* [`reptile`][] and [`fomaml`][] -- meta-learn an initialisation from many small
  source tasks so that a few gradient steps on a new task go far (Nichol et al., 2018;
  Finn et al., 2017, first-order variant). [`adapt`][] runs those few steps.

Meta-learning is written with `torch.func.functional_call`: the inner loop updates
a dictionary of parameter tensors, never the module itself, and only parameters with
``requires_grad=True`` are meta-learned (freeze a backbone to meta-learn only a head).
"""

from __future__ import annotations

from .._public import publish
from ._learning import MetaTask, adapt, fomaml, reptile
from ._prototype import prototype_init

__all__ = ["MetaTask", "adapt", "fomaml", "prototype_init", "reptile"]

# Public objects report the package as their module: pickles (MetaTask pools) and reprs
# stay what they were before the split into private files.
publish(__name__, globals(), __all__)
