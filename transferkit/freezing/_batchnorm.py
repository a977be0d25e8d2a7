"""BatchNorm handling for frozen layers: [`FrozenBatchNorm`][] and the ``"eval"`` policy.

A frozen BatchNorm either stays in eval mode whatever ``train()`` calls follow (the
``"eval"`` policy: an instance-level ``train`` and a forward pre-hook, no class patched)
or is replaced by [`FrozenBatchNorm`][], whose statistics and affine terms are buffers.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._domain_bn import DomainSpecificBatchNorm
from .._validation import check_bool, check_positive

BNPolicy = Literal["eval", "train", "frozen"]
_BN_POLICIES: tuple[BNPolicy, ...] = ("eval", "train", "frozen")
_POLICY_ATTR = "_transferkit_bn_policy"
_REPLACEABLE_BN: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
_INPUT_DIMS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


# --------------------------------------------------------------------------- FrozenBatchNorm


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all stored as buffers.

    A drop-in replacement for ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` that always
    normalises with the running statistics, whatever the module's mode. Its state-dict
    keys are those of the layer it replaces (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so checkpoints load either way. It has no
    parameters, so no optimizer, weight decay or DDP gradient bucket ever sees it.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for numerical stability.
        affine: whether ``weight``/``bias`` exist (as buffers).
        track_running_stats: whether ``running_mean``/``running_var`` exist; without them
            the layer normalises with batch statistics (as the original would in eval mode).
        bn_class: the BatchNorm class it replaces; [`to_batchnorm`][] restores it and
            the forward pass checks the input rank it expects.

    Shape:
        - Input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, as the
          replaced class accepts.
        - Output: same shape as the input.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> bn = nn.BatchNorm2d(3)
        >>> frozen = FrozenBatchNorm.from_batchnorm(bn).train()
        >>> frozen(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
        >>> sorted(frozen.state_dict()) == sorted(bn.state_dict())
        True
        >>> len(list(frozen.parameters()))
        0
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        bn_class: type[_BatchNorm] = nn.BatchNorm2d,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        check_positive(num_features, "num_features", integer=True)
        check_positive(eps, "eps")
        if not (isinstance(bn_class, type) and issubclass(bn_class, _BatchNorm)):
            raise TypeError(f"bn_class: expected a BatchNorm class, got {bn_class!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.bn_class = bn_class
        self.momentum = momentum
        self.register_buffer("weight", torch.ones(num_features) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features) if affine else None)
        stats = track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features) if stats else None)
        self.register_buffer("running_var", torch.ones(num_features) if stats else None)
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long) if stats else None
        )

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> FrozenBatchNorm:
        """Build a frozen copy of ``bn`` (values copied, detached, same device and dtype).

        Examples:
            >>> FrozenBatchNorm.from_batchnorm(nn.BatchNorm1d(4))
            FrozenBatchNorm(4, eps=1e-05, bn_class=BatchNorm1d)
        """
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats and bn.running_mean is not None,
            bn_class=type(bn),
            momentum=bn.momentum,
        )
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(bn, name, None)
                if source is not None and getattr(frozen, name) is not None:
                    setattr(frozen, name, source.detach().clone())
        frozen.training = bn.training
        return frozen

    def to_batchnorm(self) -> _BatchNorm:
        """Return a trainable BatchNorm of the original class holding the same values.

        Examples:
            >>> frozen = FrozenBatchNorm(4, bn_class=nn.BatchNorm1d)
            >>> type(frozen.to_batchnorm()).__name__
            'BatchNorm1d'
        """
        bn = self.bn_class(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
        )
        reference = next(iter(t for t in self.buffers() if t.is_floating_point()), None)
        if reference is not None:
            bn = bn.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                source = getattr(self, name)
                target = getattr(bn, name, None)
                if source is not None and target is not None:
                    target.copy_(source)
        bn.train(self.training)
        return bn

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with the stored statistics."""
        allowed = _INPUT_DIMS.get(self.bn_class)
        if (allowed is None and x.dim() < 2) or (allowed is not None and x.dim() not in allowed):
            want = " or ".join(f"{d}-D" for d in allowed) if allowed else "at least 2-D"
            raise ValueError(
                f"input: {self.bn_class.__name__} expects a {want} tensor, got shape "
                f"{tuple(x.shape)}"
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.running_mean is None,
            momentum=0.0,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        """``num_features, eps, bn_class``."""
        return f"{self.num_features}, eps={self.eps}, bn_class={self.bn_class.__name__}"


# --------------------------------------------------------------------------- BN "eval" policy


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a BatchNorm under the "eval" policy always runs in eval mode."""
    if module.training:
        module.training = False


class _EvalOnlyTrain:
    """Instance-level ``train``: a frozen BatchNorm ignores ``model.train()``.

    Stored in the module instance's ``__dict__`` (never on the class), so only the layers
    that [`freeze`][] selected are affected; it survives ``copy.deepcopy`` and pickling.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        self.module.training = False
        return self.module


def _bn_policy(module: nn.Module) -> str:
    if isinstance(module, FrozenBatchNorm):
        return "frozen"
    return "eval" if vars(module).get(_POLICY_ATTR) == "eval" else "train"


def _set_eval_policy(module: nn.Module) -> None:
    if vars(module).get(_POLICY_ATTR) != "eval":
        vars(module)[_POLICY_ATTR] = "eval"
        vars(module)["train"] = _EvalOnlyTrain(module)
        module.register_forward_pre_hook(_keep_eval)
    module.training = False


def _clear_eval_policy(module: nn.Module, training: bool) -> None:
    if vars(module).pop(_POLICY_ATTR, None) is not None:
        vars(module).pop("train", None)
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _keep_eval]:
            del hooks[key]
    module.training = training


def _is_bn_like(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, FrozenBatchNorm))


def _bn_class(module: nn.Module) -> type[nn.Module]:
    """The BatchNorm class a layer stands for (a DSBN: that of its per-domain layers)."""
    if isinstance(module, DomainSpecificBatchNorm):
        return _bn_class(next(iter(module.norms.values())))
    return module.bn_class if isinstance(module, FrozenBatchNorm) else type(module)


def _holds_bn_affine(module: nn.Module) -> bool:
    """Whether ``module``'s own ``weight``/``bias`` are BatchNorm affine terms.

    True for BatchNorm layers and for the shared affine terms of a
    ``DomainSpecificBatchNorm`` (``train_bn`` keeps both trainable).
    """
    return isinstance(module, (_BatchNorm, DomainSpecificBatchNorm))
