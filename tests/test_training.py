from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

import transferkit as tk
from transferkit.training import EarlyStopping, class_weights

# --------------------------------------------------------------------------- EarlyStopping


def reference_stop_index(
    metrics: list[float], patience: int, min_delta: float, mode: str
) -> tuple[int | None, int]:
    """An independent plain-Python reference: (index where stop fires, best index)."""
    best = None
    best_index = -1
    bad = 0
    for i, value in enumerate(metrics):
        sign = 1.0 if mode == "min" else -1.0
        if best is None or sign * value < sign * best - min_delta:
            best, best_index, bad = value, i, 0
        else:
            bad += 1
        if bad >= patience:
            return i, best_index
    return None, best_index


def set_weight(model: nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)


@given(
    metrics=st.lists(
        st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=1, max_size=30
    ),
    patience=st.integers(1, 5),
    min_delta=st.sampled_from([0.0, 0.01, 0.5]),
    mode=st.sampled_from(["min", "max"]),
)
def test_early_stopping_fires_where_a_reference_implementation_does(
    metrics: list[float], patience: int, min_delta: float, mode: str
) -> None:
    stopper = EarlyStopping(patience, min_delta, mode=mode, restore_best=False)  # type: ignore[arg-type]
    fired_at = None
    for i, value in enumerate(metrics):
        if stopper.step(value):
            fired_at = i
            break
    expected_stop, expected_best = reference_stop_index(metrics, patience, min_delta, mode)
    assert fired_at == expected_stop
    assert stopper.best_step == expected_best
    assert stopper.best == metrics[expected_best]


def test_early_stopping_restores_the_best_weights_when_it_stops() -> None:
    model = nn.Linear(3, 2)
    stopper = EarlyStopping(patience=2, mode="max")
    history = [(0.5, 1.0), (0.9, 2.0), (0.8, 3.0), (0.7, 4.0)]
    decisions = []
    for accuracy, weight in history:
        set_weight(model, weight)
        decisions.append(stopper.step(accuracy, model))
    assert decisions == [False, False, False, True]
    assert torch.all(model.weight == 2.0) and torch.all(model.bias == -2.0)


def test_early_stopping_keeps_weights_when_restore_best_is_false() -> None:
    model = nn.Linear(3, 2)
    stopper = EarlyStopping(patience=1, restore_best=False)
    set_weight(model, 1.0)
    stopper.step(0.1, model)
    set_weight(model, 7.0)
    assert stopper.step(0.2, model)
    assert torch.all(model.weight == 7.0)
    assert stopper.best_state is None
    with pytest.raises(RuntimeError, match="no best weights"):
        stopper.restore(model)


def test_best_snapshot_is_an_independent_cpu_copy() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    stopper = EarlyStopping(patience=3)
    stopper.step(1.0, model)
    snapshot = stopper.best_state
    assert snapshot is not None
    before = {k: v.clone() for k, v in snapshot.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 2))  # changes running statistics in place
    for key, value in snapshot.items():
        assert value.device.type == "cpu"
        assert torch.equal(value, before[key])
        assert value.data_ptr() != model.state_dict()[key].data_ptr()


def test_min_delta_ignores_tiny_improvements() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1, restore_best=False)
    assert not stopper.step(1.0)
    assert not stopper.step(0.95)  # better, but by less than min_delta
    assert stopper.step(0.92)
    assert stopper.best == 1.0


def test_early_stopping_accepts_one_element_tensors_and_numpy_numbers() -> None:
    stopper = EarlyStopping(patience=2, restore_best=False)
    stopper.step(torch.tensor([0.5]))
    stopper.step(np.float32(0.25))
    assert stopper.best == 0.25


