"""BatchNorm statistics for domain adaptation: AdaBN and domain-specific BatchNorm.

Much of what a network loses under domain shift sits in its BatchNorm statistics: the
layers normalise target activations with the *source* mean and variance. Two remedies,
the first things to try before any adaptation loss:

* [`adapt_batchnorm`][] (AdaBN, Li et al., 2017): after training, re-estimate every
  BatchNorm layer's running mean and variance on unlabelled target data. No gradient,
  no parameter changes, one pass over the target set.
* [`convert_domain_bn`][] + [`bn_domain`][] (domain-specific BatchNorm, DSBN,
  Chang et al., 2019): during training, source and target batches are normalised with
  their own statistics and each domain keeps its own running statistics; the affine
  scale and shift are shared by default. Evaluate target data under
  ``bn_domain(model, "target")``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._adabn import _batches, _ddp_group, _Moments, _sum_ranks
from ._domain_bn import (
    AffineMode,
    DomainSpecificBatchNorm,
    _check_domain,
    _check_domains,
    enter_block,
    in_block,
    leave_block,
)
from ._public import publish
from ._surgery import find_ddp, unwrap_model
from ._validation import check_module_data, check_option, check_positive
from .freezing._batchnorm import FrozenBatchNorm, _bn_policy

__all__ = [
    "DomainSpecificBatchNorm",
    "adapt_batchnorm",
    "bn_domain",
    "convert_domain_bn",
]

logger = logging.getLogger(__name__)


def convert_domain_bn(
    model: nn.Module,
    domains: Sequence[str] = ("source", "target"),
    *,
    affine: AffineMode = "shared",
) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a [`DomainSpecificBatchNorm`][].

    Works in place (like ``nn.SyncBatchNorm.convert_sync_batchnorm``) and returns the
    model; call it *before* building the optimizer, since the shared affine terms are new
    parameters. Each domain starts from the layer's current statistics (a pretrained
    network's statistics are kept for every domain). Layers that are already
    domain-specific are left alone.

    Frozen layers stay frozen, in either order of the calls: shared affine terms keep the
    ``requires_grad`` of the layer they come from, the per-domain copies of a layer frozen
    with ``tk.freeze(..., bn="eval")`` keep that policy, and a
    [`transferkit.FrozenBatchNorm`][] (``bn="frozen"``) becomes a domain-specific layer
    whose per-domain layers are ``FrozenBatchNorm`` (fixed statistics until
    ``tk.unfreeze``, then one set per domain).

    Args:
        model: the network (or a single BatchNorm layer, then a new module is returned).
        domains: domain names, the first one active at the start.
        affine: ``"shared"`` (default) or ``"separate"`` affine terms per domain.

    Returns:
        The model, with its BatchNorm layers replaced.

    Raises:
        ValueError: the model has no BatchNorm layer, invalid ``domains``/``affine``, or
            ``model`` is a ``DistributedDataParallel`` wrapper (convert before wrapping:
            DDP would never synchronise the new parameters).

    Examples:
        >>> import transferkit as tk
        >>> net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10))
        >>> type(net.features[1]).__name__
        'DomainSpecificBatchNorm'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    names = _check_domains(domains)
    check_option(affine, "affine", ("shared", "separate"))
    if find_ddp(model) is not None:
        raise ValueError(
            "model: convert_domain_bn through DistributedDataParallel would add parameters "
            "(the per-domain layers and shared affine terms) that this DDP never "
            "synchronises, so the ranks would drift apart; convert the bare model before "
            "wrapping it, or convert model.module and wrap it again"
        )
    if isinstance(model, (_BatchNorm, FrozenBatchNorm)):
        return _domain_specific(model, names, affine)
    converted = 0

    def convert(parent: nn.Module) -> None:
        nonlocal converted
        for child_name, child in parent.named_children():
            if isinstance(child, DomainSpecificBatchNorm):
                continue
            if isinstance(child, (_BatchNorm, FrozenBatchNorm)):
                setattr(parent, child_name, _domain_specific(child, names, affine))
                converted += 1
            else:
                convert(child)

    convert(model)
    if not converted and not any(isinstance(m, DomainSpecificBatchNorm) for m in model.modules()):
        raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer to convert")
    logger.debug("convert_domain_bn: %d BatchNorm layers converted", converted)
    return model


def _domain_specific(
    layer: _BatchNorm | FrozenBatchNorm, names: tuple[str, ...], affine: AffineMode
) -> DomainSpecificBatchNorm:
    """The domain-specific version of ``layer``; a FrozenBatchNorm stays frozen per domain."""
    if isinstance(layer, _BatchNorm):
        return DomainSpecificBatchNorm(layer, names, affine=affine)
    trainable = layer.to_batchnorm().requires_grad_(False)
    converted = DomainSpecificBatchNorm(trainable, names, affine=affine)
    for name in names:
        norm = converted.norms[name]
        assert isinstance(norm, _BatchNorm)
        converted.norms[name] = FrozenBatchNorm.from_batchnorm(norm)
    return converted


def _domain_layers(model: nn.Module) -> list[DomainSpecificBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DomainSpecificBatchNorm)]


@contextlib.contextmanager
def bn_domain(model: nn.Module, domain: str) -> Iterator[nn.Module]:
    """Select which domain's BatchNorm statistics ``model`` uses inside the block.

    Every [`DomainSpecificBatchNorm`][] of the model switches to ``domain``; on exit
    (also after an exception) each goes back to the domain it had before. In training
    mode the block's forward passes update that domain's running statistics only.

    Args:
        model: a network converted with [`convert_domain_bn`][].
        domain: one of the domain names of its layers.

    Yields:
        The model.

    Raises:
        ValueError: the model has no domain-specific BatchNorm layer, or ``domain`` is
            not one of its domains.

    Examples:
        >>> import torch, transferkit as tk
        >>> net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10))
        >>> with tk.bn_domain(net, "target"):
        ...     logits = net(torch.randn(4, 1, 16, 16))
        >>> net.features[1].domain
        'source'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = _domain_layers(model)
    if not layers:
        raise ValueError(
            f"model: {type(model).__name__} has no DomainSpecificBatchNorm layer; "
            "call tk.convert_domain_bn(model) first"
        )
    for layer in layers:
        _check_domain(domain, layer.domains)
    previous = [layer.domain for layer in layers]
    try:
        for layer in layers:
            enter_block(layer)
            layer.domain = domain
        yield model
    finally:
        for layer, name in zip(layers, previous, strict=True):
            layer.domain = name
            leave_block(layer)


