"""Bad-input sweep: every public callable, given bad input, raises a clear error.

Each row of ``CASES`` calls one public function or class of transferkit with one bad
input (wrong type or shape, mismatched dimensions, NaN/inf, empty or single-sample
batches, meta-device tensors, non-bool flags, unknown option names) and expects a
``ValueError``/``TypeError`` whose message starts with the name of the argument at fault
(the ``"argname: expected ..., got ..."`` style of ``transferkit._validation``).

``test_every_public_callable_has_bad_input_rows`` enumerates the public API (every
public submodule's ``__all__`` and ``transferkit.__all__``): a public callable must have
rows here or sit in ``EXEMPT`` with the reason. A new public name without either fails
that test with a message saying what to add.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit import (
    adversarial,
    augment,
    averaging,
    batchnorm,
    datasets,
    device,
    distributed,
    features,
    freezing,
    kernels,
    losses,
    meta,
    metrics,
    models,
    recipes,
    schedules,
    selection,
    self_training,
    training,
)
from transferkit import sklearn as tk_sklearn

plot = pytest.importorskip("transferkit.plot")


@dataclass(frozen=True)
class Case:
    """One bad call: ``call()`` must raise ``error`` with a message matching ``names``."""

    target: str  # "module.name" of the public callable under test
    label: str
    call: Callable[[], object]
    error: type[Exception]
    names: str  # regex matched at the start of the message: the argument(s) at fault


CASES: list[Case] = []


def add(target: str, label: str, call: Callable[[], object], error: type[Exception], names: str):
    CASES.append(Case(target, label, call, error, names))


def rows(target: str, table: list[tuple[str, Callable[[], object], type[Exception], str]]) -> None:
    for label, call, error, names in table:
        add(target, label, call, error, names)


# --------------------------------------------------------------------------- inputs


def feats(n: int = 6, d: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[1] = value
    return x


META = torch.empty(6, 3, device="meta")
NAN = float("nan")
INF = float("inf")


def tensor_rows(
    target: str, call: Callable[[torch.Tensor], object], name: str, *, n: int = 6, d: int = 3
) -> None:
    """Bad values for one floating ``(N, D)`` tensor argument named ``name``."""
    rows(
        target,
        [
            (f"{name} not a tensor", lambda: call(feats(n, d).tolist()), TypeError, name),
            (f"{name} 1-D", lambda: call(feats(n, d)[:, 0]), ValueError, name),
            (f"{name} NaN", lambda: call(with_value(feats(n, d), NAN)), ValueError, name),
            (f"{name} inf", lambda: call(with_value(feats(n, d), INF)), ValueError, name),
            (f"{name} integer", lambda: call(feats(n, d).long()), TypeError, name),
            (f"{name} meta", lambda: call(torch.empty(n, d, device="meta")), ValueError, name),
            (f"{name} empty", lambda: call(feats(n, d)[:0]), ValueError, name),
        ],
    )


def pair_rows(
    target: str,
    call: Callable[[torch.Tensor, torch.Tensor], object],
    names: tuple[str, str] = ("source", "target"),
    *,
    min_samples: int = 1,
) -> None:
    """Bad values for a pair of feature matrices (each alone, and the two together)."""
    first, second = names
    tensor_rows(target, lambda x: call(x, feats(5, 3, seed=1)), first)
    tensor_rows(target, lambda x: call(feats(6, 3), x), second)
    rows(
        target,
        [
            (
                "feature dimensions differ",
                lambda: call(feats(6, 3), feats(5, 4, seed=1)),
                ValueError,
                f"({first} and )?{second}",
            ),
            (
                "dtypes differ",
                lambda: call(feats(6, 3), feats(5, 3, seed=1).double()),
                TypeError,
                f"{first} and {second}",
            ),
        ],
    )
    if min_samples > 1:
        add(target, "single sample", lambda: call(feats(1, 3), feats(5, 3)), ValueError, first)


def logits_rows(target: str, call: Callable[[torch.Tensor], object], name: str) -> None:
    tensor_rows(target, call, name, n=6, d=4)


def positive_rows(
    target: str, make: Callable[[Any], object], name: str, *, integer: bool = False
) -> None:
    """A positive-number argument: negative, NaN, a string, a bool (and 1.5 for integers)."""
    table: list[tuple[str, Callable[[], object], type[Exception], str]] = [
        (f"{name}=-1", lambda: make(-1), ValueError, name),
        (f"{name}='1'", lambda: make("1"), TypeError, name),
        (f"{name}=True", lambda: make(True), TypeError, name),
    ]
    if integer:
        table.append((f"{name}=1.5", lambda: make(1.5), TypeError, name))
    else:
        table.append((f"{name}=nan", lambda: make(NAN), ValueError, name))
    rows(target, table)


def option_rows(target: str, make: Callable[[Any], object], name: str) -> None:
    rows(target, [(f"{name} unknown", lambda: make("no-such-option"), ValueError, name)])


def flag_rows(target: str, make: Callable[[Any], object], name: str) -> None:
    """A bool flag given truthy stand-ins: each must be refused, naming the flag."""
    rows(
        target,
        [
            (f'{name}="no"', lambda: make("no"), TypeError, name),
            (f"{name}=1", lambda: make(1), TypeError, name),
        ],
    )


def module_rows(target: str, make: Callable[[Any], object], name: str) -> None:
    add(target, f"{name} not a module", lambda: make("resnet"), TypeError, name)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def images(n: int = 4, c: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0))


def labels(n: int = 6, classes: int = 2) -> torch.Tensor:
    return torch.arange(n) % classes


def _u8(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.uint8)


# --------------------------------------------------------------------------- kernels

for kernel_name, kernel in [
    ("GaussianKernel", kernels.GaussianKernel()),
    ("LaplacianKernel", kernels.LaplacianKernel()),
    ("LinearKernel", kernels.LinearKernel()),
    ("PolynomialKernel", kernels.PolynomialKernel()),
]:
    pair_rows(f"kernels.{kernel_name}", kernel, ("x", "y"))
positive_rows("kernels.GaussianKernel", lambda v: kernels.GaussianKernel(bandwidth=v), "bandwidth")
positive_rows(
    "kernels.GaussianKernel", lambda v: kernels.GaussianKernel(multipliers=(1.0, v)), "multipliers"
)
add(
    "kernels.GaussianKernel",
    "multipliers empty",
    lambda: kernels.GaussianKernel(multipliers=()),
    ValueError,
    "multipliers",
)
positive_rows(
    "kernels.LaplacianKernel", lambda v: kernels.LaplacianKernel(bandwidth=v), "bandwidth"
)
positive_rows(
    "kernels.PolynomialKernel", lambda v: kernels.PolynomialKernel(degree=v), "degree", integer=True
)
positive_rows("kernels.PolynomialKernel", lambda v: kernels.PolynomialKernel(gamma=v), "gamma")
add(
    "kernels.PolynomialKernel",
    "coef0 nan",
    lambda: kernels.PolynomialKernel(coef0=NAN),
    ValueError,
    "coef0",
)
pair_rows("kernels.pairwise_squared_distances", kernels.pairwise_squared_distances, ("x", "y"))
pair_rows("kernels.gram", lambda x, y: kernels.gram(x, y, kernels.LinearKernel()), ("x", "y"))
positive_rows(
    "kernels.gram",
    lambda v: kernels.gram(feats(), None, kernels.LinearKernel(), chunk_size=v),
    "chunk_size",
    integer=True,
)
rows(
    "kernels.gram",
    [
        ("kernel a string", lambda: kernels.gram(feats(), None, "rbf"), TypeError, "kernel"),
        (
            "kernel returns a wrong shape",
            lambda: kernels.gram(feats(), None, lambda a, b: a),
            ValueError,
            "kernel",
        ),
        (
            "out of the wrong shape",
            lambda: kernels.gram(feats(), None, kernels.LinearKernel(), out=torch.empty(6, 5)),
            ValueError,
            "out",
        ),
        (
            "out not a tensor",
            lambda: kernels.gram(feats(), None, kernels.LinearKernel(), out=[[0.0]]),
            TypeError,
            "out",
        ),
        (
            "values beyond fp32",
            lambda: kernels.gram(feats() * 1e20, None, kernels.LinearKernel()),
            ValueError,
            "x and y",
        ),
    ],
)
add(
    "kernels.pairwise_squared_distances",
    "squared distances beyond fp32",
    lambda: kernels.pairwise_squared_distances(feats() * 1e20),
    ValueError,
    "x and y",
)
add(
    "kernels.LinearKernel",
    "kernel values beyond fp32",
    lambda: kernels.LinearKernel()(feats() * 1e20, feats() * 1e20),
    ValueError,
    "x and y",
)

# --------------------------------------------------------------------------- losses

for estimator in ("biased", "unbiased", "linear"):
    pair_rows(
        "losses.mmd",
        lambda s, t, e=estimator: losses.mmd(s, t, estimator=e),
        min_samples=1 if estimator == "biased" else 2,
    )
option_rows("losses.mmd", lambda v: losses.mmd(feats(), feats(seed=1), estimator=v), "estimator")
add(
    "losses.mmd",
    "kernel is a string",
    lambda: losses.mmd(feats(), feats(seed=1), kernel="rbf"),  # type: ignore[arg-type]
    TypeError,
    "kernel",
)
add(
    "losses.mmd",
    "source_weights of the wrong length",
    lambda: losses.mmd(feats(), feats(seed=1), source_weights=torch.ones(5)),
    ValueError,
    "source_weights",
)
add(
    "losses.mmd",
    "negative target_weights",
    lambda: losses.mmd(feats(), feats(seed=1), target_weights=-torch.ones(6)),
    ValueError,
    "target_weights",
)
positive_rows(
    "losses.mmd",
    lambda v: losses.mmd(feats(), feats(seed=1), chunk_size=v),
    "chunk_size",
    integer=True,
)
add(
    "losses.mmd",
    "linear kernel values beyond fp32",
    lambda: losses.mmd(feats() * 1e20, feats(seed=1) * 1e20, kernels.LinearKernel()),
    ValueError,
    "source and target",
)
pair_rows("losses.MMDLoss", losses.MMDLoss())
option_rows("losses.MMDLoss", lambda v: losses.MMDLoss(estimator=v), "estimator")
module_rows("losses.MMDLoss", lambda v: losses.MMDLoss(kernel=v), "kernel")
positive_rows("losses.MMDLoss", lambda v: losses.MMDLoss(chunk_size=v), "chunk_size", integer=True)
pair_rows("losses.coral", losses.coral, min_samples=2)
add(
    "losses.coral",
    "CORAL loss beyond fp32",
    lambda: losses.coral(feats() * 1e20, feats(seed=1) * 1e20),
    ValueError,
    "source and target",
)
pair_rows("losses.CORALLoss", losses.CORALLoss(), min_samples=2)
pair_rows(
    "losses.joint_mmd",
    lambda s, t: losses.joint_mmd([s], [t], [kernels.GaussianKernel()]),
    ("source\\[0\\]", "target\\[0\\]"),
)
rows(
    "losses.joint_mmd",
    [
        (
            "layers and kernels differ in number",
            lambda: losses.joint_mmd([feats()], [feats(seed=1)], [kernels.GaussianKernel()] * 2),
            ValueError,
            "source, target and kernels",
        ),
        (
            "a tensor instead of a list of layers",
            lambda: losses.joint_mmd(feats(), [feats(seed=1)], [kernels.GaussianKernel()]),
            TypeError,
            "source",
        ),
        (
            "batch sizes differ across layers",
            lambda: losses.joint_mmd(
                [feats(), feats(5)], [feats(seed=1), feats(6)], [kernels.LinearKernel()] * 2
            ),
            ValueError,
            "source\\[1\\] and target\\[1\\]",
        ),
        (
            "unknown estimator",
            lambda: losses.joint_mmd(
                [feats()], [feats(seed=1)], [kernels.LinearKernel()], "median"
            ),
            ValueError,
            "estimator",
        ),
    ],
)
pair_rows(
    "losses.JointMMDLoss",
    lambda s, t: losses.JointMMDLoss([kernels.GaussianKernel()])([s], [t]),
    ("source\\[0\\]", "target\\[0\\]"),
)
rows(
    "losses.JointMMDLoss",
    [
        ("kernels empty", lambda: losses.JointMMDLoss([]), TypeError, "kernels"),
        (
            "kernels[1] not a kernel",
            lambda: losses.JointMMDLoss([kernels.LinearKernel(), "rbf"]),
            TypeError,
            "kernels\\[1\\]",
        ),
    ],
)
option_rows(
    "losses.JointMMDLoss", lambda v: losses.JointMMDLoss([kernels.LinearKernel()], v), "estimator"
)
positive_rows(
    "losses.JointMMDLoss",
    lambda v: losses.JointMMDLoss([kernels.LinearKernel()], chunk_size=v),
    "chunk_size",
    integer=True,
)
positive_rows(
    "losses.joint_mmd",
    lambda v: losses.joint_mmd([feats()], [feats(seed=1)], [kernels.LinearKernel()], chunk_size=v),
    "chunk_size",
    integer=True,
)
pair_rows(
    "losses.distillation",
    losses.distillation,
    ("student_logits", "teacher_logits"),
)
positive_rows(
    "losses.distillation",
    lambda v: losses.distillation(feats(), feats(seed=1), temperature=v),
    "temperature",
)
logits_rows("losses.entropy", losses.entropy, "logits")
tensor_rows("losses.bss", losses.bss, "features")
positive_rows("losses.bss", lambda v: losses.bss(feats(), k=v), "k", integer=True)
add("losses.bss", "k above min(N, D)", lambda: losses.bss(feats(), k=4), ValueError, "k")
logits_rows("losses.mcc", losses.mcc, "target_logits")
positive_rows("losses.mcc", lambda v: losses.mcc(feats(), temperature=v), "temperature")
logits_rows("losses.MCCLoss", losses.MCCLoss(), "target_logits")
positive_rows("losses.MCCLoss", lambda v: losses.MCCLoss(temperature=v), "temperature")
logits_rows("losses.bnm", losses.bnm, "logits")
logits_rows("losses.BNMLoss", losses.BNMLoss(), "logits")
tensor_rows("losses.adaptive_feature_norm", losses.adaptive_feature_norm, "features")
positive_rows(
    "losses.adaptive_feature_norm",
    lambda v: losses.adaptive_feature_norm(feats(), delta=v),
    "delta",
)
rows(
    "losses.mcc",
    [
        ("a single sample", lambda: losses.mcc(feats(1, 4)), ValueError, "target_logits"),
        ("one class", lambda: losses.mcc(feats(6, 1)), ValueError, "target_logits"),
    ],
)
rows(
    "losses.bnm",
    [
        ("a single sample", lambda: losses.bnm(feats(1, 4)), ValueError, "logits"),
        ("one class", lambda: losses.bnm(feats(6, 1)), ValueError, "logits"),
    ],
)
positive_rows(
    "losses.adaptive_feature_norm",
    lambda v: losses.adaptive_feature_norm(feats(), radius=v),
    "radius",
)
rows(
    "losses.adaptive_feature_norm",
    [
        (
            "delta and radius both",
            lambda: losses.adaptive_feature_norm(feats(), delta=1.0, radius=2.0),
            ValueError,
            "delta and radius",
        ),
        (
            "hard AFN value overflows fp32",
            lambda: losses.adaptive_feature_norm(feats() * 1e20, radius=2.0),
            ValueError,
            "features",
        ),
    ],
)
tensor_rows("losses.AdaptiveFeatureNormLoss", losses.AdaptiveFeatureNormLoss(), "features")
positive_rows(
    "losses.AdaptiveFeatureNormLoss", lambda v: losses.AdaptiveFeatureNormLoss(radius=v), "radius"
)
module_rows("losses.L2SP", lambda v: losses.L2SP(v), "model")
positive_rows("losses.L2SP", lambda v: losses.L2SP(net(), alpha=v), "alpha")
rows(
    "losses.L2SP",
    [
        ("exclude holds an int", lambda: losses.L2SP(net(), exclude=[1]), TypeError, "exclude"),
        (
            "exclude matches nothing",
            lambda: losses.L2SP(net(), exclude=["fc"]),
            ValueError,
            "exclude",
        ),
    ],
)

# --------------------------------------------------------------------------- adversarial


def dann(**kwargs: Any) -> adversarial.DomainAdversarialLoss:
    torch.manual_seed(0)
    return adversarial.DomainAdversarialLoss(adversarial.DomainDiscriminator(3, hidden=8), **kwargs)


pair_rows("adversarial.DomainAdversarialLoss", lambda s, t: dann()(s, t))
module_rows(
    "adversarial.DomainAdversarialLoss",
    lambda v: adversarial.DomainAdversarialLoss(v),
    "discriminator",
)
rows(
    "adversarial.DomainAdversarialLoss",
    [
        ("grl is a float", lambda: dann(grl=1.0), TypeError, "grl"),
        (
            "source_weights too short",
            lambda: dann()(feats(), feats(seed=1), source_weights=torch.ones(2)),
            ValueError,
            "source_weights",
        ),
        (
            "target_weights negative",
            lambda: dann()(feats(), feats(seed=1), target_weights=-torch.ones(6)),
            ValueError,
            "target_weights",
        ),
    ],
)


def cdan(**kwargs: Any) -> adversarial.ConditionalDomainAdversarialLoss:
    torch.manual_seed(0)
    return adversarial.ConditionalDomainAdversarialLoss(
        adversarial.DomainDiscriminator(12, hidden=8), num_classes=4, feature_dim=3, **kwargs
    )


pair_rows(
    "adversarial.ConditionalDomainAdversarialLoss",
    lambda s, t: cdan()(feats(6, 4), s, feats(5, 4, seed=1), t),
    ("source_features", "target_features"),
)
tensor_rows(
    "adversarial.ConditionalDomainAdversarialLoss",
    lambda g: cdan()(g, feats(6, 3), feats(6, 4), feats(6, 3)),
    "source_logits",
    d=4,
)
flag_rows(
    "adversarial.ConditionalDomainAdversarialLoss",
    lambda v: cdan(entropy_conditioning=v),
    "entropy_conditioning",
)
flag_rows(
    "adversarial.ConditionalDomainAdversarialLoss", lambda v: cdan(randomized=v), "randomized"
)
rows(
    "adversarial.ConditionalDomainAdversarialLoss",
    [
        (
            "logits with the wrong class count",
            lambda: cdan()(feats(6, 5), feats(6, 3), feats(6, 5), feats(6, 3)),
            ValueError,
            "source_logits",
        ),
        (
            "logits and features differ in rows",
            lambda: cdan()(feats(5, 4), feats(6, 3), feats(6, 4), feats(6, 3)),
            ValueError,
            "source_logits and source_features",
        ),
        ("seed=True", lambda: cdan(randomized=True, seed=True), TypeError, "seed"),
        ("seed=1.5", lambda: cdan(randomized=True, seed=1.5), TypeError, "seed"),
        ("seed=-1", lambda: cdan(randomized=True, seed=-1), ValueError, "seed"),
        ("seed is a string", lambda: cdan(seed="0"), TypeError, "seed"),
    ],
)
positive_rows(
    "adversarial.DomainDiscriminator",
    lambda v: adversarial.DomainDiscriminator(v),
    "in_features",
    integer=True,
)
positive_rows(
    "adversarial.DomainDiscriminator",
    lambda v: adversarial.DomainDiscriminator(3, hidden=v),
    "hidden",
    integer=True,
)
add(
    "adversarial.DomainDiscriminator",
    "dropout=1.5",
    lambda: adversarial.DomainDiscriminator(3, dropout=1.5),
    ValueError,
    "dropout",
)
rows(
    "adversarial.DomainDiscriminator",
    [
        (
            "input of the wrong width",
            lambda: adversarial.DomainDiscriminator(4, hidden=8)(feats(5, 3)),
            ValueError,
            "x",
        ),
        (
            # (N, T, D) with T == hidden ran through BatchNorm1d over the wrong axis and
            # returned (N, T) logits without error
            "3-D input",
            lambda: adversarial.DomainDiscriminator(4, hidden=8)(torch.randn(5, 8, 4)),
            ValueError,
            "x",
        ),
        (
            "integer input",
            lambda: adversarial.DomainDiscriminator(4)(torch.ones(5, 4, dtype=torch.long)),
            TypeError,
            "x",
        ),
    ],
)
add(
    "adversarial.GradientReversal",
    "coeff is a string",
    lambda: adversarial.GradientReversal("1"),
    TypeError,
    "coeff",
)
add(
    "adversarial.GradientReversal",
    "coeff nan",
    lambda: adversarial.GradientReversal(NAN),
    ValueError,
    "coeff",
)
positive_rows(
    "adversarial.WarmStartSchedule",
    lambda v: adversarial.WarmStartSchedule(v),
    "max_steps",
    integer=True,
)
add(
    "adversarial.WarmStartSchedule",
    "alpha nan",
    lambda: adversarial.WarmStartSchedule(10, alpha=NAN),
    ValueError,
    "alpha",
)
rows(
    "adversarial.grad_reverse",
    [
        ("x not a tensor", lambda: adversarial.grad_reverse([1.0, 2.0]), TypeError, "x"),
        (
            "x integer",
            lambda: adversarial.grad_reverse(torch.ones(2, dtype=torch.long)),
            TypeError,
            "x",
        ),
        ("coeff string", lambda: adversarial.grad_reverse(feats(), "1"), TypeError, "coeff"),
        ("coeff inf", lambda: adversarial.grad_reverse(feats(), INF), ValueError, "coeff"),
        ("x meta", lambda: adversarial.grad_reverse(META), ValueError, "x"),
    ],
)


def mdd(**kwargs: Any) -> adversarial.MarginDisparityDiscrepancy:
    torch.manual_seed(0)
    return adversarial.MarginDisparityDiscrepancy(nn.Linear(3, 4), **kwargs)


def overflowing_mdd() -> adversarial.MarginDisparityDiscrepancy:
    criterion = mdd()
    with torch.no_grad():
        for param in criterion.parameters():
            param.fill_(1e30)
    return criterion


module_rows(
    "adversarial.MarginDisparityDiscrepancy",
    lambda v: adversarial.MarginDisparityDiscrepancy(v),
    "adversarial_head",
)
positive_rows("adversarial.MarginDisparityDiscrepancy", lambda v: mdd(margin=v), "margin")
pair_rows(
    "adversarial.MarginDisparityDiscrepancy",
    lambda s, t: mdd()(feats(6, 4), s, feats(5, 4, seed=1), t),
    ("source_features", "target_features"),
)
logits_rows(
    "adversarial.MarginDisparityDiscrepancy",
    lambda z: mdd()(z, feats(6, 3), feats(5, 4, seed=1), feats(5, 3, seed=1)),
    "source_logits",
)
positive_rows("adversarial.MarginDisparityDiscrepancy", lambda v: mdd(offset=v), "offset")
rows(
    "adversarial.MarginDisparityDiscrepancy",
    [
        (
            "target_logits NaN",
            lambda: mdd()(feats(6, 4), feats(), with_value(feats(5, 4), NAN), feats(5, 3)),
            ValueError,
            "target_logits",
        ),
        (
            "logits and features of different lengths",
            lambda: mdd()(feats(6, 4), feats(5, 3), feats(5, 4), feats(5, 3)),
            ValueError,
            "source_logits and source_features",
        ),
        (
            "logits with different class counts",
            lambda: mdd()(feats(6, 4), feats(), feats(5, 3), feats(5, 3)),
            ValueError,
            "source_logits and target_logits",
        ),
        (
            "one class",
            lambda: mdd()(feats(6, 1), feats(), feats(5, 1), feats(5, 3)),
            ValueError,
            "source_logits",
        ),
        ("offset 1", lambda: mdd(offset=1.0), ValueError, "offset"),
        ("grl a number", lambda: mdd(grl=0.1), TypeError, "grl"),
        (
            "head gives the wrong number of classes",
            lambda: mdd()(feats(6, 5), feats(), feats(5, 5), feats(5, 3)),
            ValueError,
            "adversarial_head",
        ),
        (
            "head overflows",
            lambda: overflowing_mdd()(feats(6, 4), feats() * 1e20, feats(5, 4), feats(5, 3)),
            ValueError,
            "adversarial_head",
        ),
    ],
)

# --------------------------------------------------------------------------- augment

for name in ("weak", "strong"):
    function = getattr(augment, name)
    rows(
        f"augment.{name}",
        [
            ("x not a tensor", lambda f=function: f(images().tolist()), TypeError, "x"),
            ("x 2-D", lambda f=function: f(images()[0, 0]), ValueError, "x"),
            ("x NaN", lambda f=function: f(with_value(images(), NAN)), ValueError, "x"),
            (
                "x meta",
                lambda f=function: f(torch.empty(2, 3, 8, 8, device="meta")),
                ValueError,
                "x",
            ),
            (
                "generator not a Generator",
                lambda f=function: f(images(), generator=0),
                TypeError,
                "generator",
            ),
        ],
    )
rows(
    "augment.random_affine",
    [
        ("x 3-D", lambda: augment.random_affine(images()[0], degrees=10), ValueError, "x"),
        (
            "degrees nan",
            lambda: augment.random_affine(images(), degrees=NAN),
            ValueError,
            "degrees",
        ),
        (
            "scale reversed",
            lambda: augment.random_affine(images(), scale=(1.2, 0.8)),
            ValueError,
            "scale",
        ),
        (
            "padding_mode unknown",
            lambda: augment.random_affine(images(), padding_mode="wrap"),
            ValueError,
            "padding_mode",
        ),
    ],
)
rows(
    "augment.color_jitter",
    [
        ("x integer", lambda: augment.color_jitter(images().long()), TypeError, "x"),
        (
            "brightness negative",
            lambda: augment.color_jitter(images(), brightness=-0.1),
            ValueError,
            "brightness",
        ),
    ],
)
flag_rows(
    "augment.color_jitter",
    lambda v: augment.color_jitter(images(), permute_channels=v),
    "permute_channels",
)
rows(
    "augment.cutout",
    [
        ("x 2-D", lambda: augment.cutout(images()[0, 0]), ValueError, "x"),
        ("size 0", lambda: augment.cutout(images(), size=0), ValueError, "size"),
        ("size 1.5", lambda: augment.cutout(images(), size=1.5), TypeError, "size"),
    ],
)

# --------------------------------------------------------------------------- batchnorm


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


module_rows("batchnorm.adapt_batchnorm", lambda v: batchnorm.adapt_batchnorm(v, feats()), "model")
positive_rows(
    "batchnorm.adapt_batchnorm",
    lambda v: batchnorm.adapt_batchnorm(bn_net(), feats(), batch_size=v),
    "batch_size",
    integer=True,
)
flag_rows(
    "batchnorm.adapt_batchnorm",
    lambda v: batchnorm.adapt_batchnorm(bn_net(), feats(), progress=v),
    "progress",
)
add(
    "batchnorm.adapt_batchnorm",
    "target_data NaN",
    lambda: batchnorm.adapt_batchnorm(bn_net(), with_value(feats(), NAN)),
    ValueError,
    "target_data",
)
add(
    "batchnorm.adapt_batchnorm",
    "target_data empty",
    lambda: batchnorm.adapt_batchnorm(bn_net(), feats()[:0]),
    ValueError,
    "target_data",
)
module_rows("batchnorm.convert_domain_bn", lambda v: batchnorm.convert_domain_bn(v), "model")
rows(
    "batchnorm.convert_domain_bn",
    [
        (
            "one domain",
            lambda: batchnorm.convert_domain_bn(bn_net(), ["source"]),
            ValueError,
            "domains",
        ),
        (
            "domains a string",
            lambda: batchnorm.convert_domain_bn(bn_net(), "source"),
            TypeError,
            "domains",
        ),
        (
            "affine unknown",
            lambda: batchnorm.convert_domain_bn(bn_net(), affine="both"),
            ValueError,
            "affine",
        ),
        ("no BatchNorm", lambda: batchnorm.convert_domain_bn(nn.Linear(2, 2)), ValueError, "model"),
    ],
)
rows(
    "batchnorm.DomainSpecificBatchNorm",
    [
        (
            "norm not BatchNorm",
            lambda: batchnorm.DomainSpecificBatchNorm(nn.Linear(2, 2)),
            TypeError,
            "norm",
        ),
        (
            "duplicate domains",
            lambda: batchnorm.DomainSpecificBatchNorm(nn.BatchNorm1d(4), ["a", "a"]),
            ValueError,
            "domains",
        ),
    ],
)


def enter_bn_domain(model: nn.Module, domain: Any) -> None:
    with batchnorm.bn_domain(model, domain):
        pass


rows(
    "batchnorm.bn_domain",
    [
        (
            "unknown domain",
            lambda: enter_bn_domain(batchnorm.convert_domain_bn(bn_net()), "tgt"),
            ValueError,
            "domain",
        ),
        (
            "model without domain BatchNorm",
            lambda: enter_bn_domain(bn_net(), "source"),
            ValueError,
            "model",
        ),
        ("model not a module", lambda: enter_bn_domain("net", "source"), TypeError, "model"),
    ],
)

# --------------------------------------------------------------------------- datasets

positive_rows("datasets.Blur", lambda v: datasets.Blur(v), "sigma")
positive_rows("datasets.blur", lambda v: datasets.blur(v), "sigma")
positive_rows("datasets.Noise", lambda v: datasets.Noise(v), "std")
positive_rows("datasets.noise", lambda v: datasets.noise(v), "std")
add("datasets.Rotate", "degrees nan", lambda: datasets.Rotate(NAN), ValueError, "degrees")
add("datasets.rotate", "degrees string", lambda: datasets.rotate("45"), TypeError, "degrees")
add("datasets.Translate", "pixels nan", lambda: datasets.Translate(NAN), ValueError, "pixels")
add("datasets.translate", "pixels string", lambda: datasets.translate("1"), TypeError, "pixels")
rows(
    "datasets.digits",
    [
        ("shift unknown", lambda: datasets.digits("rotation"), ValueError, "shift"),
        ("size 0", lambda: datasets.digits(size=0), ValueError, "size"),
        (
            "test_fraction 1.5",
            lambda: datasets.digits(test_fraction=1.5),
            ValueError,
            "test_fraction",
        ),
        ("seed string", lambda: datasets.digits(seed="0"), TypeError, "seed"),
    ],
)
rows(
    "datasets.moons",
    [
        ("angle nan", lambda: datasets.moons(NAN), ValueError, "angle"),
        ("n_samples 1", lambda: datasets.moons(n_samples=1), ValueError, "n_samples"),
        ("noise negative", lambda: datasets.moons(noise=-1.0), ValueError, "noise"),
        ("seed past scikit-learn's range", lambda: datasets.moons(seed=2**32), ValueError, "seed"),
    ],
)
rows(
    "datasets.rotate_points",
    [
        ("points 1-D", lambda: datasets.rotate_points(np.zeros(3), 10.0), ValueError, "points"),
        (
            "degrees nan",
            lambda: datasets.rotate_points(np.zeros((3, 2)), NAN),
            ValueError,
            "degrees",
        ),
    ],
)
rows(
    "datasets.make_loader",
    [
        # Any tensor x works (integer token ids, 1-D scalars); only unusable ones fail.
        ("x not a tensor", lambda: datasets.make_loader(feats().tolist()), TypeError, "x"),
        ("x NaN", lambda: datasets.make_loader(with_value(feats(), NAN)), ValueError, "x"),
        ("x empty", lambda: datasets.make_loader(feats()[:0]), ValueError, "x"),
        ("x meta", lambda: datasets.make_loader(META), ValueError, "x"),
        ("seed a string", lambda: datasets.make_loader(feats(), seed="0"), TypeError, "seed"),
        (
            "y of the wrong length",
            lambda: datasets.make_loader(feats(), labels(5)),
            ValueError,
            "y",
        ),
        (
            "batch_size 0",
            lambda: datasets.make_loader(feats(), batch_size=0),
            ValueError,
            "batch_size",
        ),
    ],
)
flag_rows("datasets.make_loader", lambda v: datasets.make_loader(feats(), shuffle=v), "shuffle")
flag_rows("datasets.make_loader", lambda v: datasets.make_loader(feats(), drop_last=v), "drop_last")
rows(
    "datasets.infinite",
    [
        (
            "loader empty",
            lambda: next(
                datasets.infinite(datasets.make_loader(feats(), batch_size=8, drop_last=True))
            ),
            ValueError,
            "loader",
        ),
    ],
)
rows(
    "datasets.mnist_m_blend",
    [
        (
            "digits 2-D",
            lambda: datasets.mnist_m_blend(torch.zeros(28, 28, dtype=torch.uint8)),
            ValueError,
            "digits",
        ),
        (
            "digits meta",
            lambda: datasets.mnist_m_blend(
                torch.empty(2, 28, 28, dtype=torch.uint8, device="meta")
            ),
            ValueError,
            "digits",
        ),
    ],
)
rows(
    "datasets.read_idx",
    [
        ("path an int", lambda: datasets.read_idx(3), TypeError, "path"),
    ],
)
rows(
    "datasets.encode_texts",
    [
        ("texts a string", lambda: datasets.encode_texts("hello"), TypeError, "texts"),
        ("texts empty", lambda: datasets.encode_texts([]), ValueError, "texts"),
        (
            "batch_size 0",
            lambda: datasets.encode_texts(["a"], batch_size=0),
            ValueError,
            "batch_size",
        ),
        (
            'progress="no"',
            lambda: datasets.encode_texts(["a"], progress="no"),
            TypeError,
            "progress",
        ),
    ],
)
rows(
    "datasets.tweets",
    [("topic unknown", lambda: datasets.tweets("footbal"), ValueError, "topic")],
)
rows(
    "datasets.tweet_topics",
    [
        ("target unknown", lambda: datasets.tweet_topics("airline", "nope"), ValueError, "target"),
        ("same topics", lambda: datasets.tweet_topics("airline", "airline"), ValueError, "target"),
        ('progress="no"', lambda: datasets.tweet_topics(progress="no"), TypeError, "progress"),
        ('encoder="minilm"', lambda: datasets.tweet_topics(encoder="minilm"), TypeError, "encoder"),
        (
            "max_per_domain a float above both topics' sizes",
            lambda: datasets.tweet_topics("claritin", "self-driving", max_per_domain=5000.5),
            TypeError,
            "max_per_domain",
        ),
    ],
)
rows(
    "datasets.mnist_m_lite",
    [
        ("train_size 0", lambda: datasets.mnist_m_lite(train_size=0), ValueError, "train_size"),
        ("seed string", lambda: datasets.mnist_m_lite(seed="0"), TypeError, "seed"),
    ],
)
rows(
    "datasets.mnist_to_digits",
    [
        (
            "test_fraction 2",
            lambda: datasets.mnist_to_digits(test_fraction=2.0),
            ValueError,
            "test_fraction",
        )
    ],
)
rows(
    "datasets.mnist_to_mnist_m_lite",
    [
        (
            "source_size 0",
            lambda: datasets.mnist_to_mnist_m_lite(source_size=0),
            ValueError,
            "source_size",
        )
    ],
)
for loader_name, loader in (("mnist", datasets.mnist), ("fashion_mnist", datasets.fashion_mnist)):
    add(f"datasets.{loader_name}", "root an int", lambda f=loader: f(root=3), TypeError, "root")
rows(
    "datasets.DomainTask",
    [
        (
            "num_classes 0",
            lambda: datasets.DomainTask("t", 0, *([feats()] * 8)),
            ValueError,
            "num_classes",
        ),
        (
            "uint8 target inputs next to float source inputs",
            lambda: datasets.DomainTask(
                "t", 2, feats(), labels(), feats(), labels(), _u8(6, 3), feats(), labels(), labels()
            ),
            ValueError,
            "target_x",
        ),
        (
            "target test inputs of another width",
            lambda: datasets.DomainTask(
                "t",
                2,
                feats(),
                labels(),
                feats(),
                labels(),
                feats(),
                feats(6, 4),
                labels(),
                labels(),
            ),
            ValueError,
            "target_test_x",
        ),
    ],
)
rows(
    "datasets.ImageSplits",
    [
        (
            "labels of the wrong length",
            lambda: datasets.ImageSplits(
                "x", ("a", "b"), _u8(4, 1, 8, 8), labels(3), _u8(2, 1, 8, 8), labels(2)
            ),
            ValueError,
            "train_labels",
        ),
        (
            "float images",
            lambda: datasets.ImageSplits(
                "x", ("a", "b"), torch.zeros(2, 1, 8, 8), labels(2), _u8(2, 1, 8, 8), labels(2)
            ),
            TypeError,
            "train_images",
        ),
        (
            "images without a channel axis",
            lambda: datasets.ImageSplits(
                "x", ("a", "b"), _u8(2, 8, 8), labels(2), _u8(2, 8, 8), labels(2)
            ),
            ValueError,
            "train_images",
        ),
        (
            "a label outside the classes",
            lambda: datasets.ImageSplits(
                "x", ("a", "b"), _u8(2, 1, 8, 8), labels(2), _u8(2, 1, 8, 8), labels(2) + 1
            ),
            ValueError,
            "test_labels",
        ),
        (
            "test images of another size",
            lambda: datasets.ImageSplits(
                "x", ("a", "b"), _u8(2, 1, 8, 8), labels(2), _u8(2, 1, 9, 9), labels(2)
            ),
            ValueError,
            "test_images",
        ),
    ],
)

# --------------------------------------------------------------------------- device

rows(
    "device.resolve_device",
    [
        ("unknown device", lambda: device.resolve_device("gpu0"), ValueError, "device"),
        ("device an int list", lambda: device.resolve_device([0]), TypeError, "device"),
    ],
)
rows(
    "device.to_device",
    [("unknown device", lambda: device.to_device(feats(), "tpu9"), ValueError, "device")],
)
flag_rows(
    "device.to_device", lambda v: device.to_device(feats(), "cpu", non_blocking=v), "non_blocking"
)
rows(
    "device.dataloader_kwargs",
    [("unknown device", lambda: device.dataloader_kwargs("tpu9"), ValueError, "device")],
)


def enter_autocast(**kwargs: Any) -> None:
    with device.autocast("cpu", **kwargs):
        pass


rows(
    "device.autocast",
    [("dtype float64", lambda: enter_autocast(dtype=torch.float64), ValueError, "dtype")],
)
flag_rows("device.autocast", lambda v: enter_autocast(enabled=v), "enabled")
rows(
    "device.seed_everything",
    [
        ("seed 2**64", lambda: device.seed_everything(2**64), ValueError, "seed"),
        ("seed -1", lambda: device.seed_everything(-1), ValueError, "seed"),
        ("seed 1.5", lambda: device.seed_everything(1.5), TypeError, "seed"),
    ],
)
flag_rows(
    "device.seed_everything", lambda v: device.seed_everything(0, deterministic=v), "deterministic"
)

# --------------------------------------------------------------------------- distributed

rows(
    "distributed.all_gather",
    [
        ("x not a tensor", lambda: distributed.all_gather([1.0]), TypeError, "x"),
        ("x meta", lambda: distributed.all_gather(META), ValueError, "x"),
    ],
)
rows(
    "distributed.shard_indices",
    [
        ("length negative", lambda: distributed.shard_indices(-1), ValueError, "length"),
        ("length 1.5", lambda: distributed.shard_indices(1.5), TypeError, "length"),
        (
            "rank out of range",
            lambda: distributed.shard_indices(10, rank=3, world_size=2),
            ValueError,
            "rank",
        ),
        (
            "rank a bool",
            lambda: distributed.shard_indices(10, rank=True, world_size=2),
            TypeError,
            "rank",
        ),
        (
            "rank 0.5",
            lambda: distributed.shard_indices(10, rank=0.5, world_size=2),
            TypeError,
            "rank",
        ),
    ],
)
module_rows("distributed.unwrap_model", distributed.unwrap_model, "model")
rows(
    "distributed.shutdown",
    [
        ("settle negative", lambda: distributed.shutdown(settle=-1.0), ValueError, "settle"),
        ("settle nan", lambda: distributed.shutdown(settle=float("nan")), ValueError, "settle"),
        ("settle inf", lambda: distributed.shutdown(settle=float("inf")), ValueError, "settle"),
        ("settle a string", lambda: distributed.shutdown(settle="0.1"), TypeError, "settle"),
        ("settle a bool", lambda: distributed.shutdown(settle=True), TypeError, "settle"),
    ],
)

# --------------------------------------------------------------------------- features

module_rows(
    "features.extract_features",
    lambda v: features.extract_features(v, feats()),
    "model_or_extractor",
)
rows(
    "features.extract_features",
    [
        (
            "data NaN",
            lambda: features.extract_features(net(), with_value(feats(), NAN), progress=False),
            ValueError,
            "data",
        ),
        (
            "batch_size 0",
            lambda: features.extract_features(net(), feats(), batch_size=0, progress=False),
            ValueError,
            "batch_size",
        ),
        (
            "layers unknown",
            lambda: features.extract_features(net(), feats(), layers="fc9", progress=False),
            ValueError,
            "layers",
        ),
        (
            "pool unknown",
            lambda: features.extract_features(net(), feats(), pool="mean", progress=False),
            ValueError,
            "pool",
        ),
    ],
)
flag_rows(
    "features.extract_features",
    lambda v: features.extract_features(net(), feats(), progress=v),
    "progress",
)
flag_rows(
    "features.extract_features",
    lambda v: features.extract_features(net(), feats(), progress=False, channels_last=v),
    "channels_last",
)
module_rows("features.FeatureExtractor", lambda v: features.FeatureExtractor(v), "model")
rows(
    "features.FeatureExtractor",
    [("layers unknown", lambda: features.FeatureExtractor(net(), "fc9"), ValueError, "layers")],
)
flag_rows(
    "features.FeatureExtractor",
    lambda v: features.FeatureExtractor(net(), early_stop=v),
    "early_stop",
)
rows(
    "features.masked_mean",
    [
        (
            "mask of 2s",
            lambda: features.masked_mean(
                torch.randn(2, 3, 4), torch.tensor([[1, 2, 0], [1, 1, 1]])
            ),
            ValueError,
            "attention_mask",
        ),
        (
            "mask of 0.5s",
            lambda: features.masked_mean(torch.randn(2, 3, 4), torch.full((2, 3), 0.5)),
            ValueError,
            "attention_mask",
        ),
        (
            "mask of the wrong shape",
            lambda: features.masked_mean(torch.randn(2, 3, 4), torch.ones(2, 4)),
            ValueError,
            "attention_mask",
        ),
        (
            "hidden 2-D",
            lambda: features.masked_mean(torch.randn(2, 3), torch.ones(2, 3)),
            ValueError,
            "hidden",
        ),
        (
            "hidden meta",
            lambda: features.masked_mean(torch.empty(2, 3, 4, device="meta"), torch.ones(2, 3)),
            ValueError,
            "hidden",
        ),
    ],
)

# --------------------------------------------------------------------------- freezing

module_rows("freezing.freeze", tk.freeze, "model")
rows(
    "freezing.freeze",
    [
        ("include matches nothing", lambda: tk.freeze(net(), include="fc"), ValueError, "include"),
        ("exclude holds an int", lambda: tk.freeze(net(), exclude=[1]), TypeError, "exclude"),
        ("bn unknown", lambda: tk.freeze(net(), bn="frozen2"), ValueError, "bn"),
        ("until unknown", lambda: tk.freeze(net(), until="9"), ValueError, "until"),
        ("types not classes", lambda: tk.freeze(net(), types="Linear"), TypeError, "types"),
    ],
)
flag_rows("freezing.freeze", lambda v: tk.freeze(net(), train_bn=v), "train_bn")
module_rows("freezing.unfreeze", tk.unfreeze, "model")
rows(
    "freezing.unfreeze",
    [("include matches nothing", lambda: tk.unfreeze(net(), include="fc"), ValueError, "include")],
)
module_rows("freezing.param_groups", lambda v: tk.param_groups(v, 0.1), "model")
positive_rows("freezing.param_groups", lambda v: tk.param_groups(net(), v), "lr")
rows(
    "freezing.param_groups",
    [
        (
            "layer_decay 0",
            lambda: tk.param_groups(net(), 0.1, layer_decay=0.0),
            ValueError,
            "layer_decay",
        ),
        (
            "weight_decay negative",
            lambda: tk.param_groups(net(), 0.1, weight_decay=-1.0),
            ValueError,
            "weight_decay",
        ),
        (
            "no_decay holds an int",
            lambda: tk.param_groups(net(), 0.1, no_decay=[1]),
            TypeError,
            "no_decay",
        ),
    ],
)
module_rows("freezing.trainable_summary", tk.trainable_summary, "model")
module_rows("freezing.GradualUnfreezing", lambda v: tk.GradualUnfreezing(v, ["3"]), "model")
rows(
    "freezing.GradualUnfreezing",
    [
        ("stages a string", lambda: tk.GradualUnfreezing(net(), "3"), TypeError, "stages"),
        ("stages empty", lambda: tk.GradualUnfreezing(net(), []), ValueError, "stages"),
        (
            "stage pattern matches nothing",
            lambda: tk.GradualUnfreezing(net(), ["3", "fc"]),
            ValueError,
            "stages\\[1\\]",
        ),
        ("stage None", lambda: tk.GradualUnfreezing(net(), [None]), TypeError, "stages\\[0\\]"),
        (
            "optimizer not an optimizer",
            lambda: tk.GradualUnfreezing(net(), ["3"], "sgd"),
            TypeError,
            "optimizer",
        ),
        ("every 0", lambda: tk.GradualUnfreezing(net(), ["3"], every=0), ValueError, "every"),
        (
            "lr per stage of the wrong length",
            lambda: tk.GradualUnfreezing(net(), ["3"], lr=[0.1, 0.2]),
            ValueError,
            "lr",
        ),
        ("bn unknown", lambda: tk.GradualUnfreezing(net(), ["3"], bn="frozen2"), ValueError, "bn"),
    ],
)
flag_rows(
    "freezing.GradualUnfreezing",
    lambda v: tk.GradualUnfreezing(net(), ["3"], train_bn=v),
    "train_bn",
)


def sgd_on(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


rows(
    "freezing.GradualUnfreezing",
    [
        (
            "layer_decay 0",
            lambda: tk.GradualUnfreezing(net(), ["3"], layer_decay=0.0),
            ValueError,
            "layer_decay",
        ),
        (
            "layer_decay NaN",
            lambda: tk.GradualUnfreezing(net(), ["3"], layer_decay=NAN),
            ValueError,
            "layer_decay",
        ),
        (
            "layer_decay with one lr per stage",
            lambda: tk.GradualUnfreezing(net(), ["3", "0"], lr=[0.1, 0.2], layer_decay=0.5),
            ValueError,
            "lr",
        ),
        (
            "scheduler a string",
            lambda: tk.GradualUnfreezing(net(), ["3"], sgd_on(net()), scheduler="cos"),
            TypeError,
            "scheduler",
        ),
        (
            "scheduler of another optimizer",
            lambda: tk.GradualUnfreezing(
                net(),
                ["3"],
                sgd_on(net()),
                scheduler=torch.optim.lr_scheduler.LambdaLR(sgd_on(net()), lambda s: 1.0),
            ),
            ValueError,
            "scheduler",
        ),
        (
            "train_bn with bn frozen",
            lambda: tk.GradualUnfreezing(net(), ["1"], bn="frozen", train_bn=True),
            ValueError,
            "train_bn",
        ),
    ],
)
add(
    "freezing.freeze",
    "train_bn with bn frozen",
    lambda: tk.freeze(net(), bn="frozen", train_bn=True),
    ValueError,
    "train_bn",
)
positive_rows(
    "freezing.FrozenBatchNorm", lambda v: freezing.FrozenBatchNorm(v), "num_features", integer=True
)
flag_rows("freezing.FrozenBatchNorm", lambda v: freezing.FrozenBatchNorm(4, affine=v), "affine")
flag_rows(
    "freezing.FrozenBatchNorm",
    lambda v: freezing.FrozenBatchNorm(4, track_running_stats=v),
    "track_running_stats",
)
add(
    "freezing.FrozenBatchNorm",
    "bn_class not a BatchNorm class",
    lambda: freezing.FrozenBatchNorm(4, bn_class=nn.Linear),
    TypeError,
    "bn_class",
)

# --------------------------------------------------------------------------- heads

positive_rows(
    "heads.ClassifierHead", lambda v: tk.ClassifierHead(v, 2), "in_features", integer=True
)
positive_rows(
    "heads.ClassifierHead", lambda v: tk.ClassifierHead(3, v), "num_classes", integer=True
)
option_rows("heads.ClassifierHead", lambda v: tk.ClassifierHead(3, 2, pool=v), "pool")
option_rows("heads.ClassifierHead", lambda v: tk.ClassifierHead(3, 2, activation=v), "activation")
rows(
    "heads.ClassifierHead",
    [
        ("dropout 1.0", lambda: tk.ClassifierHead(3, 2, dropout=1.0), ValueError, "dropout"),
        ("hidden an int", lambda: tk.ClassifierHead(3, 2, hidden=5), TypeError, "hidden"),
        ("input meta", lambda: tk.ClassifierHead(3, 2)(META), ValueError, "input"),
        (
            "input of the wrong width",
            lambda: tk.ClassifierHead(3, 2)(feats(6, 5)),
            ValueError,
            "input",
        ),
        ("input integer", lambda: tk.ClassifierHead(3, 2)(feats().long()), TypeError, "input"),
        (
            "norm without hidden",
            lambda: tk.ClassifierHead(3, 2, hidden=(), norm="batch"),
            ValueError,
            "norm",
        ),
        (
            "input with no tokens",
            lambda: tk.ClassifierHead(3, 2)(torch.randn(2, 0, 3)),
            ValueError,
            "input",
        ),
        (
            "token mask left-padded",
            lambda: tk.ClassifierHead(3, 2, pool="token")(
                torch.randn(2, 4, 3), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
            ),
            ValueError,
            "attention_mask",
        ),
    ],
)
module_rows("heads.find_head", tk.find_head, "model")
add(
    "heads.find_head",
    "model without a linear head",
    lambda: tk.find_head(nn.ReLU()),
    ValueError,
    "model",
)
module_rows("heads.replace_head", lambda v: tk.replace_head(v, 3), "model")
rows(
    "heads.replace_head",
    [
        ("num_classes 0", lambda: tk.replace_head(net(), 0), ValueError, "head_or_num_classes"),
        (
            "num_classes a string",
            lambda: tk.replace_head(net(), "3"),
            TypeError,
            "head_or_num_classes",
        ),
        ("name unknown", lambda: tk.replace_head(net(), 3, name="fc"), ValueError, "name"),
    ],
)

# --------------------------------------------------------------------------- meta


def task(**kwargs: Any) -> meta.MetaTask:
    values = {
        "support_x": feats(),
        "support_y": labels(),
        "query_x": feats(4, seed=1),
        "query_y": labels(4),
    }
    values.update(kwargs)
    return meta.MetaTask(**values)


# x goes to the user's model as it is (any shape or dtype it accepts): only values that no
# model can use are refused.
rows(
    "meta.adapt",
    [
        (
            "x not a tensor",
            lambda: meta.adapt(nn.Linear(3, 2), feats().tolist(), labels()),
            TypeError,
            "x",
        ),
        (
            "x NaN",
            lambda: meta.adapt(nn.Linear(3, 2), with_value(feats(), NAN), labels()),
            ValueError,
            "x",
        ),
        ("x empty", lambda: meta.adapt(nn.Linear(3, 2), feats()[:0], labels(0)), ValueError, "x"),
        ("x meta", lambda: meta.adapt(nn.Linear(3, 2), META, labels()), ValueError, "x"),
    ],
)
rows(
    "meta.adapt",
    [
        (
            "y of the wrong length",
            lambda: meta.adapt(nn.Linear(3, 2), feats(), labels(5)),
            ValueError,
            "y",
        ),
        (
            "steps -1",
            lambda: meta.adapt(nn.Linear(3, 2), feats(), labels(), steps=-1),
            ValueError,
            "steps",
        ),
        (
            "lr nan",
            lambda: meta.adapt(nn.Linear(3, 2), feats(), labels(), lr=NAN),
            ValueError,
            "lr",
        ),
        ("model not a module", lambda: meta.adapt("net", feats(), labels()), TypeError, "model"),
    ],
)
for algorithm in ("fomaml", "reptile"):
    function = getattr(meta, algorithm)
    rows(
        f"meta.{algorithm}",
        [
            ("model not a module", lambda f=function: f("net", [task()]), TypeError, "model"),
            ("tasks empty", lambda f=function: f(nn.Linear(3, 2), []), ValueError, "tasks"),
            ("tasks a number", lambda f=function: f(nn.Linear(3, 2), 5), TypeError, "tasks"),
            (
                "meta_steps 0",
                lambda f=function: f(nn.Linear(3, 2), [task()], meta_steps=0),
                ValueError,
                "meta_steps",
            ),
            (
                "inner_lr nan",
                lambda f=function: f(nn.Linear(3, 2), [task()], inner_lr=NAN),
                ValueError,
                "inner_lr",
            ),
        ],
    )
    rows(
        f"meta.{algorithm}",
        [
            # MetaTask is a NamedTuple: its fields are checked where the tasks are used.
            (
                "task with NaN support_x",
                lambda f=function: f(
                    nn.Linear(3, 2), [task(support_x=with_value(feats(), NAN))], meta_steps=1
                ),
                ValueError,
                "support_x",
            ),
            (
                "task with short support_y",
                lambda f=function: f(nn.Linear(3, 2), [task(support_y=labels(5))], meta_steps=1),
                ValueError,
                "support_y",
            ),
            (
                "task with float support_y",
                lambda f=function: f(
                    nn.Linear(3, 2), [task(support_y=labels().float())], meta_steps=1
                ),
                TypeError,
                "support_y",
            ),
            (
                "task a plain tensor",
                lambda f=function: f(nn.Linear(3, 2), [feats()], meta_steps=1),
                TypeError,
                "tasks",
            ),
        ],
    )
    flag_rows(
        f"meta.{algorithm}",
        lambda v, f=function: f(nn.Linear(3, 2), [task()], meta_steps=1, progress=v),
        "progress",
    )
tensor_rows(
    "meta.prototype_init", lambda x: meta.prototype_init(nn.Linear(3, 2), x, labels()), "features"
)
rows(
    "meta.prototype_init",
    [
        (
            "features of the wrong width",
            lambda: meta.prototype_init(nn.Linear(3, 2), feats(6, 5), labels()),
            ValueError,
            "features",
        ),
        (
            "a class without samples",
            lambda: meta.prototype_init(nn.Linear(3, 3), feats(), labels(6, 2)),
            ValueError,
            "labels",
        ),
        (
            "labels float",
            lambda: meta.prototype_init(nn.Linear(3, 2), feats(), labels().float()),
            TypeError,
            "labels",
        ),
        (
            "head without a linear layer",
            lambda: meta.prototype_init(nn.ReLU(), feats(), labels()),
            ValueError,
            "head",
        ),
        (
            "metric unknown",
            lambda: meta.prototype_init(nn.Linear(3, 2), feats(), labels(), metric="cos"),
            ValueError,
            "metric",
        ),
        (
            "scale negative",
            lambda: meta.prototype_init(nn.Linear(3, 2), feats(), labels(), scale=-1.0),
            ValueError,
            "scale",
        ),
    ],
)

# --------------------------------------------------------------------------- metrics


def second_name(first: str) -> str:
    return "target_features" if first == "source_features" else "source_features"


# Features may be integer or of mixed dtypes (they are read as float64 NumPy arrays).
for first in ("source_features", "target_features"):

    def pad(bad: Any, first: str = first) -> object:
        given = {first: bad, second_name(first): feats(20, seed=1)}
        return metrics.proxy_a_distance(given["source_features"], given["target_features"])

    rows(
        "metrics.proxy_a_distance",
        [
            (f"{first} not an array", lambda p=pad: p([[1.0, 2.0]] * 20), TypeError, first),
            (f"{first} 1-D", lambda p=pad: p(feats(20)[:, 0]), ValueError, first),
            (f"{first} NaN", lambda p=pad: p(with_value(feats(20), NAN)), ValueError, first),
            (f"{first} single sample", lambda p=pad: p(feats(1)), ValueError, first),
            (
                f"{first} meta",
                lambda p=pad: p(torch.empty(20, 3, device="meta")),
                ValueError,
                first,
            ),
        ],
    )
rows(
    "metrics.proxy_a_distance",
    [
        (
            "classifier unknown",
            lambda: metrics.proxy_a_distance(feats(20), feats(20, seed=1), classifier="tree"),
            ValueError,
            "classifier",
        ),
        (
            "test_fraction 1",
            lambda: metrics.proxy_a_distance(feats(20), feats(20, seed=1), test_fraction=1.0),
            ValueError,
            "test_fraction",
        ),
    ],
)

# --------------------------------------------------------------------------- models

positive_rows("models.MLP", lambda v: models.MLP(v, 2), "in_features", integer=True)
add("models.MLP", "hidden holds 0", lambda: models.MLP(3, 2, hidden=(0,)), ValueError, "hidden")
positive_rows("models.SmallCNN", lambda v: models.SmallCNN(width=v), "width", integer=True)
option_rows("models.SmallCNN", lambda v: models.SmallCNN(neck_norm=v), "neck_norm")

# --------------------------------------------------------------------------- plot

rows(
    "plot.curves",
    [
        ("history empty", lambda: plot.curves({}), ValueError, "history"),
        ("history a list", lambda: plot.curves([1.0, 2.0]), TypeError, "history"),
        ("history inf", lambda: plot.curves({"loss": [1.0, INF]}), ValueError, "history"),
    ],
)
flag_rows("plot.curves", lambda v: plot.curves({"loss": [1.0]}, split=v), "split")
rows(
    "plot.decision_boundary",
    [
        ("x 3 columns", lambda: plot.decision_boundary(nn.Linear(3, 2), feats()), ValueError, "x"),
        (
            "resolution 1",
            lambda: plot.decision_boundary(nn.Linear(2, 2), feats(6, 2), resolution=1),
            ValueError,
            "resolution",
        ),
        (
            "x NaN",
            lambda: plot.decision_boundary(nn.Linear(2, 2), with_value(feats(6, 2), NAN)),
            ValueError,
            "x",
        ),
    ],
)
rows(
    "plot.embedding",
    [
        (
            "method unknown",
            lambda: plot.embedding(feats(), feats(seed=1), method="umap"),
            ValueError,
            "method",
        ),
        (
            "dimensions differ",
            lambda: plot.embedding(feats(), feats(6, 4)),
            ValueError,
            "source_features and target_features",
        ),
        (
            "target NaN",
            lambda: plot.embedding(feats(), with_value(feats(), NAN), method="pca"),
            ValueError,
            "target_features",
        ),
    ],
)
rows(
    "plot.save",
    [
        ("figure a string", lambda: plot.save("figure", "/tmp/x.png"), TypeError, "figure"),
    ],
)

# --------------------------------------------------------------------------- recipes

rows(
    "recipes.recipe",
    [
        ("method unknown", lambda: recipes.recipe("danm"), ValueError, "method"),
        ("method an int", lambda: recipes.recipe(3), TypeError, "method"),
        (
            "unknown override",
            lambda: recipes.recipe("dann", learning_rate=0.1),
            ValueError,
            "overrides",
        ),
    ],
)
rows(
    "recipes.Recipe",
    [
        ("lr negative", lambda: recipes.Recipe("dann", lr=-1.0), ValueError, "lr"),
        ("ramp unknown", lambda: recipes.Recipe("dann", ramp="cosine"), ValueError, "ramp"),
    ],
)
flag_rows("recipes.Recipe", lambda v: recipes.Recipe("dann", nesterov=v), "nesterov")
rows(
    "recipes.Recipe",
    [
        (
            "layer_decay 2",
            lambda: recipes.recipe("dann").param_groups(net(), layer_decay=2.0),
            ValueError,
            "layer_decay",
        ),
        (
            "model a string",
            lambda: recipes.recipe("dann").param_groups("resnet"),  # type: ignore[arg-type]
            TypeError,
            "model",
        ),
        (
            "everything frozen",
            lambda: recipes.recipe("dann").param_groups(net().requires_grad_(False)),
            ValueError,
            "model",
        ),
    ],
)

# --------------------------------------------------------------------------- schedules


def sgd() -> torch.optim.SGD:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


rows(
    "schedules.FactorSchedule",
    [
        ("factor not callable", lambda: schedules.FactorSchedule(sgd(), 0.5), TypeError, "factor"),
        (
            "optimizer not an optimizer",
            lambda: schedules.FactorSchedule("sgd", lambda s: 1.0),
            TypeError,
            "optimizer",
        ),
    ],
)
positive_rows(
    "schedules.one_cycle", lambda v: schedules.one_cycle(sgd(), v), "total_steps", integer=True
)
add(
    "schedules.one_cycle",
    "pct_start 2",
    lambda: schedules.one_cycle(sgd(), 10, pct_start=2.0),
    ValueError,
    "pct_start",
)
rows(
    "schedules.one_cycle",
    [
        (
            "div_factor below 1",
            lambda: schedules.one_cycle(sgd(), 10, div_factor=0.5),
            ValueError,
            "div_factor",
        ),
        (
            "final_div_factor NaN",
            lambda: schedules.one_cycle(sgd(), 10, final_div_factor=NAN),
            ValueError,
            "final_div_factor",
        ),
        ("optimizer a list", lambda: schedules.one_cycle([], 10), TypeError, "optimizer"),
    ],
)
rows(
    "schedules.FactorSchedule",
    [
        (
            "factor NaN at step 0",
            lambda: schedules.FactorSchedule(sgd(), lambda s: NAN),
            ValueError,
            "factor",
        ),
        (
            "factor negative at step 0",
            lambda: schedules.FactorSchedule(sgd(), lambda s: -1.0),
            ValueError,
            "factor",
        ),
    ],
)
positive_rows(
    "schedules.warmup_cosine",
    lambda v: schedules.warmup_cosine(sgd(), v),
    "total_steps",
    integer=True,
)
rows(
    "schedules.warmup_cosine",
    [
        (
            "warmup_steps beyond total",
            lambda: schedules.warmup_cosine(sgd(), 10, warmup_steps=11),
            ValueError,
            "warmup_steps",
        ),
        (
            "warmup unknown",
            lambda: schedules.warmup_cosine(sgd(), 10, warmup="cubic"),
            ValueError,
            "warmup",
        ),
        (
            "start_factor NaN",
            lambda: schedules.warmup_cosine(sgd(), 10, start_factor=NAN),
            ValueError,
            "start_factor",
        ),
        (
            "final_factor above 1",
            lambda: schedules.warmup_cosine(sgd(), 10, final_factor=2.0),
            ValueError,
            "final_factor",
        ),
        ("optimizer a list", lambda: schedules.warmup_cosine([], 10), TypeError, "optimizer"),
    ],
)
rows(
    "schedules.extend_scheduler",
    [("scheduler a string", lambda: schedules.extend_scheduler("cosine"), TypeError, "scheduler")],
)

# --------------------------------------------------------------------------- selection

X20 = feats(20, 3)
Y20 = labels(20, 2)
for name in ("hscore", "logme", "linear_probe_score", "knn_score"):
    function = getattr(selection, name)
    rows(
        f"selection.{name}",
        [
            ("features 1-D", lambda f=function: f(X20[:, 0], Y20), ValueError, "features"),
            (
                "features NaN",
                lambda f=function: f(with_value(X20, NAN), Y20),
                ValueError,
                "features",
            ),
            (
                "labels of the wrong length",
                lambda f=function: f(X20, Y20[:5]),
                ValueError,
                "labels",
            ),
            ("labels float", lambda f=function: f(X20, Y20.float() + 0.5), TypeError, "labels"),
            (
                "features meta",
                lambda f=function: f(torch.empty(20, 3, device="meta"), Y20),
                ValueError,
                "features",
            ),
        ],
    )
option_rows("selection.knn_score", lambda v: selection.knn_score(X20, Y20, metric=v), "metric")
positive_rows(
    "selection.knn_score", lambda v: selection.knn_score(X20, Y20, k=v), "k", integer=True
)
PROBS = torch.softmax(feats(20, 4), 1)
for name in ("leep", "nce"):
    function = getattr(selection, name)
    given = PROBS if name == "leep" else Y20 % 4  # probabilities / predicted source labels
    rows(
        f"selection.{name}",
        [
            (
                "labels of the wrong length",
                lambda f=function, g=given: f(g, Y20[:5]),
                ValueError,
                "labels",
            ),
            (
                "estimator unknown",
                lambda f=function, g=given: f(g, Y20, estimator="bayes"),
                ValueError,
                "estimator",
            ),
        ],
    )
add(
    "selection.leep",
    "source_probs not probabilities",
    lambda: selection.leep(PROBS * 3, Y20),
    ValueError,
    "source_probs",
)
for name in ("prediction_entropy", "snd"):
    function = getattr(selection, name)
    rows(
        f"selection.{name}",
        [
            ("target_logits 1-D", lambda f=function: f(X20[:, 0]), ValueError, "target_logits"),
            (
                "target_logits NaN",
                lambda f=function: f(with_value(X20, NAN)),
                ValueError,
                "target_logits",
            ),
        ],
    )
positive_rows("selection.snd", lambda v: selection.snd(X20, temperature=v), "temperature")
rows(
    "selection.rank",
    [
        ("candidates empty", lambda: selection.rank({}, Y20), ValueError, "candidates"),
        (
            "score unknown",
            lambda: selection.rank({"a": X20}, Y20, score="acc"),
            ValueError,
            "score",
        ),
        (
            "candidates names equal as strings",
            lambda: selection.rank({1: X20, "1": X20}, Y20),
            ValueError,
            "candidates",
        ),
        (
            "score NaN",
            lambda: selection.rank({"a": X20}, Y20, score=lambda v, y: float("nan")),
            ValueError,
            "candidate 'a'",
        ),
    ],
)
for name in ("iwcv", "dev"):
    function = getattr(selection, name)
    rows(
        f"selection.{name}",
        [
            (
                "source_losses NaN",
                lambda f=function: f(with_value(X20[:, 0], NAN), X20, feats(20, seed=1)),
                ValueError,
                "source_losses",
            ),
            (
                "weights and features both missing",
                lambda f=function: f(X20[:, 0]),
                ValueError,
                "source_features and target_features",
            ),
            (
                "source_features of the wrong length",
                lambda f=function: f(X20[:, 0], X20[:5], feats(20, seed=1)),
                ValueError,
                "source_losses",  # one loss per source sample: the two disagree
            ),
        ],
    )
flag_rows(
    "selection.iwcv",
    lambda v: selection.iwcv(X20[:, 0], weights=np.ones(20), self_normalize=v),
    "self_normalize",
)
rows(
    "selection.importance_weights",
    [
        (
            "dimensions differ",
            lambda: selection.importance_weights(X20, feats(20, 4)),
            ValueError,
            "source_features and target_features",
        ),
        (
            "clip 0",
            lambda: selection.importance_weights(X20, feats(20, seed=1), clip=0.0),
            ValueError,
            "clip",
        ),
    ],
)

# --------------------------------------------------------------------------- self-training

positive_rows(
    "self_training.PseudoLabeler",
    lambda v: self_training.PseudoLabeler(v),
    "num_classes",
    integer=True,
)
rows(
    "self_training.PseudoLabeler",
    [
        (
            "threshold 2",
            lambda: self_training.PseudoLabeler(3, threshold=2.0),
            ValueError,
            "threshold",
        ),
        (
            "balance unknown",
            lambda: self_training.PseudoLabeler(3, balance="flex"),
            ValueError,
            "balance",
        ),
        (
            "prior of the wrong length",
            lambda: self_training.PseudoLabeler(3, prior=torch.ones(2) / 2),
            ValueError,
            "prior",
        ),
        (
            "logits of the wrong width",
            lambda: self_training.PseudoLabeler(3)(feats(6, 4)),
            ValueError,
            "logits",
        ),
        (
            "logits NaN",
            lambda: self_training.PseudoLabeler(3)(with_value(feats(), NAN)),
            ValueError,
            "logits",
        ),
        ("logits meta", lambda: self_training.PseudoLabeler(3)(META), ValueError, "logits"),
    ],
)
flag_rows(
    "self_training.PseudoLabeler",
    lambda v: self_training.PseudoLabeler(3)(feats(), update=v),
    "update",
)


rows(
    "averaging.ModelEMA",
    [
        ("model not a module", lambda: averaging.ModelEMA("net"), TypeError, "model"),
        ("decay 1", lambda: averaging.ModelEMA(nn.Linear(2, 2), decay=1.0), ValueError, "decay"),
        (
            "decay negative",
            lambda: averaging.ModelEMA(nn.Linear(2, 2), decay=-0.5),
            ValueError,
            "decay",
        ),
        ("decay NaN", lambda: averaging.ModelEMA(nn.Linear(2, 2), decay=NAN), ValueError, "decay"),
        (
            "decay a bool",
            lambda: averaging.ModelEMA(nn.Linear(2, 2), decay=True),
            TypeError,
            "decay",
        ),
        (
            "update with another architecture",
            lambda: averaging.ModelEMA(nn.Linear(2, 2)).update(nn.Linear(3, 2)),
            ValueError,
            "model",
        ),
        (
            "update with a non-module",
            lambda: averaging.ModelEMA(nn.Linear(2, 2)).update("net"),
            TypeError,
            "model",
        ),
    ],
)


def fixmatch(**kwargs: Any) -> self_training.FixMatchLoss:
    values: dict[str, Any] = {"weak": augment.weak, "strong": augment.strong}
    values.update(kwargs)
    return self_training.FixMatchLoss(self_training.PseudoLabeler(3), **values)


rows(
    "self_training.FixMatchLoss",
    [
        (
            "labeler not a PseudoLabeler",
            lambda: self_training.FixMatchLoss("labeler", weak=augment.weak, strong=augment.strong),
            TypeError,
            "labeler",
        ),
        ("weak not callable", lambda: fixmatch(weak=None), TypeError, "weak"),
        ("model not callable", lambda: fixmatch()("model", images()), TypeError, "model"),
        (
            "teacher not callable",
            lambda: fixmatch()(nn.Flatten(), images(), teacher="ema"),
            TypeError,
            "teacher",
        ),
        (
            "x meta",
            lambda: fixmatch()(nn.Flatten(), torch.empty(2, 3, 8, 8, device="meta")),
            ValueError,
            "x",
        ),
    ],
)

# --------------------------------------------------------------------------- sklearn

XS = np.random.default_rng(0).normal(size=(30, 3))
YS = np.r_[np.arange(15) % 2, -np.ones(15, dtype=int)]
for name, make in [
    ("CORAL", tk_sklearn.CORAL),
    ("TCA", lambda: tk_sklearn.TCA(n_components=2)),
    ("SubspaceAlignment", lambda: tk_sklearn.SubspaceAlignment(n_components=2)),
]:
    rows(
        f"sklearn.{name}",
        [
            ("no target rows", lambda m=make: m().fit(XS, np.abs(YS)), ValueError, "y"),
            (
                "no source rows",
                lambda m=make: m().fit(XS, -np.ones(30, dtype=int)),
                ValueError,
                "y",
            ),
            ("y missing", lambda m=make: m().fit(XS), ValueError, "y"),
            ("y of the wrong length", lambda m=make: m().fit(XS, YS[:10]), ValueError, "y"),
            (
                "X meta tensor",
                lambda m=make: m().fit(torch.empty(30, 3, device="meta"), YS),
                ValueError,
                "X",
            ),
        ],
    )
add(
    "sklearn.CORAL",
    "reg negative",
    lambda: tk_sklearn.CORAL(reg=-1.0).fit(XS, YS),
    ValueError,
    "reg",
)
add(
    "sklearn.TCA",
    "mu 0",
    lambda: tk_sklearn.TCA(n_components=2, mu=0.0).fit(XS, YS),
    ValueError,
    "mu",
)
add(
    "sklearn.TCA",
    "kernel unknown",
    lambda: tk_sklearn.TCA(n_components=2, kernel="gauss").fit(XS, YS),
    ValueError,
    "kernel",
)
add(
    "sklearn.SubspaceAlignment",
    "n_components too many",
    lambda: tk_sklearn.SubspaceAlignment(n_components=4).fit(XS, YS),
    ValueError,
    "n_components",
)
YL = np.arange(30) % 2
rows(
    "sklearn.TorchKernelSVC",
    [
        (
            "C negative",
            lambda: tk_sklearn.TorchKernelSVC(C=-1.0, device="cpu").fit(XS, YL),
            ValueError,
            "C",
        ),
        (
            "kernel unknown",
            lambda: tk_sklearn.TorchKernelSVC(kernel="gauss", device="cpu").fit(XS, YL),
            ValueError,
            "kernel",
        ),
        (
            "solver unknown",
            lambda: tk_sklearn.TorchKernelSVC(solver="smo", device="cpu").fit(XS, YL),
            ValueError,
            "solver",
        ),
        (
            "X meta tensor",
            lambda: tk_sklearn.TorchKernelSVC(device="cpu").fit(
                torch.empty(30, 3, device="meta"), YL
            ),
            ValueError,
            "X",
        ),
    ],
)
flag_rows(
    "sklearn.TorchKernelSVC",
    lambda v: tk_sklearn.TorchKernelSVC(probability=v, device="cpu").fit(XS, YL),
    "probability",
)
flag_rows(
    "sklearn.TorchKernelSVC",
    lambda v: tk_sklearn.TorchKernelSVC(break_ties=v, device="cpu").fit(XS, YL),
    "break_ties",
)
rows(
    "sklearn.PrototypeClassifier",
    [
        (
            "metric unknown",
            lambda: tk_sklearn.PrototypeClassifier("cos").fit(XS, YL),
            ValueError,
            "metric",
        ),
        (
            "temperature 0",
            lambda: tk_sklearn.PrototypeClassifier(temperature=0.0).fit(XS, YL),
            ValueError,
            "temperature",
        ),
    ],
)
rows(
    "sklearn.DeepFeatures",
    [
        (
            "X 1-D",
            lambda: tk_sklearn.DeepFeatures(nn.Linear(3, 2)).fit(np.zeros(3)),
            ValueError,
            "X",
        ),
        (
            "input_shape mismatched",
            lambda: tk_sklearn.DeepFeatures(
                nn.Linear(3, 2), input_shape=(4,), device="cpu"
            ).transform(XS),
            ValueError,
            "input_shape",
        ),
    ],
)
flag_rows(
    "sklearn.DeepFeatures",
    lambda v: tk_sklearn.DeepFeatures(nn.Linear(3, 2), device="cpu", progress=v).transform(XS),
    "progress",
)
flag_rows(
    "sklearn.DeepFeatures",
    lambda v: tk_sklearn.DeepFeatures(nn.Linear(3, 2), device="cpu", amp=v).transform(XS),
    "amp",
)
rows(
    "sklearn.make_deep_svm_pipeline",
    [
        (
            "align unknown",
            lambda: tk_sklearn.make_deep_svm_pipeline(nn.Linear(3, 2), align="mmd"),
            ValueError,
            "align",
        )
    ],
)
flag_rows(
    "sklearn.make_deep_svm_pipeline",
    lambda v: tk_sklearn.make_deep_svm_pipeline(nn.Linear(3, 2), scale=v),
    "scale",
)

# --------------------------------------------------------------------------- training

rows(
    "training.EarlyStopping",
    [
        ("patience 0", lambda: training.EarlyStopping(0), ValueError, "patience"),
        (
            "min_delta negative",
            lambda: training.EarlyStopping(min_delta=-1.0),
            ValueError,
            "min_delta",
        ),
        ("mode unknown", lambda: training.EarlyStopping(mode="minimum"), ValueError, "mode"),
        ("metric NaN", lambda: training.EarlyStopping().step(NAN), ValueError, "metric"),
        ("metric a string", lambda: training.EarlyStopping().step("0.5"), TypeError, "metric"),
    ],
)
flag_rows(
    "training.EarlyStopping", lambda v: training.EarlyStopping(restore_best=v), "restore_best"
)
rows(
    "training.class_weights",
    [
        (
            "labels float",
            lambda: training.class_weights(torch.tensor([0.0, 1.0])),
            TypeError,
            "labels",
        ),
        (
            "labels empty",
            lambda: training.class_weights(torch.tensor([], dtype=torch.long)),
            ValueError,
            "labels",
        ),
        (
            "labels beyond num_classes",
            lambda: training.class_weights([0, 3], num_classes=2),
            ValueError,
            "labels",
        ),
        ("labels negative", lambda: training.class_weights([0, -1]), ValueError, "labels"),
        (
            "labels meta",
            lambda: training.class_weights(torch.empty(3, dtype=torch.long, device="meta")),
            ValueError,
            "labels",
        ),
        (
            "method unknown",
            lambda: training.class_weights([0, 1], method="sqrt"),
            ValueError,
            "method",
        ),
    ],
)

for flag in ("amp", "early_stop", "distributed"):
    flag_rows(
        "features.extract_features",
        lambda v, flag=flag: features.extract_features(net(), feats(), progress=False, **{flag: v}),
        flag,
    )

rows(
    "sklearn.TorchKernelSVC",
    [
        (
            "float32 Gram of 1e20 features",
            lambda: tk_sklearn.TorchKernelSVC(dtype="float32", device="cpu").fit(XS * 1e20, YL),
            ValueError,
            "X",
        ),
        (
            "dtype unknown",
            lambda: tk_sklearn.TorchKernelSVC(dtype="float16", device="cpu").fit(XS, YL),
            ValueError,
            "dtype",
        ),
    ],
)

# --------------------------------------------------------------------------- meta modules

# A module on the meta device has shapes but no data: refused by name, not a raw torch
# error about devices (or a meta-device result).
rows(
    "adversarial.DomainAdversarialLoss",
    [
        (
            "discriminator on meta",
            lambda: adversarial.DomainAdversarialLoss(
                adversarial.DomainDiscriminator(3, hidden=4).to("meta")
            )(feats(), feats(seed=1)),
            ValueError,
            "discriminator",
        )
    ],
)
rows(
    "adversarial.MarginDisparityDiscrepancy",
    [
        (
            "adversarial_head on meta",
            lambda: adversarial.MarginDisparityDiscrepancy(nn.Linear(3, 4).to("meta"))(
                feats(6, 4), feats(), feats(5, 4, seed=1), feats(5, 3)
            ),
            ValueError,
            "adversarial_head",
        )
    ],
)
rows(
    "heads.ClassifierHead",
    [
        (
            "head on meta",
            lambda: tk.ClassifierHead(3, 2).to("meta")(feats()),
            ValueError,
            "ClassifierHead",
        )
    ],
)
rows("losses.L2SP", [("model on meta", lambda: losses.L2SP(net().to("meta")), ValueError, "model")])
rows(
    "meta.adapt",
    [
        (
            "model on meta",
            lambda: meta.adapt(nn.Linear(3, 2).to("meta"), feats(), labels()),
            ValueError,
            "model",
        )
    ],
)
rows(
    "meta.prototype_init",
    [
        (
            "head on meta",
            lambda: meta.prototype_init(nn.Linear(3, 2).to("meta"), feats(), labels()),
            ValueError,
            "head",
        )
    ],
)
rows(
    "batchnorm.adapt_batchnorm",
    [
        (
            "model on meta",
            lambda: batchnorm.adapt_batchnorm(bn_net().to("meta"), feats()),
            ValueError,
            "model",
        )
    ],
)
rows(
    "sklearn.DeepFeatures",
    [
        (
            "model on meta",
            lambda: tk_sklearn.DeepFeatures(nn.Linear(3, 2).to("meta"), device="cpu").fit_transform(
                XS
            ),
            ValueError,
            "model",
        )
    ],
)

# --------------------------------------------------------------------------- the sweep

# Public callables without rows, each with the reason. Keep this list short: a new name
# belongs in CASES unless it takes no arguments or only wraps data.
EXEMPT: dict[str, str] = {
    "distributed.get_rank": "takes no arguments",
    "distributed.get_world_size": "takes no arguments",
    "distributed.is_distributed": "takes no arguments",
    "datasets.data_dirs": "takes no arguments",
    "datasets.sample_photos": "takes no arguments",
    "datasets.invert": "takes no arguments",
    "datasets.Invert": "takes no arguments",
    "recipes.available": "takes no arguments",
    "datasets.MissingDataError": "an exception class, raised by the library",
    "datasets.Shift": "abstract base class of the shifts (Rotate, Blur, ...)",
    "kernels.Kernel": "abstract base class; its __call__ is covered through every kernel",
    "meta.MetaTask": "a NamedTuple; its fields are checked where tasks are used (fomaml rows)",
    "selection.Ranking": "result record returned by selection.rank, not built by users",
    "selection.RankedCandidate": "result record returned by selection.rank, not built by users",
    "self_training.PseudoLabels": "result record returned by PseudoLabeler, not built by users",
}


def _public_callables() -> dict[str, object]:
    """``"module.name" -> object`` for every public callable, under its defining module."""
    found: dict[int, str] = {}
    objects: dict[str, object] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(tk.__path__) if not m.name.startswith("_"))
    for module_name in names:
        module = importlib.import_module(f"transferkit.{module_name}")
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if not callable(value) or id(value) in found:
                continue
            found[id(value)] = f"{module_name}.{name}"
            objects[f"{module_name}.{name}"] = value
    for name in tk.__all__:
        value = getattr(tk, name)
        if callable(value) and id(value) not in found:
            objects[f"transferkit.{name}"] = value
    return objects


def test_every_public_callable_has_bad_input_rows() -> None:
    public = _public_callables()
    covered = {case.target for case in CASES}
    missing = sorted(set(public) - covered - set(EXEMPT))
    assert not missing, (
        f"public callables without bad-input rows: {missing}. Add rows to CASES in "
        "tests/test_bad_inputs.py (wrong types and shapes, NaN/inf, empty or single-sample "
        "input, non-bool flags, unknown option names) or, if it takes no arguments, an "
        "entry with the reason to EXEMPT."
    )
    stale = sorted((covered | set(EXEMPT)) - set(public))
    assert not stale, f"rows or exemptions for names that are not public (renamed?): {stale}"
    assert not covered & set(EXEMPT), "a name is both exempt and covered"


def _bool_parameters(value: object) -> list[str]:
    """Names of the ``bool``-annotated parameters of a function, or a class's methods."""
    functions: list[object] = [value]
    if isinstance(value, type):
        functions = [value.__init__] + [
            getattr(value, m) for m in ("forward", "__call__", "step") if m in value.__dict__
        ]
    names: list[str] = []
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        names += [p.name for p in parameters if re.search(r"\bbool\b", str(p.annotation))]
    return names


def test_every_bool_flag_of_the_public_api_has_non_bool_rows() -> None:
    # A flag given "no" or 1 must raise, not be read as truthy: each flag needs its rows.
    flagged = {(case.target, case.label.split("=")[0]) for case in CASES if '="no"' in case.label}
    missing = [
        f"{target}({name}=)"
        for target, value in _public_callables().items()
        for name in _bool_parameters(value)
        if (target, name) not in flagged
    ]
    assert not missing, f"bool flags without flag_rows(...) in tests/test_bad_inputs.py: {missing}"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.target}: {c.label}")
def test_bad_input_raises_a_clear_error_naming_the_argument(case: Case) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        case.call()
    message = str(info.value)
    assert isinstance(info.value, case.error), (
        f"expected {case.error.__name__}, got {type(info.value).__name__}: {message}"
    )
    assert re.match(case.names, message), f"message should start with {case.names!r}: {message}"
