"""Pictures of a transfer run: feature embeddings, training curves, decision boundaries.

This package needs matplotlib, the ``plot`` extra (``pip install 'transferkit[plot]'``);
it is imported only when you call a function here, so ``import transferkit`` works
without it. Every function draws into the ``ax`` you pass (or a new figure made with
``matplotlib.pyplot.subplots``) and returns that ``Axes``; none of them calls
``plt.show()``. Write figures with [`save`][], which replaces the file atomically.

* [`embedding`][] -- source vs target features in 2-D (t-SNE or PCA): the picture of
  domain shift, before and after adaptation.
* [`curves`][] -- loss and accuracy per epoch from a ``history`` dict.
* [`decision_boundary`][] -- the class regions of a classifier on a 2-D task (e.g.
  [`transferkit.datasets.moons`][]), with source and target points on top.
"""

from __future__ import annotations

from .._public import publish
from ._boundary import decision_boundary
from ._curves import curves
from ._embedding import embedding
from ._save import save

__all__ = ["curves", "decision_boundary", "embedding", "save"]

# Public objects report the package as their module (see transferkit._public).
publish(__name__, globals(), __all__)
