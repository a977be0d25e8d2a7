from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

import transferkit as tk
from transferkit import datasets as D

ALL_SHIFTS = ["none", "rotate", "invert", "noise", "blur", "translate"]


@pytest.mark.parametrize("shift", ALL_SHIFTS)
def test_digits_shapes_dtypes_and_label_ranges(shift: str) -> None:
    task = D.digits(shift, size=16, seed=0)
    total = 0
    for x in (task.source_x, task.source_test_x, task.target_x, task.target_test_x):
        assert x.dtype == torch.float32
        assert x.shape[1:] == (1, 16, 16)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        total += x.shape[0]
    assert total == 1797
    for y in (task.source_y, task.source_test_y, task.target_test_y, task.target_y):
        assert y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))
    assert task.target_y.shape[0] == task.target_x.shape[0]
    assert task.num_classes == 10


def test_digits_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = D.digits(D.noise(0.2), seed=3)
    b = D.digits(D.noise(0.2), seed=3)
    c = D.digits(D.noise(0.2), seed=4)
    assert torch.equal(a.target_x, b.target_x)
    assert torch.equal(a.source_y, b.source_y)
    assert not torch.equal(a.source_x[:50], c.source_x[:50])


def test_digits_original_size_is_eight_pixels() -> None:
    task = D.digits("none", size=8)
    assert task.input_shape == (1, 8, 8)


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


def test_few_shot_draws_k_per_class_deterministically() -> None:
    task = D.digits("rotate")
    x, y = task.few_shot(3, seed=1)
    x2, y2 = task.few_shot(3, seed=1)
    x3, _ = task.few_shot(3, seed=2)
    assert x.shape == (30, 1, 16, 16)
    assert y.bincount().tolist() == [3] * 10
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    # the samples really come from the target training split with their true labels
    matches = (task.target_x.flatten(1)[None] == x.flatten(1)[:, None]).all(-1)
    rows = matches.float().argmax(1)
    assert bool(matches.any(1).all())
    assert torch.equal(task.target_y[rows], y)


def test_few_shot_rejects_too_many_or_bad_k() -> None:
    task = D.digits("rotate")
    with pytest.raises(ValueError, match="k: class"):
        task.few_shot(10_000)
    with pytest.raises(ValueError, match="k"):
        task.few_shot(0)


def test_digits_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"shift: .*did you mean 'rotate'"):
        D.digits("rotat")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shift"):
        D.digits(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        D.digits(size=4)
    with pytest.raises(ValueError, match="std"):
        D.noise(-1.0)


def test_moons_target_is_source_distribution_rotated_by_angle() -> None:
    task = D.moons(35, n_samples=600, seed=0)
    clf = LogisticRegression().fit(task.source_x.numpy(), task.source_y.numpy())
    # undo the rotation: a linear classifier trained on source then scores like on source
    unrotated = D.rotate_points(task.target_test_x.numpy(), -35)
    source_acc = clf.score(task.source_test_x.numpy(), task.source_test_y.numpy())
    back_acc = clf.score(unrotated, task.target_test_y.numpy())
    shifted_acc = clf.score(task.target_test_x.numpy(), task.target_test_y.numpy())
    assert abs(back_acc - source_acc) < 0.06
    assert shifted_acc < source_acc - 0.05
    # the rotation preserves the distance of every point from the centre
    radius = np.linalg.norm(task.target_x.numpy() - np.array(D.MOONS_CENTER), axis=1)
    radius_back = np.linalg.norm(
        D.rotate_points(task.target_x.numpy(), -35) - np.array(D.MOONS_CENTER), axis=1
    )
    np.testing.assert_allclose(radius, radius_back, rtol=1e-6)


@given(
    angle=st.floats(-180, 180),
    points=st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=20),
)
def test_rotate_points_round_trip_and_preserves_distances(
    angle: float, points: list[tuple[float, float]]
) -> None:
    p = np.array(points)
    rotated = D.rotate_points(p, angle)
    np.testing.assert_allclose(D.rotate_points(rotated, -angle), p, atol=1e-9)
    if len(p) > 1:
        np.testing.assert_allclose(
            np.linalg.norm(rotated[0] - rotated[1]), np.linalg.norm(p[0] - p[1]), atol=1e-9
        )


def test_make_loader_is_seeded_and_infinite_cycles() -> None:
    task = D.moons(n_samples=100)
    first = [b[1].tolist() for b in D.make_loader(task.source_x, task.source_y, seed=5)]
    second = [b[1].tolist() for b in D.make_loader(task.source_x, task.source_y, seed=5)]
    assert first == second
    stream = D.infinite(D.make_loader(task.source_x, batch_size=32))
    sizes = [next(stream)[0].shape[0] for _ in range(6)]
    assert sizes[:3] == [32, 32, 6] and sizes[3:] == [32, 32, 6]


def test_make_loader_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="y: expected 4 labels"):
        D.make_loader(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


def test_top_level_exposes_datasets() -> None:
    assert tk.datasets.digits is D.digits
