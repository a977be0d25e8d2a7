"""Learning-rate schedulers and parameter groups added mid-run (gradual unfreezing).

The reference for "the new group follows the schedule" is torch itself: the same scheduler
built on an optimizer that had a group with the same lr from the start. The live run,
where the group is added later and the scheduler extended, must give the same lr (and
momentum) at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim import lr_scheduler as sched

import transferkit as tk
from transferkit.schedules import FactorSchedule, extend_scheduler, one_cycle, warmup_cosine

TOTAL = 24
Factory = Callable[[torch.optim.Optimizer], Any]


def _hf(name: str) -> Factory:
    def build(optimizer: torch.optim.Optimizer) -> Any:
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, name)(optimizer, 5, TOTAL)

    return build


def _sequential(optimizer: torch.optim.Optimizer) -> Any:
    warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=5)
    cosine = sched.CosineAnnealingLR(optimizer, T_max=TOTAL - 5, eta_min=1e-4)
    return sched.SequentialLR(optimizer, [warm, cosine], milestones=[5])


def _peaks(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


SCHEDULERS: dict[str, Factory] = {
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda step: 0.9**step),
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=_peaks(opt), total_steps=TOTAL),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=TOTAL, eta_min=1e-4),
    "LinearLR+SequentialLR": _sequential,
    "hf_linear_warmup": _hf("get_linear_schedule_with_warmup"),
    "hf_cosine_warmup": _hf("get_cosine_schedule_with_warmup"),
    "tk.one_cycle": lambda opt: one_cycle(opt, TOTAL),
    "tk.warmup_cosine": lambda opt: warmup_cosine(opt, TOTAL, warmup_steps=4, final_factor=0.01),
    "StepLR": lambda opt: sched.StepLR(opt, step_size=4, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[3, 9], gamma=0.3),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.9),
    "PolynomialLR": lambda opt: sched.PolynomialLR(opt, total_iters=TOTAL, power=2.0),
    "ConstantLR": lambda opt: sched.ConstantLR(opt, factor=0.5, total_iters=6),
    "CosineAnnealingWarmRestarts": lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=5),
    "CyclicLR": lambda opt: sched.CyclicLR(
        opt, base_lr=[lr / 10 for lr in _peaks(opt)], max_lr=_peaks(opt), step_size_up=3
    ),
    "MultiplicativeLR": lambda opt: sched.MultiplicativeLR(opt, lambda step: 0.95),
    "ChainedScheduler": lambda opt: sched.ChainedScheduler(
        [sched.ExponentialLR(opt, gamma=0.95), sched.StepLR(opt, step_size=5, gamma=0.5)]
    ),
}
BASES = [0.1, 0.03, 0.01]
# group index -> step at which it is added: mid-phase, and on phase boundaries (step 5:
# the SequentialLR milestone and the end of the warmups; step 1: the first step)
ADDED_AT = [{1: 4, 2: 11}, {1: 1, 2: 5}]


def new_param() -> nn.Parameter:
    return nn.Parameter(torch.zeros(2))


def group_values(optimizer: torch.optim.Optimizer) -> list[tuple[float, float]]:
    return [(float(g["lr"]), float(g.get("momentum", 0.0))) for g in optimizer.param_groups]


def reference_run(factory: Factory, steps: int) -> list[list[tuple[float, float]]]:
    """Per-step (lr, momentum) of every group when all groups exist from the start."""
    optimizer = torch.optim.SGD(
        [{"params": [new_param()], "lr": lr} for lr in BASES], lr=BASES[0], momentum=0.9
    )
    scheduler = factory(optimizer)
    values = []
    for _ in range(steps):
        values.append(group_values(optimizer))
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("added_at", ADDED_AT, ids=["mid-phase", "boundaries"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_group_added_mid_run_follows_schedule_as_if_present_from_start(
    name: str, added_at: dict[int, int]
) -> None:
    factory = SCHEDULERS[name]
    expected = reference_run(factory, TOTAL)
    optimizer = torch.optim.SGD([new_param()], lr=BASES[0], momentum=0.9)
    scheduler = factory(optimizer)
    for step in range(TOTAL):
        for index, at in added_at.items():
            if step == at:
                optimizer.add_param_group({"params": [new_param()], "lr": BASES[index]})
                assert extend_scheduler(scheduler) == [index]
                assert extend_scheduler(scheduler) == []  # idempotent
        live = group_values(optimizer)
        np.testing.assert_allclose(live, expected[step][: len(live)], rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(scheduler.get_last_lr(), [lr for lr, _ in live], rtol=1e-12)
        optimizer.step()
        scheduler.step()


@given(
    name=st.sampled_from([n for n in SCHEDULERS if not n.startswith("hf_")]),
    at=st.integers(0, TOTAL - 1),
    base=st.floats(1e-5, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_any_add_step_and_lr_matches_a_group_present_from_the_start(
    name: str, at: int, base: float
) -> None:
    """Invariant over the add step and the new group's lr, for every scheduler."""
    factory = SCHEDULERS[name]
    reference = torch.optim.SGD(
        [{"params": [new_param()], "lr": BASES[0]}, {"params": [new_param()], "lr": base}],
        momentum=0.9,
    )
    reference_scheduler = factory(reference)
    optimizer = torch.optim.SGD([new_param()], lr=BASES[0], momentum=0.9)
    scheduler = factory(optimizer)
    for step in range(TOTAL):
        if step == at:
            optimizer.add_param_group({"params": [new_param()], "lr": base})
            extend_scheduler(scheduler)
        live = group_values(optimizer)
        expected = group_values(reference)[: len(live)]
        np.testing.assert_allclose(live, expected, rtol=1e-9, atol=1e-15)
        for opt, s in ((optimizer, scheduler), (reference, reference_scheduler)):
            opt.step()
            s.step()


