"""``make_deep_svm_pipeline``: model to SVM."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .._validation import check_bool, check_option
from ._align import CORAL, SubspaceAlignment
from ._deep_features import DeepFeatures
from ._svc import TorchKernelSVC
from ._tca import TCA

_ALIGNERS: dict[str, Callable[[], BaseEstimator]] = {
    "coral": CORAL,
    "tca": TCA,
    "subspace": SubspaceAlignment,
}


def make_deep_svm_pipeline(
    model: torch.nn.Module,
    *,
    layers: str | Sequence[str] | None = None,
    align: Literal["coral", "tca", "subspace"] | BaseEstimator | None = None,
    scale: bool = True,
    feature_params: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    **svc_params: Any,
) -> Pipeline:
    """Model -> deep features -> (standardise) -> (domain alignment) -> kernel SVM.

    The steps are named ``"features"`` ([`DeepFeatures`][]), ``"scale"``
    (``StandardScaler``), ``"align"`` and ``"svc"`` ([`TorchKernelSVC`][]), so grid
    searches address ``svc__C``, ``align__mu``, ... With ``align``, fit the pipeline on
    source and target rows stacked, target rows labelled ``-1`` (or the ``unlabelled``
    marker of an aligner you pass, e.g. ``CORAL(unlabelled="target")``): the SVM gets
    the aligner's marker as its ``unlabelled`` and learns from the labelled rows only.

    Args:
        model: the torch feature extractor.
        layers: layer name(s) to take features from (``None``: the model's output).
        align: ``"coral"``, ``"tca"``, ``"subspace"``, a transformer, or ``None``.
        scale: standardise the features (fitted on all rows, both domains).
        feature_params: more [`DeepFeatures`][] arguments (``batch_size``,
            ``device``, ``input_shape``, ``input_transform``, ``pool``, ...).
        tokenizer: [`DeepFeatures`][]' ``tokenizer``: with it the pipeline takes raw
            texts (a Hugging Face encoder + SVM in one pipeline).
        max_length: [`DeepFeatures`][]' ``max_length`` (tokens kept per text).
        cache: [`DeepFeatures`][]' ``cache`` folder (features computed once per input).
        **svc_params: [`TorchKernelSVC`][] arguments (``C``, ``kernel``, ...).

    Returns:
        An unfitted ``sklearn.pipeline.Pipeline``.

    Raises:
        ValueError: for an unknown ``align`` name, a [`DeepFeatures`][] argument
            given both by keyword and in ``feature_params``, or an SVM ``unlabelled``
            that differs from the aligner's.

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> pipe = make_deep_svm_pipeline(net, align="coral", C=10.0)
        >>> [name for name, _ in pipe.steps]
        ['features', 'scale', 'align', 'svc']

        With a Hugging Face encoder: ``make_deep_svm_pipeline(AutoModel.from_pretrained(
        path), tokenizer=AutoTokenizer.from_pretrained(path), cache="features/")`` takes
        a list of texts in ``fit``/``predict`` (see ``docs/guides/sklearn.md``).
    """
    check_bool(scale, "scale")
    extra = dict(feature_params or {})
    named = {"tokenizer": tokenizer, "max_length": max_length, "cache": cache}
    for key, value in named.items():
        if value is not None:
            if key in extra:
                raise ValueError(f"{key}: given both as a keyword and in feature_params")
            extra[key] = value
    steps: list[tuple[str, Any]] = [("features", DeepFeatures(model, layers=layers, **extra))]
    if scale:
        steps.append(("scale", StandardScaler()))
    if align is not None:
        aligner = (
            _ALIGNERS[check_option(align, "align", tuple(_ALIGNERS))]()
            if isinstance(align, str)
            else align
        )
        steps.append(("align", aligner))
        # The SVM skips the rows the aligner takes as the target domain: with another
        # marker it would learn the target rows as one more class.
        marker = _unlabelled_marker(aligner)
        if "unlabelled" in svc_params and not _same_marker(svc_params["unlabelled"], marker):
            raise ValueError(
                f"unlabelled: the SVM's {svc_params['unlabelled']!r} differs from the "
                f"aligner's {marker!r}; the target rows would be learnt as a class. Give "
                "the marker to the aligner only (the SVM takes the aligner's)"
            )
        svc_params.setdefault("unlabelled", marker)
    steps.append(("svc", TorchKernelSVC(**svc_params)))
    return Pipeline(steps)


def _unlabelled_marker(aligner: Any) -> Any:
    """The label by which ``aligner`` recognises target rows (``-1`` if it has none)."""
    get_params = getattr(aligner, "get_params", None)
    params = get_params(deep=False) if callable(get_params) else {}
    return params.get("unlabelled", -1)


def _same_marker(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. an array-valued comparison
        return False
