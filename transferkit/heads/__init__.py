"""What sits on top: pooling + MLP classifier heads, and finding/replacing a model's head.

* [`ClassifierHead`][] pools convolutional maps ``(N, C, H, W)``, token sequences
  ``(N, T, D)`` or ready features ``(N, D)`` and maps them to logits through optional
  hidden layers (in the spirit of fastai's ``create_head`` and timm's classifier).
* [`find_head`][] locates the final classifier of torchvision, timm and Hugging Face
  models and of plain ``nn.Sequential`` stacks; [`replace_head`][] swaps it in place.
"""

from __future__ import annotations

from .._public import publish
from .._surgery import find_head
from ._classifier import ClassifierHead
from ._replace import replace_head

__all__ = ["ClassifierHead", "find_head", "replace_head"]

# Public objects report the package as their module: pickles, reprs and the feature
# cache's model fingerprints stay what they were before the split into private files.
publish(__name__, globals(), __all__)
