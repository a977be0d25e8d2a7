"""The public names promised by the API contract (shared/API.md) exist and are documented."""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest

import transferkit as tk

TOP_LEVEL = [
    "resolve_device", "to_device", "autocast", "seed_everything", "dataloader_kwargs",
    "freeze", "unfreeze", "trainable_summary", "param_groups", "GradualUnfreezing",
    "ClassifierHead", "find_head", "replace_head",
    "FeatureExtractor", "extract_features",
    "grad_reverse", "GradientReversal", "WarmStartSchedule", "DomainDiscriminator",
    "DomainAdversarialLoss", "ConditionalDomainAdversarialLoss", "MarginDisparityDiscrepancy",
    "adapt_batchnorm", "DomainSpecificBatchNorm", "convert_domain_bn", "bn_domain",
    "PseudoLabeler", "FixMatchLoss", "recipe", "Recipe",
]  # fmt: skip
QUALIFIED = {
    "kernels": ["GaussianKernel", "LinearKernel", "PolynomialKernel", "LaplacianKernel"],
    "losses": [
        "mmd", "MMDLoss", "JointMMDLoss", "coral", "CORALLoss", "distillation", "L2SP",
        "entropy", "bss", "mcc", "MCCLoss", "bnm", "BNMLoss", "adaptive_feature_norm",
        "AdaptiveFeatureNormLoss",
    ],
    "sklearn": [
        "DeepFeatures", "TorchKernelSVC", "CORAL", "TCA", "SubspaceAlignment",
        "make_deep_svm_pipeline", "PrototypeClassifier",
    ],
    "selection": [
        "logme", "leep", "hscore", "nce", "rank", "iwcv", "dev", "snd", "prediction_entropy",
    ],
    "datasets": ["DomainTask", "digits", "moons"],
    "metrics": ["proxy_a_distance"],
    "augment": ["random_affine", "color_jitter", "cutout", "weak", "strong"],
    "recipes": ["recipe", "available", "Recipe"],
    "distributed": ["all_gather"],
    "schedules": ["extend_scheduler", "FactorSchedule", "one_cycle", "warmup_cosine"],
}  # fmt: skip


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_name_exists_and_is_documented(name: str) -> None:
    obj = getattr(tk, name)
    assert name in tk.__all__
    assert inspect.getdoc(obj), f"tk.{name} has no docstring"
    assert "Examples:" in (inspect.getdoc(obj) or ""), f"tk.{name} has no Examples section"


@pytest.mark.parametrize(
    ("module", "name"), [(m, n) for m, names in QUALIFIED.items() for n in names]
)
def test_submodule_name_exists_and_is_documented(module: str, name: str) -> None:
    obj = getattr(getattr(tk, module), name)
    assert inspect.getdoc(obj), f"tk.{module}.{name} has no docstring"


PACKAGES = [
    "adversarial",
    "datasets",
    "features",
    "freezing",
    "heads",
    "kernels",
    "losses",
    "meta",
    "plot",
    "selection",
    "sklearn",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_objects_report_their_public_package(package: str) -> None:
    # Pickles, reprs and the feature cache's model fingerprints name ``__module__``:
    # it must be the public path, which stays put when code moves between private files.
    if package == "plot":
        pytest.importorskip("matplotlib")
    module = importlib.import_module(f"transferkit.{package}")
    for name in module.__all__:
        obj = getattr(module, name)
        home = getattr(obj, "__module__", None)
        if isinstance(home, str) and home.startswith("transferkit"):
            assert home == module.__name__, f"{package}.{name} reports {home}"
            if inspect.isclass(obj) or inspect.isfunction(obj):
                restored = pickle.loads(pickle.dumps(obj))
                assert restored is obj
