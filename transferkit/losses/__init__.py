"""Discrepancy and regularisation losses for transfer learning, built on kernels/.

Domain discrepancies take two feature batches, ``source: (N, D)`` and ``target: (M, D)``,
and return a scalar: [`mmd`][] / [`MMDLoss`][] (squared maximum mean discrepancy,
biased, unbiased or linear-time), [`JointMMDLoss`][] (JMMD over several layers) and
[`coral`][] / [`CORALLoss`][]. [`distillation`][] and [`entropy`][] work on
logits; [`L2SP`][] and [`bss`][] regularise fine-tuning.

Target regularisers need no source batch: [`mcc`][] / [`MCCLoss`][] (minimum class
confusion) and [`bnm`][] / [`BNMLoss`][] (batch nuclear-norm maximisation) act on
target logits, [`adaptive_feature_norm`][] / [`AdaptiveFeatureNormLoss`][] (AFN) on
features. MDD, which trains an adversarial head, is
[`MarginDisparityDiscrepancy`][transferkit.adversarial.MarginDisparityDiscrepancy].

Every loss validates its input (shapes, feature dimensions, NaN/inf, devices, dtypes)
and computes in fp32 when given fp16/bf16 tensors, also under `torch.autocast`.
Validation reads a few values back from the device (e.g. the NaN check); while
`torch.compile` traces (``torch.compiler.is_compiling()``) those data-dependent
checks are skipped (shapes, dtypes and options are still checked) and [`mmd`][] uses
plain autograd ops instead of its blocked custom function, so ``mmd`` (every estimator,
fixed or heuristic bandwidth), [`coral`][], [`entropy`][], [`distillation`][],
[`mcc`][], [`bnm`][] and [`adaptive_feature_norm`][] compile with
``fullgraph=True``. Unweighted calls only: explicit sample weights are still checked
with a read-back.

The quadratic MMD estimators (and JMMD) never build an autograd graph over the
``(N + M)^2`` kernel matrix: one custom autograd function walks the symmetric matrix
in cache-sized square tiles, each tile once, and keeps only ``O((N + M) D)`` sums: the
kernel products the estimate needs and the gradient reductions ``K' @ (w * z)``, which
one more matrix multiplication per tile gives already in the forward pass. The
backward pass is then ``O((N + M) D)`` and memory stays ``O(tile^2 + (N + M) D)`` at
any batch size. (The custom function supports first-order gradients, not double
backward.)
"""

from __future__ import annotations

# The doctests of the public objects below run in this namespace.
import torch  # noqa: F401
from torch import nn  # noqa: F401

from .._public import publish
from ._discrepancies import CORALLoss, JointMMDLoss, MMDLoss, coral, joint_mmd, mmd
from ._logits import BNMLoss, MCCLoss, bnm, distillation, entropy, mcc
from ._regularisers import L2SP, AdaptiveFeatureNormLoss, adaptive_feature_norm, bss

__all__ = [
    "L2SP",
    "AdaptiveFeatureNormLoss",
    "BNMLoss",
    "CORALLoss",
    "JointMMDLoss",
    "MCCLoss",
    "MMDLoss",
    "adaptive_feature_norm",
    "bnm",
    "bss",
    "coral",
    "distillation",
    "entropy",
    "joint_mmd",
    "mcc",
    "mmd",
]

# Public objects report the package as their module (stable pickles, reprs and cache
# fingerprints whatever private file defines them).
publish(__name__, globals(), __all__)
