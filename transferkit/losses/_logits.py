"""Losses on logits: distillation, entropy, and the target regularisers MCC and BNM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._precision import as_compute, no_autocast
from .._validation import check_pair, check_positive, check_tensor

__all__ = ["BNMLoss", "MCCLoss", "bnm", "distillation", "entropy", "mcc"]

# --------------------------------------------------------------------------- logits


def _check_logits(x: object, name: str) -> Tensor:
    logits = check_tensor(x, name, ndim=2, floating=True, min_samples=1)
    if logits.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one class column, got shape (N, 0)")
    return logits


def distillation(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0
) -> Tensor:
    r"""Knowledge-distillation loss (Hinton et al. 2015).

    $$
    T^2\, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)
    $$

    averaged over the batch. The ``T^2`` factor keeps gradient magnitudes comparable
    across temperatures. Gradients flow into both inputs: pass ``teacher_logits.detach()``
    (or compute them under ``torch.no_grad()``) for a fixed teacher.

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        temperature: softmax temperature ``T > 0``.

    Returns:
        A 0-d tensor.

    Shape:
        - student_logits, teacher_logits: ``(N, C)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, different shapes or devices, or a
            non-positive temperature.
        TypeError: non-floating input or mixed dtypes.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(distillation(logits, logits))
        0.0
        >>> round(float(distillation(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), 1.0)), 4)
        0.6031
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    check_pair(student_logits, teacher_logits, ("student_logits", "teacher_logits"))
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits: expected the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    temp = check_positive(temperature, "temperature")
    with no_autocast(student_logits.device):
        log_student = F.log_softmax(as_compute(student_logits) / temp, dim=1)
        log_teacher = F.log_softmax(as_compute(teacher_logits) / temp, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return kl * (temp * temp)


def entropy(logits: Tensor) -> Tensor:
    r"""Mean prediction entropy $-\sum_c p_c \log p_c$, ``p = softmax(logits)``.

    Natural logarithm; the mean is over the batch. Minimising it on unlabelled target
    data pushes decision boundaries away from dense regions.

    Args:
        logits: class logits.

    Returns:
        A 0-d tensor.

    Shape:
        - logits: ``(N, C)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits.
        TypeError: non-floating logits.

    Examples:
        >>> round(float(entropy(torch.zeros(3, 4))), 4)  # uniform: log(4)
        1.3863
    """
    _check_logits(logits, "logits")
    with no_autocast(logits.device):
        log_p = F.log_softmax(as_compute(logits), dim=1)
        return -(log_p.exp() * log_p).sum(1).mean()


# --------------------------------------------------------------------------- target regularisers


def _check_class_logits(x: object, name: str) -> Tensor:
    """``(B, C)`` finite floating logits with ``B >= 2`` samples and ``C >= 2`` classes."""
    logits = check_tensor(x, name, ndim=2, floating=True, min_samples=2)
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name}: expected logits over at least 2 classes, got shape {tuple(logits.shape)}"
        )
    return logits


def mcc(target_logits: Tensor, temperature: float = 2.5) -> Tensor:
    r"""Minimum class confusion (MCC, Jin et al. 2020) of a batch of target logits.

    With ``B`` samples, ``C`` classes and temperature ``T``:

    $$
    p_i = \mathrm{softmax}(z_i / T), \qquad
    H_i = -\sum_c p_{ic} \log p_{ic}, \qquad
    w_i = \frac{B\,(1 + e^{-H_i})}{\sum_k (1 + e^{-H_k})}
    $$

    $$
    M = P^\top \mathrm{diag}(w)\, P \in \mathbb{R}^{C \times C}, \qquad
    \tilde M_{jk} = \frac{M_{jk}}{\sum_l M_{lk}}, \qquad
    \mathrm{MCC} = \frac{1}{C} \sum_{j \ne k} \tilde M_{jk}
    $$

    ``M`` is the class-confusion matrix (how much mass the batch puts on class ``j`` and
    ``k`` at once); category normalisation divides each column by its sum so that rare
    classes count as much as frequent ones. The value lies in ``[0, (C - 1) / C]``: the
    upper end for uniform predictions, 0 when every sample is confidently one class. The
    entropy weights ``w`` are detached, as in the reference implementation, so the
    gradient reaches the logits through ``P`` only.

    Category normalisation makes a class that no sample predicts count as fully confused
    (its column of $\tilde M$ is all off-diagonal), so the value is near 0 only
    when the batch is confident *and* covers every class; use batches of at least ``C``
    samples. A class whose softmax mass underflows to exactly 0 gets that limit, 1, not
    NaN.

    Add ``mcc_weight * mcc(target_logits)`` (the paper uses 1.0) to the source
    cross-entropy; it needs no source batch and no extra network.

    Args:
        target_logits: class logits of a target batch.
        temperature: softmax temperature ``T > 0`` (2.5 in the paper; 2-3 work well).

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - target_logits: ``(B, C)`` with ``B >= 2`` and ``C >= 2``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, fewer than 2 samples or classes, or a
            non-positive temperature.
        TypeError: non-tensor or non-floating logits, or a non-numeric temperature.

    Examples:
        >>> round(float(mcc(torch.zeros(4, 3))), 4)  # uniform predictions: (C - 1) / C
        0.6667
        >>> confident = 100.0 * torch.eye(3)  # each sample sure of a different class
        >>> float(mcc(confident)) < 1e-6
        True
        >>> round(float(mcc(100.0 * torch.eye(3)[[0, 0, 1]])), 4)  # class 2 never predicted
        0.3333
    """
    _check_class_logits(target_logits, "target_logits")
    temp = check_positive(temperature, "temperature")
    with no_autocast(target_logits.device):
        logits = as_compute(target_logits)
        batch, classes = logits.shape
        log_p = F.log_softmax(logits / temp, dim=1)
        p = log_p.exp()
        with torch.no_grad():
            certainty = 1.0 + torch.exp((p * log_p).sum(1))  # 1 + exp(-H)
            weights = batch * certainty / certainty.sum()
        confusion = (p * weights.unsqueeze(1)).T @ p
        # sum_{j != k} M~_jk = sum_k (1 - M_kk / sum_l M_lk); a column without mass is
        # given its limit, 1, instead of 0 / 0.
        column_sums = confusion.sum(0)
        massless = column_sums <= 0
        own_share = confusion.diagonal() / torch.where(massless, 1.0, column_sums)
        return (1.0 - torch.where(massless, 0.0, own_share)).sum() / classes