def test_resumed_run_stops_at_the_same_step_as_an_uninterrupted_one(tmp_path: Path) -> None:
    metrics = [1.0, 0.8, 0.85, 0.7, 0.75, 0.76, 0.9, 0.95]
    model = nn.Linear(2, 2)
    full = EarlyStopping(patience=3)
    full_stop = next(i for i, m in enumerate(metrics) if full.step(m, model))

    first = EarlyStopping(patience=3)
    for i, m in enumerate(metrics[:4]):
        set_weight(model, float(i))
        first.step(m, model)
    path = tmp_path / "stopper.pt"
    torch.save(first.state_dict(), path)

    resumed_model = nn.Linear(2, 2)
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.best == first.best and resumed.num_bad_steps == first.num_bad_steps
    stop = None
    for i, m in enumerate(metrics[4:], start=4):
        set_weight(resumed_model, 100.0 + i)
        if resumed.step(m, resumed_model):
            stop = i
            break
    assert stop == full_stop
    assert torch.all(resumed_model.weight == 3.0)  # the weights of the best step (index 3)


def test_load_state_dict_refuses_the_other_mode_and_missing_keys() -> None:
    state = EarlyStopping(mode="max", restore_best=False).state_dict()
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="min").load_state_dict(state)
    with pytest.raises(KeyError, match="best"):
        EarlyStopping().load_state_dict({"steps": 1})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patience": 0}, ValueError, "patience"),
        ({"patience": 1.5}, TypeError, "patience"),
        ({"min_delta": -0.1}, ValueError, "min_delta"),
        ({"mode": "maximum"}, ValueError, "mode.*did you mean"),
        ({"restore_best": "yes"}, TypeError, "restore_best"),
    ],
)
def test_early_stopping_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metric", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (torch.zeros(2), TypeError),
        ("0.5", TypeError),
        (True, TypeError),
    ],
)
def test_early_stopping_rejects_bad_metrics(metric: object, error: type[Exception]) -> None:
    stopper = EarlyStopping(restore_best=False)
    with pytest.raises(error, match="metric"):
        stopper.step(metric)  # type: ignore[arg-type]


def test_early_stopping_needs_a_model_to_restore() -> None:
    with pytest.raises(TypeError, match="model"):
        EarlyStopping().step(0.5)


@pytest.mark.slow
def test_early_stopping_on_moons_returns_the_best_validation_model() -> None:
    tk.seed_everything(0)
    task = tk.datasets.moons(0, n_samples=300, noise=0.25, seed=0)
    model = tk.models.MLP(2, 2, hidden=(64, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    stopper = EarlyStopping(patience=5, mode="max")
    accuracies = []

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return float((model(task.source_test_x).argmax(1) == task.source_test_y).float().mean())

    for _ in range(200):
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(task.source_x), task.source_y).backward()
        optimizer.step()
        accuracies.append(evaluate())
        if stopper.step(accuracies[-1], model):
            break
    assert stopper.stopped and len(accuracies) < 200
    assert stopper.best == max(accuracies)
    assert evaluate() == pytest.approx(max(accuracies))
    assert max(accuracies) > 0.85


# --------------------------------------------------------------------------- class_weights


@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    method=st.sampled_from(["balanced", "inverse_sqrt"]),
)
def test_class_weights_match_scikit_learn_on_present_classes(
    labels: list[int], method: str
) -> None:
    y = np.asarray(labels)
    present = np.unique(y)
    expected = compute_class_weight("balanced", classes=present, y=y)
    if method == "inverse_sqrt":
        expected = np.sqrt(expected)
    weights = class_weights(torch.as_tensor(y), num_classes=8, method=method)  # type: ignore[arg-type]
    assert weights.shape == (8,) and weights.dtype == torch.float32
    np.testing.assert_allclose(weights[present].numpy(), expected, rtol=1e-6)
    absent = np.setdiff1d(np.arange(8), present)
    assert torch.all(weights[absent] == 0)


@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60))
def test_balanced_weights_make_every_present_class_weigh_the_same(labels: list[int]) -> None:
    y = torch.tensor(labels)
    weights = class_weights(y).double()
    counts = torch.bincount(y).double()
    per_class = (weights * counts)[counts > 0]
    # each present class carries n / C in total, so the total is n
    assert torch.allclose(per_class, per_class[0].expand_as(per_class))
    assert math.isclose(float(per_class.sum()), len(labels), rel_tol=1e-6)


def test_class_weights_default_num_classes_is_max_label_plus_one() -> None:
    assert class_weights(np.array([0, 1, 1, 3])).shape == (4,)


