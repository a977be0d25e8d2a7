"""What comes out of a network: multi-layer features, batched extraction and a disk cache.

* [`FeatureExtractor`][] wraps any ``nn.Module`` and returns the outputs of several
  named layers from ONE forward pass, pooled to ``(N, D)`` if asked. Forward hooks are
  attached only while a forward call runs and are removed in a ``finally`` block, so the
  user's model never keeps a hook, even when the forward raises.
* [`extract_features`][] runs an extractor over a tensor, an array, a ``Dataset`` or a
  ``DataLoader`` in eval mode under ``torch.inference_mode`` and returns NumPy arrays,
  optionally cached on disk (resumable, reused only when the model and data match).
* [`masked_mean`][] pools token sequences while ignoring padding.

Under ``torchrun`` (an initialised ``torch.distributed`` process group),
[`extract_features`][] splits the data into contiguous per-rank shards (no padding
duplicates, [`transferkit.distributed.shard_indices`][]), extracts each shard on its
rank and merges the results in dataset order on every rank; with ``cache`` rank 0 writes
the merged cache while the other ranks wait at a barrier.

Layout (private files, one idea each): ``_hooks`` (layer capture, pooled with the shared
``transferkit._pooling``), ``_sources`` (tensor, array, dict, Dataset and DataLoader
input), ``_planner`` (arguments checked once, one plan), ``_run`` (the batch loop),
``_guard`` (the caller's model restored exactly), ``_fingerprint`` / ``_files`` /
``_cache`` (the trusted disk cache) and ``_shard`` (the ``torch.distributed`` path).
"""

from __future__ import annotations

import torch  # noqa: F401  (the docstring examples of the members below use it)

from .._pooling import PoolName as PoolName  # for type hints: transferkit.features.PoolName
from .._pooling import masked_mean
from .._public import publish
from ._extract import extract_features
from ._hooks import FeatureExtractor

__all__ = ["FeatureExtractor", "extract_features", "masked_mean"]

# Pickles and reprs name the public package, not the private file that defines them.
publish(__name__, globals(), __all__)
