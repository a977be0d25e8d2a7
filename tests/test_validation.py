from __future__ import annotations

import pytest
import torch

from transferkit._validation import (
    check_binary_mask,
    check_bool,
    check_features,
    check_labels,
    check_not_meta,
    check_option,
    check_pair,
    check_positive,
    check_same_width,
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


def test_check_same_width_names_both_arguments_for_arrays_and_tensors() -> None:
    import numpy as np

    check_same_width(np.zeros((2, 3)), torch.zeros(5, 3), ("source", "target"))
    with pytest.raises(ValueError, match="^source and target: expected the same feature dim"):
        check_same_width(torch.zeros(2, 3), torch.zeros(2, 4), ("source", "target"))
    with pytest.raises(
        ValueError, match=r"^a and b: expected the same number of columns, got 1 and 2$"
    ):
        check_same_width(np.zeros((3, 1)), np.zeros((3, 2)), ("a", "b"), what="number of columns")


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


@pytest.mark.parametrize("bad", ["no", "False", 1, 0, 1.0, None, torch.tensor(True)])
def test_check_bool_rejects_truthy_stand_ins(bad: object) -> None:
    with pytest.raises(TypeError, match="progress: expected True or False, got"):
        check_bool(bad, "progress")


def test_check_bool_accepts_bools_and_optional_none() -> None:
    assert check_bool(True, "amp") is True
    assert check_bool(None, "randomized", optional=True) is None
    with pytest.raises(TypeError, match="randomized: expected True, False or None"):
        check_bool("auto", "randomized", optional=True)


def test_meta_tensors_are_refused_with_the_argument_name() -> None:
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="source: expected a tensor with data, got a meta-device"):
        check_not_meta(meta, "source")
    with pytest.raises(ValueError, match="target: expected a tensor with data"):
        check_features(meta, "target")


@pytest.mark.parametrize(
    "mask", [torch.tensor([[1, 2]]), torch.tensor([[0.5, 1.0]]), torch.tensor([[-1, 0]])]
)
def test_check_binary_mask_rejects_values_other_than_zero_and_one(mask: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="attention_mask: expected entries 0 or 1"):
        check_binary_mask(mask, "attention_mask")


def test_check_binary_mask_accepts_bool_int_and_float_masks() -> None:
    for mask in (torch.tensor([[True, False]]), torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]])):
        check_binary_mask(mask, "attention_mask")


def test_masked_mean_rejects_masks_outside_zero_and_one() -> None:
    # A mask of 2s (or 0.5s) used to weight tokens silently instead of selecting them.
    from transferkit.features import masked_mean

    hidden = torch.randn(2, 3, 4)
    for mask in (torch.tensor([[1, 2, 0], [1, 1, 1]]), torch.tensor([[1.0, 0.5, 0], [1, 1, 1]])):
        with pytest.raises(ValueError, match="attention_mask: expected entries 0 or 1"):
            masked_mean(hidden, mask)
    keep = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(masked_mean(hidden, keep)[0], hidden[0, :2].mean(0))