def test_class_weights_accept_lists_and_arrays_alike() -> None:
    a = class_weights([0, 1, 1])
    b = class_weights(np.array([0, 1, 1]))
    c = class_weights(torch.tensor([0, 1, 1]))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_class_weights_do_not_modify_the_labels() -> None:
    y = torch.tensor([2, 0, 2, 1])
    before = y.clone()
    class_weights(y, method="inverse_sqrt")
    assert torch.equal(y, before)


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (torch.tensor([]), {}, TypeError, "labels"),
        (torch.tensor([], dtype=torch.long), {}, ValueError, "at least one"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "integer"),
        (torch.tensor([[0, 1]]), {}, ValueError, "1-D"),
        (torch.tensor([0, -1]), {}, ValueError, "class indices"),
        (torch.tensor([0, 3]), {"num_classes": 3}, ValueError, r"\[0, 2\]"),
        (torch.tensor([0, 1]), {"num_classes": 0}, ValueError, "num_classes"),
        (torch.tensor([0, 1]), {"method": "sqrt"}, ValueError, "method"),
        ([0, 1.5], {}, TypeError, "labels"),
        ("01", {}, TypeError, "labels"),
    ],
)
def test_class_weights_reject_bad_input(
    labels: object, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        class_weights(labels, **kwargs)  # type: ignore[arg-type]


def test_class_weights_log_absent_classes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="transferkit.training"):
        class_weights([0, 0, 2], num_classes=4)
    assert "[1, 3]" in caplog.text


@pytest.mark.slow
def test_class_weights_raise_minority_recall_on_imbalanced_digits() -> None:
    task = tk.datasets.digits("none", size=8, seed=0)
    x = task.source_x.flatten(1)
    y = task.source_y
    # keep only 5% of class 3 to make it a rare class
    keep = (y != 3) | (torch.arange(len(y)) % 20 == 0)
    x, y = x[keep], y[keep]
    test_x, test_y = task.source_test_x.flatten(1), task.source_test_y
    recalls = {}
    for name, weight in (("plain", None), ("weighted", class_weights(y))):
        torch.manual_seed(0)
        model = nn.Linear(x.shape[1], 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        for _ in range(60):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            pred = model(test_x).argmax(1)
        recalls[name] = float((pred[test_y == 3] == 3).float().mean())
    assert recalls["weighted"] > recalls["plain"]


def test_early_stopping_state_dict_returns_copies_of_the_best_weights() -> None:
    model = nn.Linear(3, 2)
    stopper = EarlyStopping(patience=2)
    stopper.step(1.0, model)
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = stopper.state_dict()
    # Editing what state_dict() returned (tensors in place, or the mapping itself) must
    # not reach the snapshot that restore_best loads.
    for tensor in state["best_state"].values():
        tensor.add_(100.0)
    state["best_state"]["weight"] = torch.zeros(2, 3)
    state["best_state"].pop("bias")
    with torch.no_grad():
        model.weight.mul_(3.0)
    stopper.step(2.0, model)
    stopper.step(3.0, model)  # patience exhausted: the best weights are restored
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key
    fresh = stopper.state_dict()["best_state"]
    assert all(torch.equal(fresh[k], best[k]) for k in best)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int32, torch.uint16, torch.uint32, torch.uint64]
)
def test_class_weights_accept_every_integer_dtype(dtype: torch.dtype) -> None:
    labels = [0, 0, 0, 1, 2, 2]
    expected = class_weights(torch.tensor(labels))
    torch.testing.assert_close(class_weights(torch.tensor(labels, dtype=dtype)), expected)
    np_dtype = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}
    if dtype in np_dtype:
        torch.testing.assert_close(class_weights(np.array(labels, dtype=np_dtype[dtype])), expected)
    torch.testing.assert_close(class_weights(torch.tensor(labels, dtype=dtype), 4)[:3], expected)


def test_class_weights_name_labels_for_out_of_range_unsigned_values() -> None:
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 2\]"):
        class_weights(np.array([0, 5], dtype=np.uint64), num_classes=3)
    with pytest.raises(ValueError, match="labels: expected class indices below 2"):
        class_weights(np.array([0, 2**63 + 1], dtype=np.uint64))
