"""scikit-learn estimators over deep features: kernel SVM, domain alignment, prototypes.

Every class here is a real scikit-learn estimator: it stores its constructor arguments
unchanged, learns in ``fit`` into ``name_`` attributes, and works with ``clone``,
``Pipeline`` and ``GridSearchCV``.

* [`DeepFeatures`][] -- a transformer that runs a torch model (samples in, deep
  features out) through [`transferkit.extract_features`][].
* [`TorchKernelSVC`][] -- a kernel SVM whose Gram matrices are computed by
  [`transferkit.kernels`][] in torch (chunked, on the GPU when present) and solved by
  libsvm through ``sklearn.svm.SVC(kernel="precomputed")``; a Nystroem + linear SVM path
  for large training sets.
* [`CORAL`][], [`TCA`][], [`SubspaceAlignment`][] -- feature-space domain
  alignment fitted on labelled source rows plus unlabelled target rows.
* [`PrototypeClassifier`][] -- nearest class mean, for few-shot targets.
* [`make_deep_svm_pipeline`][] -- model -> features -> (alignment) -> kernel SVM.

TCA's ``"multi_rbf"`` kernel is the SVC's (and [`transferkit.kernels.GaussianKernel`][]'s):
multipliers ``(0.25, 0.5, 1, 2, 4)`` on ``1 / gamma`` by default (it used to be fixed at
``(0.5, 1, 2)``; ``TCA(multipliers=(0.5, 1.0, 2.0))`` gives that kernel back).

**Layout.** ``_svc`` (the SVM), ``_gram`` (named kernels and their Gram matrices, shared
by the SVM and TCA), ``_tca`` and ``_align`` (domain alignment), ``_prototype``,
``_deep_features`` and ``_text`` (model features, text and token inputs), ``_pipeline``;
``_inputs`` holds the conventions they share (tensors as arrays, unlabelled rows).

**How target data reaches ``fit``.** Domain-alignment transformers follow scikit-learn's
semi-supervised convention: ``fit(X, y)`` receives source and target rows stacked, and
the unlabelled target rows carry the label ``-1`` (the ``unlabelled`` parameter). The
classifiers take the same ``unlabelled`` parameter and skip those rows when fitting and
scoring, so one ``Pipeline.fit(X, y)`` call fits the whole chain. At prediction time
every row is taken to come from the target domain.
"""

from __future__ import annotations

from .._public import publish
from ._align import CORAL, SubspaceAlignment
from ._deep_features import DeepFeatures
from ._pipeline import make_deep_svm_pipeline
from ._prototype import PrototypeClassifier
from ._svc import TorchKernelSVC
from ._tca import TCA

__all__ = [
    "CORAL",
    "TCA",
    "DeepFeatures",
    "PrototypeClassifier",
    "SubspaceAlignment",
    "TorchKernelSVC",
    "make_deep_svm_pipeline",
]

# Pickles and reprs name the public package, not the private file an object lives in.
publish(__name__, globals(), __all__)
