"""What trains: freezing policies, BatchNorm handling, parameter groups, gradual unfreezing.

Freezing a pretrained backbone goes wrong in a few well-known ways, and every function
here is built to rule them out:

* BatchNorm running statistics keep moving in "frozen" layers after ``model.train()``.
  [`freeze`][] with ``bn="eval"`` (the default) keeps frozen BatchNorm layers in eval
  mode whatever ``train()``/``eval()`` calls follow; ``bn="frozen"`` replaces them by
  [`FrozenBatchNorm`][], whose statistics and affine terms are buffers.
* Frozen parameters still move through momentum or weight decay. [`freeze`][] sets
  ``requires_grad=False`` *and* clears ``.grad``: every torch optimizer skips parameters
  whose gradient is ``None``, so nothing moves even if they were handed to an optimizer.
  [`param_groups`][] never hands them over in the first place.
* Parameters unfrozen after the optimizer was built never train.
  [`GradualUnfreezing`][] adds them to the live optimizer as new parameter groups.
* A resumed run silently freezes a different set. [`GradualUnfreezing.load_state_dict`][]
  re-applies the stage's freezing.
* Layer-wise learning-rate decay ignored by schedulers: [`param_groups`][] writes the
  decay into real per-group ``lr`` values, which every torch scheduler scales.
* Unfrozen groups that break the lr scheduler or drop the user's settings:
  [`GradualUnfreezing`][] puts new groups on the schedule (``scheduler=``, see
  [`transferkit.schedules`][]) and gives them the weight decay, no-decay split and
  layer-wise lr decay of the existing groups, not the optimizer's defaults.
* DDP "unused parameters" errors and ranks drifting apart. Freezing *before* wrapping
  with ``DistributedDataParallel`` always works (frozen parameters are never registered).
  To freeze or unfreeze *after* wrapping, build DDP with every parameter trainable and
  ``find_unused_parameters=True``; [`freeze`][], [`unfreeze`][] and
  [`GradualUnfreezing`][] accept the wrapper (patterns mean the same as on the bare
  model: the ``module.`` prefix is not part of the names) and raise a clear error when the
  wrapper was built in a way that would fail or desynchronise the ranks.

Parameter names are the qualified names of ``model.named_parameters()``. A glob pattern
selects a parameter when it matches its name, or the name of a module that holds it:
``"fc"`` and ``"fc*"`` both select ``fc.weight`` and ``fc.bias``, ``"*.bias"`` every bias.
"""

from __future__ import annotations

from .._public import publish
from ._batchnorm import BNPolicy as BNPolicy
from ._batchnorm import FrozenBatchNorm
from ._batchnorm import _EvalOnlyTrain as _EvalOnlyTrain  # published below (pickles)
from ._batchnorm import _keep_eval as _keep_eval  # published below (pickles)
from ._blocks import trainable_summary
from ._freeze import freeze, unfreeze
from ._gradual import GradualUnfreezing
from ._param_groups import param_groups

__all__ = [
    "FrozenBatchNorm",
    "GradualUnfreezing",
    "freeze",
    "param_groups",
    "trainable_summary",
    "unfreeze",
]

# Public objects report the package as their module (see transferkit._public). The
# BatchNorm "eval" policy's hook and train() replacement live inside models pickled with
# torch.save(model), so they keep their old home (transferkit.freezing) too.
publish(__name__, globals(), [*__all__, "_EvalOnlyTrain", "_keep_eval"])
