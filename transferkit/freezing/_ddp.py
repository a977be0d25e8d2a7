"""Checks that freezing through a ``DistributedDataParallel`` wrapper cannot fail or drift."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

logger = logging.getLogger("transferkit.freezing")

_DDP_PATTERN = (
    "build DistributedDataParallel with every parameter trainable and "
    "find_unused_parameters=True, then freeze/unfreeze through the wrapper; or freeze "
    "before wrapping (the frozen parameters are then never synchronised)"
)


def _check_ddp_dynamic(ddp: nn.parallel.DistributedDataParallel, caller: str) -> None:
    """Changing ``requires_grad`` after wrapping needs DDP's unused-parameter search."""
    if not getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False):
        raise ValueError(
            f"model: {caller} changes which parameters train, but this DistributedDataParallel "
            "was built with find_unused_parameters=False (or static_graph=True): it would wait "
            "for gradients that never come and fail at the next step with an "
            f"'unused parameters' error. Either {_DDP_PATTERN}."
        )


def _check_ddp_synced(
    ddp: nn.parallel.DistributedDataParallel,
    params: Iterable[tuple[str, nn.Parameter]],
    caller: str,
) -> None:
    """Raise unless DDP synchronises the gradients of every parameter in ``params``.

    DDP registers only the parameters that require grad when it is built; a parameter
    unfrozen later would train on each rank's own gradient and drift apart silently.
    """
    _check_ddp_dynamic(ddp, caller)
    module_params: list[nn.Parameter] = list(getattr(ddp, "_module_parameters", []))
    known = {id(p) for p in module_params}
    unknown = [name for name, p in params if id(p) not in known]
    if unknown:
        raise ValueError(
            f"model: {caller} cannot make {unknown[:3]} trainable through DistributedDataParallel:"
            " they did not exist when DDP was built (e.g. a FrozenBatchNorm turned back into "
            "BatchNorm), so DDP would never synchronise their gradients. Use bn='eval' (not "
            f"'frozen') with a DDP model, or re-wrap the model afterwards."
        )
    try:
        registered = int(ddp._get_ddp_logging_data()["num_parameter_tensors"])  # type: ignore[no-untyped-call]
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        logger.warning(
            "%s: cannot check which parameters DistributedDataParallel synchronises", caller
        )
        return
    if registered < len(known):
        raise ValueError(
            f"model: {caller} through DistributedDataParallel needs every parameter to have "
            f"been trainable when DDP was built; DDP synchronises only {registered} of "
            f"{len(known)} parameter tensors (the rest were frozen at wrap time), so unfrozen "
            f"ones would drift apart across ranks. Either {_DDP_PATTERN}, or re-wrap the "
            "model after unfreezing."
        )
