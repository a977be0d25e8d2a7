"""`tk.recipe`: published defaults and the helpers that put them into a loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transferkit as tk


@pytest.mark.parametrize("method", tk.recipes.available())
def test_every_recipe_is_valid_and_serialisable(method: str) -> None:
    r = tk.recipe(method)
    assert r.method == method and r.reference
    data = r.to_dict()
    assert data["method"] == method and isinstance(data["options"], dict)
    assert r.lr_at(0.0) == r.lr
    assert 0.0 <= r.tradeoff_at(0.5) <= r.tradeoff


def test_annealing_follows_the_dann_formula() -> None:
    r = tk.recipe("dann")
    for p in (0.0, 0.3, 1.0):
        assert r.lr_at(p) == pytest.approx(0.01 * (1 + 10 * p) ** -0.75)
    assert r.lr_at(2.0) == r.lr_at(1.0)  # clipped


def test_dann_ramp_reaches_the_tradeoff_exactly_at_the_end() -> None:
    r = tk.recipe("dann", tradeoff=0.5)
    assert r.tradeoff_at(0.0) == 0.0
    assert r.tradeoff_at(1.0) == 0.5
    expected = 0.5 * (2 / (1 + math.exp(-2.0)) - 1) / (2 / (1 + math.exp(-10.0)) - 1)
    assert r.tradeoff_at(0.2) == pytest.approx(expected)
    assert tk.recipe("afn").tradeoff_at(0.0) == 0.05  # no ramp


def test_scheduler_anneals_every_group_from_its_own_lr() -> None:
    r = tk.recipe("dann")
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = r.optimizer([{"params": [a]}, {"params": [b], "lr": 0.1}])
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    scheduler = r.scheduler(optimizer, max_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = (1 + 10 * 0.5) ** -0.75
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * factor)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * factor)


@given(st.floats(0, 1), st.floats(0, 1))
def test_lr_decreases_and_tradeoff_increases_with_progress(p: float, q: float) -> None:
    r = tk.recipe("cdan")
    lo, hi = min(p, q), max(p, q)
    assert r.lr_at(hi) <= r.lr_at(lo)
    assert r.tradeoff_at(hi) >= r.tradeoff_at(lo)


def test_recipe_pickles_and_copies() -> None:
    import copy
    import pickle

    r = tk.recipe("mcc", lr=0.03)
    assert pickle.loads(pickle.dumps(r)) == r
    assert copy.deepcopy(r) == r


def test_recipe_is_frozen() -> None:
    r = tk.recipe("mcc")
    with pytest.raises(AttributeError):
        r.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.options["temperature"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("danm",), {}, ValueError, "did you mean .*'dann'"),
        ((3,), {}, TypeError, "method"),
        (("dann",), {"learning_rate": 0.1}, ValueError, "learning_rate"),
        (("dann",), {"lr": -0.1}, ValueError, "lr"),
        (("dann",), {"lr": float("nan")}, ValueError, "lr"),
        (("dann",), {"momentum": 2.0}, ValueError, "momentum"),
        (("dann",), {"ramp": "cosine"}, ValueError, "ramp"),
        (("dann",), {"bn": "batch"}, ValueError, "bn"),
        (("dann",), {"batch_size": 0}, ValueError, "batch_size"),
        (("dann",), {"nesterov": 1}, TypeError, "nesterov"),
    ],
)
def test_recipe_rejects_bad_input(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        tk.recipe(*args, **kwargs)  # type: ignore[arg-type]


def test_helpers_reject_bad_progress_and_steps() -> None:
    r = tk.recipe("dann")
    with pytest.raises(TypeError, match="progress"):
        r.lr_at("end")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="progress"):
        r.tradeoff_at(float("nan"))
    optimizer = r.optimizer([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="max_steps"):
        r.scheduler(optimizer, max_steps=0)


def test_warmup_holds_the_tradeoff_at_zero_then_ramps_over_the_rest() -> None:
    r = tk.recipe("dann", warmup=0.5, ramp="linear", tradeoff=2.0)
    assert r.tradeoff_at(0.0) == 0.0
    assert r.tradeoff_at(0.49) == 0.0
    assert r.tradeoff_at(0.5) == 0.0
    assert r.tradeoff_at(0.75) == pytest.approx(1.0)
    assert r.tradeoff_at(1.0) == 2.0
    assert tk.recipe("dann").warmup == 0.0  # the published recipes start at once


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), True, "half"])
def test_warmup_must_be_a_fraction_below_one(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="warmup"):
        tk.recipe("self_training", warmup=value)


def test_pseudo_labeler_from_the_recipe_warms_up_then_ramps() -> None:
    r = tk.recipe("self_training")
    labeler = r.pseudo_labeler(10, max_steps=10)
    assert labeler.threshold == r.options["threshold"]
    assert labeler.balance == "distribution"
    weights = []
    for _ in range(11):
        weights.append(labeler.weight)
        labeler.step()
    # the labeler's weight follows the recipe's tradeoff_at step by step
    assert weights == pytest.approx([r.tradeoff_at(i / 10) for i in range(11)])
    assert weights[: round(10 * r.warmup) + 1] == [0.0] * (round(10 * r.warmup) + 1)
    instant = tk.recipe("self_training", ramp="none", warmup=0.0).pseudo_labeler(3, max_steps=5)
    assert instant.weight == r.tradeoff
    with pytest.raises(ValueError, match="max_steps"):
        r.pseudo_labeler(10, max_steps=0)


def test_at_lr_keeps_the_published_norm_step_of_afn_and_only_the_lr_of_others() -> None:
    afn = tk.recipe("afn")
    assert afn.lr == 0.001 and afn.tradeoff == 0.05
    fast = afn.at_lr(0.1)
    assert fast.lr == 0.1
    assert fast.lr * fast.tradeoff == pytest.approx(afn.lr * afn.tradeoff)  # same step
    for method in ("dann", "mcc", "self_training"):
        r = tk.recipe(method)
        assert r.at_lr(0.1) == tk.recipe(method, lr=0.1)
    assert afn.at_lr(afn.lr) == afn
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="lr"):
            afn.at_lr(bad)  # type: ignore[arg-type]


def test_self_training_recipe_ships_a_mean_teacher() -> None:
    net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10))
    teacher = tk.recipe("self_training").mean_teacher(net)
    assert isinstance(teacher, tk.ModelEMA)
    assert teacher.decay == tk.recipe("self_training").options["teacher_decay"] == 0.99
    assert teacher.module is not net and not any(p.requires_grad for p in teacher.parameters())
    # the copy keeps the domain-specific BatchNorm, so it can run in the target domain
    with tk.bn_domain(teacher, "target"):
        assert teacher(torch.randn(4, 1, 16, 16)).shape == (4, 10)
    with pytest.raises(ValueError, match="teacher_decay"):
        tk.recipe("dann").mean_teacher(net)


def test_optimizer_warns_when_param_groups_drop_the_recipes_weight_decay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """tk.param_groups(model, lr) writes weight_decay=0.0 into every group, which overrides
    the recipe's SGD weight decay: before the fix the recipe trained without decay, silently.
    """
    import logging

    recipe = tk.recipe("dann")
    net = tk.models.SmallCNN(num_classes=3, width=4)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        silent = recipe.optimizer(tk.param_groups(net, recipe.lr))
    assert {g["weight_decay"] for g in silent.param_groups} == {0.0}
    assert "weight_decay" in caplog.text and "recipe.param_groups" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        optimizer = recipe.optimizer(recipe.param_groups(net))
        plain = recipe.optimizer(net.parameters())  # the optimiser's own default applies
        no_decay = tk.recipe("dann", weight_decay=0.0)
        no_decay.optimizer(tk.param_groups(net, no_decay.lr))  # intended: no warning
    assert caplog.text == ""
    assert plain.param_groups[0]["weight_decay"] == recipe.weight_decay
    by_name = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert by_name["fc"] == recipe.weight_decay
    assert by_name["fc (no_decay)"] == 0.0
    held = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in net.parameters())


def test_recipe_param_groups_follow_freezing_and_layer_decay() -> None:
    recipe = tk.recipe("dan").at_lr(0.1)
    net = tk.models.SmallCNN(num_classes=3, width=4)
    tk.freeze(net, until="features")
    groups = recipe.param_groups(net, layer_decay=0.5)
    assert {g["name"]: g["lr"] for g in groups} == {
        "neck.1": 0.05,
        "neck.1 (no_decay)": 0.05,
        "fc": 0.1,
        "fc (no_decay)": 0.1,
    }
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def test_options_override_changes_one_option_and_keeps_the_others() -> None:
    # before the fix options={...} replaced the whole mapping: changing the threshold
    # silently switched distribution alignment off and lost the teacher's decay
    recipe = tk.recipe("self_training", options={"threshold": 0.9})
    assert recipe.options["threshold"] == 0.9
    assert recipe.options["distribution_alignment"] == 1.0
    assert recipe.options["teacher_decay"] == tk.recipe("self_training").options["teacher_decay"]
    labeler = recipe.pseudo_labeler(10, max_steps=100)
    assert labeler.threshold == 0.9
    assert labeler.balance == "distribution"
    afn = tk.recipe("afn", options={"scale_tradeoff_with_lr": 0.0})
    assert afn.options["delta"] == 1.0 and afn.options["dropout"] == 0.5
    assert afn.at_lr(0.1).tradeoff == afn.tradeoff  # the paper's weight, unscaled
    assert tk.recipe("afn").options["scale_tradeoff_with_lr"] == 1.0  # defaults untouched