class MCCLoss(nn.Module):
    """Minimum class confusion as a module; see [`mcc`][].

    Args:
        temperature: softmax temperature ``T > 0`` (2.5 in the paper).

    Shape:
        - target_logits: ``(B, C)`` with ``B, C >= 2``.
        - Output: ``()``.

    Examples:
        >>> loss = MCCLoss(temperature=2.5)
        >>> round(float(loss(torch.zeros(5, 2))), 4)
        0.5
    """

    def __init__(self, temperature: float = 2.5) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"temperature={self.temperature:g}"

    def forward(self, target_logits: Tensor) -> Tensor:
        """MCC of ``target_logits``."""
        return mcc(target_logits, self.temperature)


def bnm(logits: Tensor) -> Tensor:
    r"""Batch nuclear-norm maximisation (BNM, Cui et al. 2020), as a loss to minimise.

    $$
    \mathcal{L}_{bnm} = -\frac{1}{B} \|A\|_\star, \qquad
        A = \mathrm{softmax}(z) \in \mathbb{R}^{B \times C}
    $$

    where $\|A\|_\star = \sum_k \sigma_k(A)$ is the nuclear norm (sum of singular
    values). Maximising it raises both prediction confidence (the Frobenius norm) and
    prediction diversity (the rank), which counters the collapse onto a few majority
    classes that plain entropy minimisation causes. Bounds:
    $-\sqrt{\min(B, C) / B} \le \mathcal{L}_{bnm} \le -1/\sqrt{BC}$; the lower
    bound is reached by confident predictions spread evenly over ``min(B, C)`` classes.
    The paper's code divides by ``min(B, C)`` (``-mean(svd(A))``) instead of ``B``; with
    ``B <= C`` the two agree.

    Add ``bnm_weight * bnm(target_logits)`` (1.0 in the paper) to the source
    cross-entropy. The gradient is that of ``torch.linalg.svdvals`` (``U V^T``), which is
    well defined unless singular values are exactly zero.

    Args:
        logits: class logits, usually of a target batch.

    Returns:
        A 0-d tensor, always negative (fp32 for half-precision inputs).

    Shape:
        - logits: ``(B, C)`` with ``B >= 2`` and ``C >= 2``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite logits, or fewer than 2 samples or classes.
        TypeError: non-tensor or non-floating logits.

    Examples:
        >>> round(float(bnm(100.0 * torch.eye(3))), 4)  # confident and diverse: -1
        -1.0
        >>> round(float(bnm(torch.zeros(4, 2))), 4)  # uniform: rank 1, -sqrt(2) / 4
        -0.3536
    """
    _check_class_logits(logits, "logits")
    with no_autocast(logits.device):
        probs = F.softmax(as_compute(logits), dim=1)
        singular: Tensor = torch.linalg.svdvals(probs)
        return -singular.sum() / probs.shape[0]


class BNMLoss(nn.Module):
    """Batch nuclear-norm maximisation as a module; see [`bnm`][].

    Shape:
        - logits: ``(B, C)`` with ``B, C >= 2``.
        - Output: ``()``.

    Examples:
        >>> round(float(BNMLoss()(100.0 * torch.eye(2))), 4)
        -1.0
    """

    def forward(self, logits: Tensor) -> Tensor:
        """The negative batch nuclear norm of ``softmax(logits)``, divided by ``B``."""
        return bnm(logits)