# --------------------------------------------------------------------------- AdaBN


def _forward_all(
    model: nn.Module,
    target_data: Any,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
) -> int:
    """Run ``model`` on every batch of ``target_data``; return the number of batches."""
    from .device import to_device
    from .features._sources import _cast_floating

    batches, total = _batches(target_data, batch_size, device)
    if progress:
        from tqdm.auto import tqdm

        batches = iter(tqdm(batches, total=total, desc="adapt_batchnorm", unit="batch"))
    seen = 0
    for batch in batches:
        inputs = _cast_floating(to_device(batch, device), dtype)
        if isinstance(inputs, Mapping):
            model(**inputs)
        else:
            model(inputs)
        seen += 1
    return seen


def _raise_if_any_rank_failed(failure: Exception | None, group: Any, device: torch.device) -> None:
    """Every rank learns whether one failed its pass, so no rank waits in the merge."""
    failed = _sum_ranks(int(failure is not None), group, device)
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(
            f"adapt_batchnorm: {failed} other rank(s) failed their pass over target_data "
            "(see their error); the statistics were not merged and are left unchanged"
        )


def _adaptable_norms(model: nn.Module) -> tuple[list[_BatchNorm], int]:
    """BatchNorm layers whose statistics AdaBN re-estimates, and how many frozen ones it skips."""
    skipped_inactive: set[int] = set()
    for module in model.modules():
        if isinstance(module, DomainSpecificBatchNorm):
            for name, layer in module.norms.items():
                if name != module.domain:
                    skipped_inactive.add(id(layer))
    norms = []
    frozen = 0
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm) and id(module) not in skipped_inactive:
            frozen += module.running_mean is not None
            continue
        if not isinstance(module, _BatchNorm) or id(module) in skipped_inactive:
            continue
        if not module.track_running_stats or module.running_mean is None:
            continue  # always normalises with batch statistics: nothing to re-estimate
        if _bn_policy(module) == "eval":
            frozen += 1
            continue
        norms.append(module)
    if frozen:
        logger.info(
            "adapt_batchnorm: %d frozen BatchNorm layers (tk.freeze) keep their statistics", frozen
        )
    return norms, frozen


