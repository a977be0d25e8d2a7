"""Regularisers on features and weights: AFN, batch spectral shrinkage (BSS) and L2-SP."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._precision import as_compute, compute_dtype, no_autocast
from .._surgery import matches
from .._validation import check_features, check_module_data, check_positive, did_you_mean

__all__ = ["L2SP", "AdaptiveFeatureNormLoss", "adaptive_feature_norm", "bss"]

logger = logging.getLogger("transferkit.losses")


def _check_afn_options(delta: object, radius: object) -> tuple[float | None, float | None]:
    if delta is not None and radius is not None:
        raise ValueError(
            "delta and radius: pass delta= for the stepwise AFN or radius= for the hard "
            "AFN, not both"
        )
    if radius is not None:
        return None, check_positive(radius, "radius")
    return check_positive(1.0 if delta is None else delta, "delta"), None


def adaptive_feature_norm(
    features: Tensor, *, delta: float | None = None, radius: float | None = None
) -> Tensor:
    r"""Adaptive feature norm (AFN, Xu et al. 2019): push feature norms up.

    Larger feature norms on the target domain make the classifier transfer better (the
    "smaller-norm" hypothesis of the paper). Two variants, with
    $h_i = \|f_i\|_2$:

    - stepwise AFN (SAFN, the default; ``delta`` = $\Delta r$, 1.0 in the paper):

      $$
      \mathcal{L} = \frac{1}{N} \sum_i \big(\mathrm{sg}(h_i) + \Delta r -
          h_i\big)^2
      $$

      with ``sg`` stop-gradient. Its value is always $\Delta r^2$; its gradient
      enlarges every norm by a step of $\Delta r$ per update.
    - hard AFN (HAFN; pass ``radius`` = ``R``, 25 in the paper):

      $$
      \mathcal{L} = \Big(\frac{1}{N} \sum_i h_i - R\Big)^2
      $$

      the squared distance of the batch's mean norm to ``R``, as in the paper's eq. 2
      and code. Call it once per domain and add the two terms.

    Add ``0.05 * adaptive_feature_norm(features)`` (the paper's weight for SAFN on
    Office-31, at learning rate 0.001; HAFN used 0.05 as well) for source and target
    features, on the bottleneck features before the last linear layer. SAFN enlarges the
    norms by about ``lr * weight * delta`` per step: at a larger learning rate scale the
    weight down (``tk.recipe("afn").at_lr(lr)`` does), or the norms outgrow the
    classifier (at lr 0.1 with weight 0.05 it failed on the source). That failure is a
    bottleneck without normalisation: the norms grow fastest through an offset shared by
    every sample. With BatchNorm before the bottleneck's activation (the paper's and
    TLlib's bottleneck, ``tk.models.SmallCNN(neck_norm="batch")``) the unscaled weight
    0.05 trains at lr 0.03 (MNIST -> digits: 77.1% vs AdaBN's 71.9%, 3 seeds).
    The norm has a zero gradient at
    ``f_i = 0`` (no NaN), and norms are computed scaled by each row's largest entry, so
    fp32 features of magnitude 1e20 or 1e-20 give the float64 result; a hard-AFN value
    that does not fit in the dtype raises instead of returning ``inf``.

    Args:
        features: a feature batch (source and target concatenated, or one domain).
        delta: the step $\Delta r > 0$ of SAFN; default 1.0 when ``radius`` is not
            given.
        radius: the target norm ``R > 0`` of HAFN; selects the hard variant.

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - features: ``(N, D)``, ``N >= 1``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D, empty or non-finite features, non-positive ``delta`` /
            ``radius``, both given, or a hard-AFN penalty that overflows the dtype.
        TypeError: non-tensor or non-floating features, or non-numeric options.

    Examples:
        >>> f = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)
        >>> float(adaptive_feature_norm(f, delta=0.5))  # always delta ** 2
        0.25
        >>> float(adaptive_feature_norm(f, radius=5.0))  # (mean(5, 1) - 5) ** 2
        4.0
    """
    check_features(features, "features")
    step, target_norm = _check_afn_options(delta, radius)
    with no_autocast(features.device):
        norms = _row_norms(as_compute(features))
        if target_norm is None:
            assert step is not None
            # (sg(h) + delta - h)^2 written as (delta - (h - sg(h)))^2: h - sg(h) is exactly
            # 0, so the value is delta^2 even where h + delta rounds to h (h ~ 1e20).
            return ((step - (norms - norms.detach())) ** 2).mean()
        penalty = (norms.mean() - target_norm) ** 2
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(penalty)):
            raise ValueError(
                f"features: the hard AFN penalty (mean norm - radius)^2 overflows "
                f"{penalty.dtype} (mean feature norm {float(norms.mean().detach()):.3g}, "
                f"radius {target_norm:g}); scale the features down or pass float64"
            )
        return penalty


def _row_norms(x: Tensor) -> Tensor:
    """Euclidean row norms, scaled so that squares of 1e20 or 1e-20 stay in fp32 range.

    Each row is divided by its largest entry (detached) before the norm and the norm is
    multiplied back; zero rows keep a zero gradient.
    """
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norms: Tensor = torch.linalg.vector_norm(x / scale, dim=1) * scale.squeeze(1)
    return norms


class AdaptiveFeatureNormLoss(nn.Module):
    """Adaptive feature norm as a module; see [`adaptive_feature_norm`][].

    Args:
        delta: the step of stepwise AFN (default 1.0 when ``radius`` is not given).
        radius: the target norm ``R`` of hard AFN; selects the hard variant.

    Shape:
        - features: ``(N, D)``.
        - Output: ``()``.

    Examples:
        >>> float(AdaptiveFeatureNormLoss()(torch.randn(4, 3)))  # SAFN, delta = 1
        1.0
        >>> AdaptiveFeatureNormLoss(radius=25.0)
        AdaptiveFeatureNormLoss(radius=25)
    """

    def __init__(self, *, delta: float | None = None, radius: float | None = None) -> None:
        super().__init__()
        self.delta, self.radius = _check_afn_options(delta, radius)

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        if self.radius is not None:
            return f"radius={self.radius:g}"
        return f"delta={self.delta:g}"

    def forward(self, features: Tensor) -> Tensor:
        """The AFN penalty of ``features``."""
        if self.radius is not None:
            return adaptive_feature_norm(features, radius=self.radius)
        return adaptive_feature_norm(features, delta=self.delta)


# --------------------------------------------------------------------------- fine-tuning


def bss(features: Tensor, k: int = 1) -> Tensor:
    """Batch spectral shrinkage (Chen et al. 2019): the ``k`` smallest squared singular values.

    Adding ``eta * bss(features)`` to the fine-tuning loss shrinks the feature directions
    with the smallest singular values, which carry the least transferable knowledge.

    Args:
        features: the batch feature matrix.
        k: how many of the smallest singular values to penalise, ``1 <= k <= min(N, D)``.

    Returns:
        A 0-d tensor: ``sum_{i=1..k} sigma_{-i}^2``.

    Shape:
        - features: ``(N, D)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite features, or ``k`` out of range.
        TypeError: non-floating features or non-integer ``k``.

    Examples:
        >>> float(bss(torch.diag(torch.tensor([3.0, 2.0, 1.0])), k=2))
        5.0
    """
    check_features(features, "features")
    count = int(check_positive(k, "k", integer=True))
    limit = min(features.shape)
    if count > limit:
        raise ValueError(f"k: expected at most min(N, D) = {limit}, got {count}")
    with no_autocast(features.device):
        singular: Tensor = torch.linalg.svdvals(as_compute(features))
        return (singular[-count:] ** 2).sum()


class L2SP(nn.Module):
    r"""L2-SP regulariser (Li et al. 2018): keep fine-tuned weights near the pretrained ones.

    $$
    \frac{\alpha}{2} \sum_{w \in S} \|w - w^0\|^2 + \frac{\beta}{2}
    \sum_{w \in \bar S} \|w\|^2
    $$

    At construction every trainable (``requires_grad``) parameter of ``model`` is
    anchored at its current value ``w^0`` unless its name matches ``exclude``; the
    excluded trainable parameters (typically the new head) get plain weight decay
    ``beta``. Parameters frozen at construction get no anchor: build L2SP *before*
    freezing layers that will be unfrozen later (e.g. by
    [`GradualUnfreezing`][transferkit.GradualUnfreezing]), since a parameter that
    becomes trainable without an anchor makes the call raise (one that matches
    ``exclude`` gets the weight decay). An anchored parameter whose shape changed (a
    replaced layer) raises too. The anchors are registered buffers, so they
    move with ``.to()`` and save/load with ``state_dict()``; their names are the
    parameter names with ``.`` replaced by ``__``. The module keeps a reference to
    ``model`` (not as a submodule: its parameters are not this module's parameters).

    Args:
        model: the network being fine-tuned, with its pretrained weights loaded.
        alpha: strength of the pull towards the anchors.
        beta: weight decay of the excluded parameters.
        exclude: glob patterns on parameter names (``"fc*"``, ``"head.*"``); a pattern also
            matches everything under a module name (``"fc"`` matches ``fc.weight``).

    Shape:
        - Output: ``()`` from ``l2sp()`` (no inputs).

    Raises:
        ValueError: negative ``alpha``/``beta`` or an ``exclude`` pattern that matches no
            trainable parameter; when called: an anchored parameter that disappeared,
            changed shape or moved to another device than its anchor, or a trainable
            parameter that has no anchor and matches no ``exclude`` pattern.
        TypeError: ``model`` is not a module or ``exclude`` holds non-strings.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> reg = L2SP(net, alpha=0.1, beta=0.0, exclude=["1.*"])
        >>> reg().item()
        0.0
        >>> with torch.no_grad():
        ...     _ = net[0].weight.add_(1.0)
        >>> float(reg())  # alpha / 2 * 4 entries * 1^2
        0.2
        >>> sorted(reg.state_dict())
        ['0__bias', '0__weight']
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 0.01,
        beta: float = 0.01,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.alpha = check_positive(alpha, "alpha", strict=False)
        self.beta = check_positive(beta, "beta", strict=False)
        if isinstance(exclude, str):
            exclude = [exclude]
        if exclude is not None and (
            not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude)
        ):
            raise TypeError(
                f"exclude: expected a glob pattern or a list of them (strings such as 'fc*'), "
                f"got {exclude!r}"
            )
        patterns = list(exclude or [])
        check_module_data(model, "model")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in trainable]
        for pattern in patterns:
            if not any(matches(n, [pattern]) for n in names):
                raise ValueError(
                    f"exclude: pattern {pattern!r} matches no trainable parameter of "
                    f"{type(model).__name__}{did_you_mean(pattern, names)}"
                )
        self._model = [model]  # a list, so that nn.Module does not register it
        self._patterns = patterns
        self.anchored: list[str] = []
        self.excluded: list[str] = []
        self._buffer_names: dict[str, str] = {}
        for name, param in trainable:
            if matches(name, patterns):
                self.excluded.append(name)
                continue
            buffer = name.replace(".", "__")
            if buffer in self._buffer_names.values():
                raise ValueError(f"model: parameter names collide as buffer name {buffer!r}")
            self.register_buffer(buffer, param.detach().clone())
            self._buffer_names[name] = buffer
            self.anchored.append(name)
        logger.debug("L2SP anchors %d tensors, excludes %d", len(self.anchored), len(self.excluded))

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return (
            f"alpha={self.alpha}, beta={self.beta}, anchored={len(self.anchored)}, "
            f"excluded={len(self.excluded)}"
        )

    def forward(self) -> Tensor:
        """The penalty for the model's current parameters (a 0-d fp32/fp64 tensor)."""
        params = dict(self._model[0].named_parameters())
        missing = [n for n in self.anchored + self.excluded if n not in params]
        if missing:
            raise ValueError(f"model: parameters {missing[:3]} disappeared since construction")
        known = set(self.anchored) | set(self.excluded)
        late = [n for n, p in params.items() if p.requires_grad and n not in known]
        unanchored = [n for n in late if not matches(n, self._patterns)]
        if unanchored:
            raise ValueError(
                f"model: parameters {unanchored[:3]} are trainable but were frozen (or did "
                "not exist) when L2SP was built, so they have no anchor and would not be "
                "regularised; build L2SP before freezing (it anchors what is trainable "
                "then) or add them to exclude"
            )
        terms: list[Tensor] = []
        for name in self.anchored:
            param = params[name]
            anchor: Tensor = getattr(self, self._buffer_names[name])
            if anchor.shape != param.shape:
                raise ValueError(
                    f"model: parameter {name!r} has shape {tuple(param.shape)} but its anchor "
                    f"{tuple(anchor.shape)}; the layer was replaced after L2SP was built (e.g. "
                    "a new head): exclude it or build L2SP after replacing it"
                )
            if anchor.device != param.device:
                raise ValueError(
                    f"L2SP: parameter {name!r} is on {param.device} but its anchor is on "
                    f"{anchor.device}; move the loss module too (l2sp.to(device))"
                )
            diff = as_compute(param) - anchor.to(compute_dtype(param))
            terms.append(0.5 * self.alpha * (diff * diff).sum())
        for name in self.excluded + [n for n in late if n not in unanchored]:
            weight = as_compute(params[name])
            terms.append(0.5 * self.beta * (weight * weight).sum())
        if not terms:
            first = next(iter(params.values()), None)
            return torch.zeros((), device=None if first is None else first.device)
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()
