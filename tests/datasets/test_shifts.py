"""Shifts: each really moves the target away from the source, composes and is named."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from transferkit import datasets as D


def test_digits_invert_is_exact_complement_of_unshifted_images() -> None:
    plain = D.digits("none", seed=0)
    inverted = D.digits("invert", seed=0)
    assert torch.allclose(inverted.target_x, 1.0 - plain.target_x, atol=1e-6)
    assert torch.equal(inverted.source_x, plain.source_x)


def _source_to_target_accuracy(task: D.DomainTask) -> tuple[float, float]:
    flat = task.flat()
    clf = LogisticRegression(max_iter=2000).fit(flat.source_x.numpy(), flat.source_y.numpy())
    source_acc = clf.score(flat.source_test_x.numpy(), flat.source_test_y.numpy())
    target_acc = clf.score(flat.target_test_x.numpy(), flat.target_test_y.numpy())
    return source_acc, target_acc


@pytest.mark.parametrize(
    "shift", [D.rotate(90), D.invert(), D.noise(0.5), D.translate(2), D.blur(1.5)]
)
def test_shifted_target_really_differs_a_source_classifier_drops(shift: D.Shift) -> None:
    source_acc, target_acc = _source_to_target_accuracy(D.digits(shift, size=8))
    assert source_acc > 0.9
    assert target_acc < source_acc - 0.05, (shift.name, source_acc, target_acc)


def test_unshifted_target_keeps_source_accuracy() -> None:
    source_acc, target_acc = _source_to_target_accuracy(D.digits("none", size=8))
    assert abs(source_acc - target_acc) < 0.05


def test_composed_shifts_apply_in_order_and_are_named() -> None:
    task = D.digits([D.rotate(30), D.invert()], size=8)
    assert task.name == "digits[rotate(30)+invert]"


def test_source_shift_changes_the_source_domain() -> None:
    task = D.digits("none", source_shift="invert")
    plain = D.digits("none")
    assert torch.allclose(task.source_x, 1 - plain.source_x, atol=1e-6)
    assert task.name == "digits[invert->none]"


def test_rotate_turns_counter_clockwise_and_translate_moves_right_and_down() -> None:
    import numpy as np

    image = np.zeros((1, 9, 9))
    image[0, 4, 7] = 1.0  # right of the centre pixel (4, 4)
    turned = D.rotate(90).apply(image, 1.0, np.random.default_rng(0))
    assert np.argwhere(turned[0] > 0.5).tolist() == [[1, 4]]  # now above the centre
    moved = D.translate(0.5).apply(image, 2.0, np.random.default_rng(0))  # 0.5 px of 8 at 2x
    assert np.argwhere(moved[0] > 0.5).tolist() == [[5, 8]]


@pytest.mark.parametrize("shift", [D.rotate(30), D.blur(1.0), D.translate(1.5), D.invert()])
def test_deterministic_shifts_treat_each_image_on_its_own(shift: D.Shift) -> None:
    # a shift of a batch equals the shift of each image alone: nothing mixes across the
    # batch axis (a wrong rotation axis or a blur over the batch would)
    import numpy as np

    batch = np.random.default_rng(0).random((5, 12, 12))
    together = shift.apply(batch, 1.5, np.random.default_rng(0))
    alone = np.concatenate(
        [shift.apply(batch[i : i + 1], 1.5, np.random.default_rng(0)) for i in range(5)]
    )
    np.testing.assert_allclose(together, alone, atol=1e-12)