def test_reduce_on_plateau_keeps_new_group_lr_and_reduces_it_later() -> None:
    optimizer = torch.optim.SGD([new_param()], lr=0.1)
    scheduler = sched.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, min_lr=1e-3)
    scheduler.step(1.0)
    optimizer.add_param_group({"params": [new_param()], "lr": 0.04})
    assert extend_scheduler(scheduler) == [1]
    assert scheduler.min_lrs == [1e-3, 1e-3]
    assert optimizer.param_groups[1]["lr"] == 0.04
    scheduler.step(2.0)  # worse: both groups halve
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.02])


def test_factor_schedule_picks_up_groups_added_without_extend() -> None:
    optimizer = torch.optim.SGD([new_param()], lr=1.0)
    scheduler = one_cycle(optimizer, 10, pct_start=0.3, div_factor=10, final_div_factor=100)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer.add_param_group({"params": [new_param()], "lr": 0.5})  # no extend_scheduler
    for step in range(4, 10):
        optimizer.step()
        scheduler.step()
        factor = scheduler.lr_lambdas[0](step)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([factor, 0.5 * factor], rel=1e-12)


def hf_cosine_reference(step: int, warmup: int, total: int) -> float:
    """Hugging Face's get_cosine_schedule_with_warmup lambda, written out."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def fastai_one_cycle_reference(
    step: int, total: int, pct: float, div: float, final: float
) -> float:
    """fastai's combined_cos(pct, lr/div, lr, lr/div_final) for lr = 1."""
    warm = round(pct * total)

    def cos_anneal(start: float, end: float, p: float) -> float:
        return start + (1 + math.cos(math.pi * (1 - p))) * (end - start) / 2

    if step < warm:
        return cos_anneal(1 / div, 1.0, step / warm)
    if warm == total:
        return 1.0
    return cos_anneal(1.0, 1 / final, (step - warm) / (total - warm))