def _warn_default_domain(model: nn.Module) -> None:
    """Warn when DSBN statistics of the default domain are re-estimated outside bn_domain."""
    layers = [
        layer
        for layer in _domain_layers(model)
        if not in_block(layer) and layer.domain == layer.domains[0]
    ]
    if layers:
        first = layers[0]
        logger.warning(
            "adapt_batchnorm: re-estimating the %r statistics of %d DomainSpecificBatchNorm "
            "layers (their default domain, no bn_domain block is active); for target data "
            "use `with tk.bn_domain(model, %r): tk.adapt_batchnorm(model, data)`",
            first.domain,
            len(layers),
            first.domains[-1],
        )


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    target_data: Any,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> nn.Module:
    """AdaBN: re-estimate every BatchNorm layer's running statistics on target data.

    Li et al. (2017): a network trained on the source domain adapts to a target domain
    by normalising with *target* statistics. This runs ``model`` over ``target_data``
    once, without gradients, with every re-estimated BatchNorm layer in training mode and
    every other module in eval mode (dropout off), and sets each layer's
    ``running_mean`` / ``running_var`` to the mean and unbiased variance of its inputs
    over **all** target samples: a cumulative average (PyTorch's ``momentum=None``)
    weighted by batch size and accumulated in float64. During the pass each layer
    normalises with its batch's statistics (as in training and as a ``momentum=None``
    pass does), so the statistics of a layer's *input* are exact for the first layer and
    depend slightly on the batch size for deeper ones; use batches of at least 64.

    Afterwards every module's train/eval mode and every layer's ``momentum`` are what
    they were before, also when the pass raises (then the running statistics are
    restored too). Parameters are never touched. Layers without running statistics
    (``track_running_stats=False``), layers frozen with ``tk.freeze(..., bn="eval")``
    and [`transferkit.FrozenBatchNorm`][] layers keep their statistics (when every
    layer is frozen, a ValueError says so). In a model converted with
    [`convert_domain_bn`][], only the *active* domain's statistics are re-estimated
    (use ``with tk.bn_domain(model, "target"):``; outside such a block a warning says
    that the first domain's statistics are replaced).

    The pass runs the module inside ``DataParallel``, ``DistributedDataParallel`` and
    ``torch.compile`` wrappers directly (no recompilation, no buffer broadcast per
    batch). Under ``DistributedDataParallel`` with an initialised process group, each
    rank passes its own shard of the target data (e.g. through a
    ``DistributedSampler``) and the ranks' statistics are merged exactly, so every rank
    ends with the statistics of all the shards: call it on every rank.

    Args:
        model: the network; it is updated in place and returned. Inputs are moved to
            the device of its first parameter or buffer and cast to its floating dtype.
        target_data: unlabelled target inputs: a ``Tensor`` or ``ndarray`` (split into
            equal batches of at most ``batch_size``), a ``Dataset`` or a ``DataLoader``
            (its own batches; ``(inputs, labels)`` pairs and dicts with a ``"labels"``
            key are accepted, the labels are ignored), as for
            [`transferkit.extract_features`][].
        batch_size: samples per forward pass for tensors, arrays and Datasets (``>= 2``).
        progress: show a tqdm progress bar.

    Returns:
        ``model``, with target statistics in its BatchNorm layers.

    Raises:
        TypeError: for unsupported model or data types.
        ValueError: for fewer than 2 samples, NaN/inf inputs, a model without BatchNorm
            layers whose statistics can be re-estimated.

    Examples:
        >>> import torch, transferkit as tk
        >>> net = tk.models.SmallCNN(num_classes=10).eval()
        >>> target = torch.rand(64, 1, 16, 16) * 3 + 1
        >>> _ = tk.adapt_batchnorm(net, target)
        >>> net.training, net.features[1].momentum  # mode and momentum are restored
        (False, 0.1)
        >>> conv = net.features[0]
        >>> expected = conv(target).mean(dim=(0, 2, 3))
        >>> torch.allclose(net.features[1].running_mean, expected, atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_module_data(model, "model")
    batch_size = int(check_positive(batch_size, "batch_size", integer=True))
    if batch_size < 2:
        raise ValueError(
            f"batch_size: expected at least 2 (BatchNorm needs two samples), got {batch_size}"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    wrapped, model = model, unwrap_model(model)
    ddp = find_ddp(wrapped)
    norms, frozen = _adaptable_norms(model)
    if not norms:
        because = (
            f"; its {frozen} BatchNorm layers with statistics are frozen (tk.freeze keeps "
            "them fixed): tk.unfreeze them first to re-estimate them"
            if frozen
            else " (GroupNorm, LayerNorm and track_running_stats=False layers have none)"
        )
        raise ValueError(
            f"model: {type(model).__name__} has no BatchNorm layer with running statistics "
            f"to re-estimate{because}"
        )
    _warn_default_domain(model)
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    modes = {module: module.training for module in model.modules()}
    saved = [
        (
            norm.momentum,
            norm.running_mean.clone(),  # type: ignore[union-attr]
            norm.running_var.clone(),  # type: ignore[union-attr]
            None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone(),
        )
        for norm in norms
    ]
    moments = {norm: _Moments() for norm in norms}
    handles = [
        norm.register_forward_pre_hook(lambda module, args: moments[module].update(args[0]))
        for norm in norms
    ]
    finished = False
    try:
        model.eval()
        for norm in norms:
            norm.momentum = None
            norm.training = True
        group = _ddp_group(ddp)
        seen = 0
        failure: Exception | None = None
        try:
            seen = _forward_all(model, target_data, batch_size, device, dtype, progress)
        except Exception as error:
            if group is None:
                raise
            failure = error  # the other ranks must hear of it, or they wait forever
        if group is not None:  # each rank saw its shard: merge, so every rank gets the same
            _raise_if_any_rank_failed(failure, group, device)
            for norm in norms:
                moments[norm].merge_ranks(group, norm.num_features, norm.running_mean.device)  # type: ignore[union-attr]
            seen = _sum_ranks(seen, group, device)
        for norm in norms:
            stats = moments[norm]
            if stats.count < 2 or stats.mean is None or stats.m2 is None:
                raise ValueError(
                    "target_data: a BatchNorm layer saw fewer than 2 values per channel; "
                    "pass more target samples"
                )
            norm.running_mean.copy_(stats.mean.to(norm.running_mean.dtype))  # type: ignore[union-attr]
            var = stats.m2 / (stats.count - 1)
            norm.running_var.copy_(var.to(norm.running_var.dtype))  # type: ignore[union-attr]
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.fill_(seen)
        finished = True
    finally:
        for handle in handles:
            handle.remove()
        for norm, (momentum, mean, var, tracked) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if not finished:
                norm.running_mean.copy_(mean)  # type: ignore[union-attr]
                norm.running_var.copy_(var)  # type: ignore[union-attr]
                if tracked is not None and norm.num_batches_tracked is not None:
                    norm.num_batches_tracked.copy_(tracked)
        for module, mode in modes.items():
            module.training = mode
    logger.debug("adapt_batchnorm: %d layers re-estimated over %d batches", len(norms), seen)
    return wrapped


# pickles and reprs name the public home, not the private file
publish(__name__, globals(), ["DomainSpecificBatchNorm"])
