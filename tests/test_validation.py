from __future__ import annotations

import pytest
import torch

from transferkit._validation import (
    check_features,
    check_labels,
    check_option,
    check_pair,
    check_positive,
    check_tensor,
    did_you_mean,
)


def test_check_option_suggests_close_match() -> None:
    with pytest.raises(ValueError, match=r"estimator: .*did you mean 'unbiased'"):
        check_option("unbiassed", "estimator", ("biased", "unbiased", "linear"))


def test_check_tensor_names_argument_and_shape() -> None:
    with pytest.raises(ValueError, match=r"source: expected a 2-D tensor, got shape \(3,\)"):
        check_tensor(torch.zeros(3), "source", ndim=2)
    with pytest.raises(TypeError, match="source: expected a torch.Tensor"):
        check_tensor([1, 2], "source")


def test_check_features_rejects_nan_inf_and_small_batches() -> None:
    bad = torch.zeros(3, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="target: expected finite values, found 1"):
        check_features(bad, "target")
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        check_features(torch.zeros(1, 2), "target", min_samples=2)
    with pytest.raises(TypeError, match="floating-point"):
        check_features(torch.zeros(2, 2, dtype=torch.long), "target")


def test_check_pair_reports_dim_and_dtype_mismatch() -> None:
    with pytest.raises(ValueError, match=r"same feature shape, got \(3,\) and \(4,\)"):
        check_pair(torch.zeros(2, 3), torch.zeros(2, 4), ("source", "target"))
    with pytest.raises(TypeError, match="same dtype"):
        check_pair(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), ("a", "b"))


def test_check_labels_range() -> None:
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        check_labels(torch.tensor([0, 3]), "labels", num_classes=3)
    with pytest.raises(TypeError, match="integer"):
        check_labels(torch.tensor([0.0]), "labels")


def test_check_positive() -> None:
    assert check_positive(0, "x", strict=False) == 0.0
    with pytest.raises(ValueError, match="x: expected a finite value > 0"):
        check_positive(0, "x")
    with pytest.raises(TypeError):
        check_positive(True, "x")


def test_did_you_mean_empty_when_nothing_close() -> None:
    assert did_you_mean("zzz", ["layer1"]) == ""