@given(
    total=st.integers(2, 60),
    warm_share=st.floats(0.0, 1.0),
    step=st.integers(0, 80),
)
@settings(max_examples=60, deadline=None)
def test_recipes_match_written_out_formulas(total: int, warm_share: float, step: int) -> None:
    optimizer = torch.optim.SGD([new_param()], lr=1.0)
    warmup = int(warm_share * total)
    cosine = warmup_cosine(optimizer, total, warmup_steps=warmup).lr_lambdas[0]
    expected = hf_cosine_reference(min(step, total), warmup, total)
    assert cosine(step) == pytest.approx(expected, abs=1e-12)
    cycle = one_cycle(optimizer, total, pct_start=warm_share, div_factor=25, final_div_factor=1e4)
    factor = cycle.lr_lambdas[0](step)
    expected = fastai_one_cycle_reference(min(step, total), total, warm_share, 25, 1e4)
    assert factor == pytest.approx(expected, rel=1e-9)
    assert 1e-4 - 1e-12 <= factor <= 1.0 + 1e-12


def test_warmup_cosine_equals_hugging_face_schedule_step_for_step() -> None:
    transformers = pytest.importorskip("transformers")
    ours = torch.optim.SGD([new_param()], lr=0.3)
    theirs = torch.optim.SGD([new_param()], lr=0.3)
    mine = warmup_cosine(ours, 30, warmup_steps=7)
    hf = transformers.get_cosine_schedule_with_warmup(theirs, 7, 30)
    for _ in range(30):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-15)
        for opt, s in ((ours, mine), (theirs, hf)):
            opt.step()
            s.step()


def test_recipes_and_extend_validate_arguments() -> None:
    optimizer = torch.optim.SGD([new_param()], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        one_cycle(optimizer, 0)
    with pytest.raises(TypeError, match="total_steps"):  # a bool is not a step count
        warmup_cosine(optimizer, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(optimizer, 10, pct_start=1.5)
    with pytest.raises(ValueError, match="div_factor"):
        one_cycle(optimizer, 10, div_factor=0.5)
    with pytest.raises(ValueError, match="final_div_factor"):
        one_cycle(optimizer, 10, final_div_factor=float("nan"))
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(optimizer, 10, warmup_steps=11)
    with pytest.raises(ValueError, match="final_factor"):
        warmup_cosine(optimizer, 10, final_factor=2.0)
    with pytest.raises(ValueError, match="warmup: expected one of"):
        warmup_cosine(optimizer, 10, warmup="cosine")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="factor"):
        FactorSchedule(optimizer, 0.5)  # type: ignore[arg-type]
    for build in (lambda o: one_cycle(o, 5), lambda o: warmup_cosine(o, 5)):
        with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
            build([new_param()])
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(optimizer, 10, pct_start=float("nan"))
    with pytest.raises(ValueError, match="start_factor"):
        warmup_cosine(optimizer, 10, start_factor=float("nan"))
    with pytest.raises(ValueError, match="factor: expected a finite, non-negative"):
        FactorSchedule(optimizer, lambda step: float("nan"))
    bad = FactorSchedule(optimizer, lambda step: 1.0 - step)
    optimizer.step()
    bad.step()  # factor 0 at step 1 is fine
    optimizer.step()
    with pytest.raises(ValueError, match="at step 2"):
        bad.step()
    with pytest.raises(TypeError, match="scheduler: expected"):
        extend_scheduler(optimizer)  # type: ignore[arg-type]
    two = torch.optim.SGD([new_param(), new_param()], lr=1.0)
    scheduler = sched.LambdaLR(two, lambda step: 1.0)
    two.param_groups.pop()
    with pytest.raises(ValueError, match="groups were removed"):
        extend_scheduler(scheduler)


# --------------------------------------------------------------------------- with GradualUnfreezing

STAGES: list[str | list[str]] = ["neck", ["features.4", "features.5"], "features.[01]"]
STAGE_LRS = [5e-3, 2e-3, 1e-3]
HEAD_LR = 1e-2
EVERY = 3
GU_SCHEDULERS = [
    "LambdaLR",
    "OneCycleLR",
    "CosineAnnealingLR",
    "LinearLR+SequentialLR",
    "hf_linear_warmup",
    "tk.one_cycle",
]


def make_net(seed: int = 0) -> tk.models.SmallCNN:
    torch.manual_seed(seed)
    return tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, Any, tk.GradualUnfreezing]:
    net = make_net()
    tk.freeze(net, exclude="fc")
    optimizer = torch.optim.AdamW(tk.param_groups(net, HEAD_LR, weight_decay=0.01))
    scheduler = SCHEDULERS[name](optimizer)
    schedule = tk.GradualUnfreezing(
        net, STAGES, optimizer, every=EVERY, lr=STAGE_LRS, scheduler=scheduler
    )
    return net, optimizer, scheduler, schedule


