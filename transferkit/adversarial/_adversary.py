"""What every adversarial loss does with its adversary network and its inputs.

An adversary (the DANN/CDAN discriminator, MDD's adversarial head) sits behind a
gradient reversal layer, runs in its own parameters' dtype whatever the dtype of the
features, and sees ``(logits, features)`` pairs that must agree in samples and device.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._validation import check_features, check_module_data
from ._reversal import GradientReversal


def adversary_and_grl(
    adversary: object, name: str, grl: object, default_coeff: float
) -> tuple[nn.Module, GradientReversal]:
    """Check the constructor arguments shared by the losses; default the reversal layer.

    Raises:
        TypeError: ``adversary`` is not an ``nn.Module`` or ``grl`` not a
            ``GradientReversal`` (or ``None``).
    """
    if not isinstance(adversary, nn.Module):
        raise TypeError(f"{name}: expected an nn.Module, got {type(adversary).__name__}")
    if grl is not None and not isinstance(grl, GradientReversal):
        raise TypeError(
            f"grl: expected a GradientReversal or None, got {type(grl).__name__}; "
            "wrap a schedule as GradientReversal(WarmStartSchedule(...))"
        )
    return adversary, grl if grl is not None else GradientReversal(default_coeff)


def run_adversary(adversary: nn.Module, name: str, inputs: Tensor) -> object:
    """``adversary(inputs)`` with ``inputs`` cast to the adversary's parameter dtype.

    Features may come in any floating dtype (fp16/bf16 from autocast or a half model,
    fp64 in tests): the adversary gets them in its own parameters' dtype, and the cast
    sends gradients back in the features' dtype. The caller checks the output.
    """
    check_module_data(adversary, name)
    param = next((p for p in adversary.parameters() if p.is_floating_point()), None)
    if param is not None and param.dtype != inputs.dtype:
        inputs = inputs.to(param.dtype)
    out: object = adversary(inputs)
    return out


def check_predictions(logits: Tensor, features: Tensor, prefix: str) -> None:
    """``{prefix}_logits`` and ``{prefix}_features``: 2-D, finite, same samples and device."""
    check_features(logits, f"{prefix}_logits")
    check_features(features, f"{prefix}_features")
    if logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"{prefix}_logits and {prefix}_features: expected the same number of samples, "
            f"got {logits.shape[0]} and {features.shape[0]}"
        )
    if logits.device != features.device:
        raise ValueError(
            f"{prefix}_logits and {prefix}_features: expected tensors on the same device, "
            f"got {logits.device} and {features.device}"
        )
