"""Distances between domains, measured on features.

* [`proxy_a_distance`][] -- the proxy A-distance of Ben-David et al. (2007): how well a
  linear classifier tells source features from target features on held-out data.

All functions take ``numpy`` arrays or ``torch`` tensors (any device, any floating or
integer dtype) and compute in float64 NumPy / scikit-learn.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._validation import (
    check_features,
    check_in_range,
    check_labels,
    check_not_meta,
    check_option,
    check_positive,
    check_same_width,
)

__all__ = ["proxy_a_distance"]

logger = logging.getLogger(__name__)

DomainClassifierName = Literal["logistic", "svm"]


def as_numpy_features(x: object, name: str, *, min_samples: int = 2) -> np.ndarray:
    """Validate a ``(N, D)`` feature matrix (array or tensor); return it as float64 NumPy.

    Integer arrays are accepted and converted. The input is never modified; the result may
    share memory with it, so callers must not write into it.

    Raises:
        TypeError: ``x`` is neither a NumPy array nor a tensor, or holds non-numbers.
        ValueError: wrong rank, NaN/inf, no columns or fewer than ``min_samples`` rows.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected a numeric array, got dtype {x.dtype}")
        tensor = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name}: expected a real numeric tensor, got dtype {x.dtype}")
        check_not_meta(x, name)
        tensor = x.detach().to("cpu", torch.float64)
    else:
        raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(x).__name__}")
    check_features(tensor, name, min_samples=min_samples)
    out: np.ndarray = tensor.numpy()
    return out


def as_numpy_labels(y: object, name: str, *, num_samples: int) -> np.ndarray:
    """Validate ``(N,)`` non-negative integer labels (array or tensor); return int64 NumPy.

    Raises:
        TypeError: not an integer array/tensor.
        ValueError: wrong rank, wrong length or negative entries.
    """
    if isinstance(y, np.ndarray):
        if y.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected an integer array, got dtype {y.dtype}")
        tensor = torch.from_numpy(np.asarray(y, dtype=np.int64))
    elif isinstance(y, Tensor):
        check_not_meta(y, name)
        tensor = y.detach().to("cpu")
    else:
        raise TypeError(f"{name}: expected a numpy array or torch.Tensor, got {type(y).__name__}")
    check_labels(tensor, name, num_samples=num_samples)
    out: np.ndarray = tensor.to(torch.int64).numpy()
    return out


def as_numpy_domains(
    source_features: object, target_features: object, *, min_samples: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Source and target features pooled for a domain classifier.

    Returns:
        The ``(N_s + N_t, D)`` float64 features (source first), their domain labels
        (0 source, 1 target) and ``N_s``.

    Raises:
        TypeError, ValueError: as ``as_numpy_features`` for either input, or
            different feature dimensions.
    """
    source = as_numpy_features(source_features, "source_features", min_samples=min_samples)
    target = as_numpy_features(target_features, "target_features", min_samples=min_samples)
    check_same_width(source, target, ("source_features", "target_features"))
    pooled = np.concatenate([source, target])
    domain = np.concatenate([np.zeros(len(source), np.int64), np.ones(len(target), np.int64)])
    return pooled, domain, len(source)


def make_domain_classifier(
    classifier: DomainClassifierName, *, C: float, seed: int, balanced: bool = False
) -> object:
    """A standardising linear scikit-learn classifier for source-vs-target features.

    ``balanced`` weights both domains equally whatever their sizes (not for density
    ratios, which need the domains' real proportions).
    """
    weight = "balanced" if balanced else None
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "logistic":
        model: object = LogisticRegression(C=C, max_iter=2000, class_weight=weight)
    else:
        model = LinearSVC(C=C, max_iter=20000, random_state=seed, class_weight=weight)
    return make_pipeline(StandardScaler(), model)


def proxy_a_distance(
    source_features: np.ndarray | Tensor,
    target_features: np.ndarray | Tensor,
    *,
    classifier: DomainClassifierName = "logistic",
    C: float = 1.0,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> float:
    r"""Proxy A-distance between two feature sets (Ben-David et al., 2007).

    A linear domain classifier (standardised features, then logistic regression or a
    linear SVM) is trained to tell source (label 0) from target (label 1) on a stratified
    ``1 - test_fraction`` split and tested on the rest. With its held-out balanced
    error $\epsilon$ (the mean of the source and the target error rates),

    $$
    d_A = 2 (1 - 2 \epsilon).
    $$

    $d_A = 2$ means the domains are perfectly separable, ``0`` that a linear
    classifier does no better than chance. A classifier worse than chance carries no
    evidence of a difference, so $\epsilon$ is capped at 0.5 and the result lies
    in ``[0, 2]``. Lower means the features are more domain-invariant.

    Domains of different sizes count equally: the classifier is trained with balanced
    class weights and $\epsilon$ is the balanced error, so identical feature sets score
    near 0 whatever their sizes (a plain error rate would reward always predicting the
    larger domain: 50 vs 500 samples of one distribution would score about 1.6). For
    equal sizes this is the plain error rate of Ben-David et al.

    Args:
        source_features: source features.
        target_features: target features, same feature dimension.
        classifier: ``"logistic"`` (logistic regression) or ``"svm"`` (linear SVM).
        C: inverse regularisation strength of the classifier.
        test_fraction: fraction of the pooled samples held out to measure the error.
        seed: seed of the split.

    Returns:
        The proxy A-distance, a float in ``[0, 2]``.

    Shape:
        - ``source_features``: ``(N_s, D)``, ``target_features``: ``(N_t, D)``, with at
          least 4 samples each.

    Raises:
        ValueError: mismatched dimensions, NaN/inf, too few samples, unknown classifier.
        TypeError: inputs that are not arrays/tensors of numbers.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> same = proxy_a_distance(rng.normal(size=(200, 5)), rng.normal(size=(200, 5)))
        >>> far = proxy_a_distance(rng.normal(size=(200, 5)), rng.normal(size=(200, 5)) + 3)
        >>> same < 0.5, far > 1.9
        (True, True)
    """
    pooled, domain, n_source = as_numpy_domains(source_features, target_features, min_samples=4)
    check_option(classifier, "classifier", ("logistic", "svm"))
    check_positive(C, "C")
    check_in_range(test_fraction, "test_fraction", 0.1, 0.9)
    from sklearn.model_selection import train_test_split

    x_train, x_test, d_train, d_test = train_test_split(
        pooled, domain, test_size=test_fraction, stratify=domain, random_state=seed
    )
    # unequal domains are weighted equally in training too, or the classifier learns to
    # predict the larger domain (a balanced error of 0.5, however far apart they are);
    # equal domains keep the unweighted fit
    balanced = len(pooled) != 2 * n_source
    model = make_domain_classifier(classifier, C=C, seed=seed, balanced=balanced)
    model.fit(x_train, d_train)  # type: ignore[attr-defined]
    wrong = model.predict(x_test) != d_test  # type: ignore[attr-defined]
    # the balanced error (mean of the two domains' error rates): with unequal domains a
    # plain error rate rewards predicting the larger domain, so identical feature sets
    # would score far above 0; for equal domains it is the plain error rate
    error = float(np.mean([wrong[d_test == k].mean() for k in (0, 1)]))
    distance = 2.0 * (1.0 - 2.0 * min(error, 0.5))
    logger.debug("proxy_a_distance: held-out domain error %.4f -> %.4f", error, distance)
    return distance