def expected_lrs(name: str, steps: int) -> list[list[float]]:
    """Every group present from the start (fc, fc no_decay, then 2 per stage)."""
    bases = [HEAD_LR, HEAD_LR, *[lr for lr in STAGE_LRS for _ in range(2)]]
    optimizer = torch.optim.AdamW([{"params": [new_param()], "lr": lr} for lr in bases])
    scheduler = SCHEDULERS[name](optimizer)
    values = []
    for _ in range(steps):
        values.append([float(g["lr"]) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return values


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    net.train()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    schedule: tk.GradualUnfreezing,
    steps: range,
    expected: list[list[float]] | None = None,
) -> list[list[float]]:
    seen = []
    for step in steps:
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        seen.append(lrs)
        if expected is not None:
            np.testing.assert_allclose(lrs, expected[step][: len(lrs)], rtol=1e-9)
        assert math.isfinite(train_step(net, optimizer, step))
        scheduler.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_gradual_unfreezing_with_scheduler_follows_schedule_and_resumes(
    name: str, tmp_path: Path
) -> None:
    expected = expected_lrs(name, TOTAL)
    net, optimizer, scheduler, schedule = build(name)
    run(net, optimizer, scheduler, schedule, range(0, 7), expected)
    assert len(optimizer.param_groups) == 2 + 2 * 2  # two stages unfrozen so far
    torch.save(
        {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "schedule": schedule.state_dict(),
        },
        tmp_path / "checkpoint.pt",
    )
    continued = run(net, optimizer, scheduler, schedule, range(7, TOTAL - 1), expected)
    assert schedule.done and len(optimizer.param_groups) == 2 + 2 * 3

    resumed_net, resumed_optimizer, resumed_scheduler, resumed_schedule = build(name)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_net.load_state_dict(checkpoint["model"])
    resumed_schedule.load_state_dict(checkpoint["schedule"])  # re-adds the groups first
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    resumed = run(
        resumed_net,
        resumed_optimizer,
        resumed_scheduler,
        resumed_schedule,
        range(7, TOTAL - 1),
        expected,
    )
    assert resumed == continued
    for (key, value), other in zip(
        net.state_dict().items(), resumed_net.state_dict().values(), strict=True
    ):
        assert torch.equal(value, other), key


@pytest.mark.parametrize("name", ["LambdaLR", "OneCycleLR", "hf_linear_warmup"])
def test_scheduler_built_before_unfreezing_no_longer_breaks_its_next_step(name: str) -> None:
    """The issue's reproduction: LambdaLR raised 'zip() argument 2 is shorter', OneCycleLR
    KeyError 'max_lr' at the first scheduler.step() after a stage was added."""
    net = make_net()
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.1, momentum=0.9)
    scheduler = SCHEDULERS[name](optimizer)
    schedule = tk.GradualUnfreezing(net, ["neck"], optimizer, lr=0.05, scheduler=scheduler)
    optimizer.step()
    scheduler.step()
    schedule.step()
    optimizer.step()
    scheduler.step()
    first, *added = (g["lr"] for g in optimizer.param_groups)
    assert len(added) == 2  # neck.1.weight, then its bias (no weight decay)
    assert added == pytest.approx([first * 0.5] * 2, rel=1e-9)  # same factor, own base


