"""Label-free scores of a model's target predictions: entropy and SND."""

from __future__ import annotations

import numpy as np
import torch

from .._validation import check_positive
from ..metrics import as_numpy_features
from ._inputs import ArrayLike


def _logits(x: object, name: str) -> np.ndarray:
    return as_numpy_features(x, name, min_samples=1)


def prediction_entropy(target_logits: ArrayLike) -> float:
    r"""Mean entropy of the model's predictions on the target (in nats).

    $\frac1N \sum_i -\sum_c p_{ic} \log p_{ic}$ with
    $p_i = \operatorname{softmax}(\text{logits}_i)$. Confident target predictions
    (low entropy) are a common, if fallible, sign of a well-adapted model (Morerio et
    al., 2018): compare models with the *lowest* entropy, but beware that a model which
    collapses onto one class is also confident.

    Args:
        target_logits: the model's logits on unlabelled target samples.

    Returns:
        Mean entropy in ``[0, log C]``; lower is better.

    Shape:
        - ``target_logits``: ``(N, C)``.

    Raises:
        ValueError: not 2-D, NaN/inf, empty.

    Examples:
        >>> import numpy as np
        >>> round(prediction_entropy(np.zeros((4, 3))), 4)  # uniform: log 3
        1.0986
    """
    from scipy.special import log_softmax

    logits = _logits(target_logits, "target_logits")
    log_p = log_softmax(logits, axis=1)
    return float(-(np.exp(log_p) * log_p).sum(1).mean())


def snd(target_logits: ArrayLike, *, temperature: float = 0.05, chunk_size: int = 2048) -> float:
    r"""Soft neighbourhood density of target predictions (Saito et al., ICCV 2021).

    Following the authors' implementation: the softmax predictions $p_i$ are
    L2-normalised, their cosine similarities $s_{ij}$ (with $s_{ii}$ set to
    -1, so a sample is not its own neighbour) are turned into neighbour distributions
    $q_i = \operatorname{softmax}_j(s_{ij} / \tau)$, and

    $$
    \text{SND} = \frac1N \sum_i -\sum_j q_{ij} \log (q_{ij} + 10^{-5}).
    $$

    A high value means target samples sit in dense neighbourhoods of similar predictions,
    which Saito et al. found to correlate with target accuracy across hyper-parameters.
    Compare models with the *highest* SND.

    Args:
        target_logits: the model's logits on unlabelled target samples.
        temperature: $\tau$ (0.05 in the paper).
        chunk_size: rows of the ``(N, N)`` similarity matrix computed at a time
            (memory ``chunk_size * N`` floats).

    Returns:
        The SND score; higher is better.

    Shape:
        - ``target_logits``: ``(N, C)`` with ``N >= 2``.

    Raises:
        ValueError: fewer than 2 samples, NaN/inf, bad ``temperature``.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> clustered = np.eye(3)[rng.integers(0, 3, size=60)] * 10.0
        >>> diffuse = rng.normal(size=(60, 3))
        >>> snd(clustered) > snd(diffuse)
        True
    """
    logits = as_numpy_features(target_logits, "target_logits", min_samples=2)
    tau = check_positive(temperature, "temperature")
    step = int(check_positive(chunk_size, "chunk_size", integer=True))
    probs = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    probs = torch.nn.functional.normalize(probs, dim=1)
    n = probs.shape[0]
    total = 0.0
    for start in range(0, n, step):
        block = probs[start : start + step] @ probs.T / tau
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -1.0 / tau
        q = torch.softmax(block, dim=1)
        total += float(-(q * torch.log(q + 1e-5)).sum())
    return total / n
