"""Synthetic tasks: the shifted digits and the rotated two moons."""

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


def test_top_level_exposes_datasets() -> None:
    assert tk.datasets.digits is D.digits


@pytest.mark.parametrize("seed", [0, 7])
def test_digits_parts_are_disjoint_and_each_image_keeps_its_label(seed: int) -> None:
    # an independent reference: scikit-learn's digits, keyed by their 64 pixel values
    from sklearn.datasets import load_digits

    bunch = load_digits()
    label_of = {
        bytes(row.astype(np.uint8)): int(y) for row, y in zip(bunch.data, bunch.target, strict=True)
    }
    assert len(label_of) == 1797  # the digits hold no duplicate image
    task = D.digits("none", size=8, seed=seed)
    parts = [
        (task.source_x, task.source_y),
        (task.source_test_x, task.source_test_y),
        (task.target_x, task.target_y),
        (task.target_test_x, task.target_test_y),
    ]
    seen: set[bytes] = set()
    for x, y in parts:
        keys = [bytes((row * 16).round().to(torch.uint8).flatten().numpy()) for row in x]
        assert [label_of[k] for k in keys] == y.tolist()  # image and label stay paired
        assert seen.isdisjoint(keys)  # no image in two parts (no train/test leak)
        seen.update(keys)
    assert len(seen) == 1797
    # a shift transforms the images in place in the order: labels stay aligned
    inverted = D.digits("invert", size=8, seed=seed)
    torch.testing.assert_close(inverted.target_x, 1.0 - task.target_x)
    torch.testing.assert_close(inverted.target_test_x, 1.0 - task.target_test_x)
    assert torch.equal(inverted.target_y, task.target_y)
    assert torch.equal(inverted.source_x, task.source_x)