def test_gradual_unfreezing_default_lr_is_the_first_group_peak_under_any_scheduler() -> None:
    """lr=None: the new stage gets the first group's base lr (OneCycleLR: max_lr; CyclicLR:
    its upper bound), so it runs on the same curve as the head."""
    for name in ("OneCycleLR", "CyclicLR", "CosineAnnealingLR", "tk.one_cycle"):
        net = make_net()
        optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.1, momentum=0.9)
        scheduler = SCHEDULERS[name](optimizer)
        schedule = tk.GradualUnfreezing(net, ["neck"], optimizer, scheduler=scheduler)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        schedule.step()
        for _ in range(2):
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs == pytest.approx([lrs[0]] * 3, rel=1e-12), name
            optimizer.step()
            scheduler.step()


def test_gradual_unfreezing_warns_when_a_scheduler_it_does_not_know_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = make_net()
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.1)
    schedule = tk.GradualUnfreezing(net, ["neck"], optimizer, lr=0.05)
    sched.LambdaLR(optimizer, lambda step: 1.0)
    with caplog.at_level("WARNING", logger="transferkit.freezing"):
        schedule.step()
    assert "pass scheduler=" in caplog.text
    schedule.scheduler = sched.LambdaLR(torch.optim.SGD([new_param()], lr=1.0), lambda s: 1.0)
    with pytest.raises(ValueError, match="scheduler: it must be built on the optimizer"):
        tk.GradualUnfreezing(make_net(), ["neck"], optimizer, scheduler=schedule.scheduler)
    with pytest.raises(TypeError, match="scheduler: expected"):
        tk.GradualUnfreezing(make_net(), ["neck"], optimizer, scheduler="cos")  # type: ignore[arg-type]


@pytest.mark.parametrize("extend", [False, True])
def test_factor_schedule_with_an_added_group_resumes_like_an_uninterrupted_run(
    extend: bool, tmp_path: Path
) -> None:
    # fails before the fix (extend=False): the saved state holds two factor entries and
    # LambdaLR.load_state_dict indexed the fresh schedule's single one (IndexError)
    first, second = new_param(), new_param()

    def build() -> tuple[torch.optim.Optimizer, FactorSchedule]:
        optimizer = torch.optim.SGD([first], lr=1.0)
        return optimizer, warmup_cosine(optimizer, 12, warmup_steps=3)

    def add(optimizer: torch.optim.Optimizer, scheduler: FactorSchedule) -> None:
        optimizer.add_param_group({"params": [second], "lr": 0.5})
        if extend:
            extend_scheduler(scheduler)

    def run(optimizer: torch.optim.Optimizer, scheduler: FactorSchedule) -> list[list[float]]:
        seen = []
        for _ in range(4):
            optimizer.step()
            scheduler.step()
            seen.append([float(g["lr"]) for g in optimizer.param_groups])
        return seen

    optimizer, scheduler = build()
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    add(optimizer, scheduler)
    optimizer.step()
    scheduler.step()
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        tmp_path / "checkpoint.pt",
    )
    continued = run(optimizer, scheduler)

    resumed_optimizer, resumed_scheduler = build()
    add(resumed_optimizer, resumed_scheduler)  # the group is re-added first
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    assert run(resumed_optimizer, resumed_scheduler) == continued
    factors = [scheduler.lr_lambdas[0](step) for step in range(4, 8)]
    np.testing.assert_allclose(continued, [[f, 0.5 * f] for f in factors], rtol=1e-12)
