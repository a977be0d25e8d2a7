"""Unsupervised domain adaptation on shifted digits: source-only vs MMD, CORAL, DANN, CDAN+E.

Every method trains the same network (``tk.models.SmallCNN``) from the same seed with the
same optimizer, batches and number of steps; only the adaptation term differs:

* ``source-only``: cross-entropy on labelled source batches;
* ``mmd`` (DAN-style): + multi-kernel Gaussian MMD between source and target bottleneck
  features (``tk.losses.mmd`` with ``tk.kernels.GaussianKernel()``);
* ``coral`` (Deep CORAL): + ``tk.losses.coral`` on the bottleneck features;
* ``dann``: + ``tk.DomainAdversarialLoss`` through a gradient reversal layer;
* ``cdan+e``: + ``tk.ConditionalDomainAdversarialLoss(entropy_conditioning=True)``.

The recipe follows Ganin et al. (2016): SGD with momentum 0.9, learning rate annealed as
``lr / (1 + 10 p) ** 0.75``, the adaptation weight ramped from 0 by
``tk.WarmStartSchedule`` and balanced batches (as many target as source samples per
step). The target labels are used only to report the target-test accuracy.

    python examples/domain_adaptation_digits.py                 # the three default shifts
    python examples/domain_adaptation_digits.py --shifts rotate --seeds 1
    python examples/domain_adaptation_digits.py --smoke         # ~30 s; asserts the result

``benchmarks/bench_adaptation.py`` imports :func:`run` from this file to produce the
results table of ``docs/guides/adaptation-results.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import transferkit as tk
from transferkit import kernels, losses

METHODS = ("source-only", "mmd", "coral", "dann", "cdan+e")

#: The digit shifts of the table, by name.
SHIFTS: dict[str, Callable[[], tk.datasets.Shift | list[tk.datasets.Shift]]] = {
    "rotate(35)": lambda: tk.datasets.rotate(35),
    "translate(1)": lambda: tk.datasets.translate(1.0),
    "noise(0.5)": lambda: tk.datasets.noise(0.5),
    "blur(1.5)+noise(0.3)": lambda: [tk.datasets.blur(1.5), tk.datasets.noise(0.3)],
    "invert": lambda: tk.datasets.invert(),
}
DEFAULT_SHIFTS = ("rotate(35)", "noise(0.5)", "blur(1.5)+noise(0.3)")


@dataclass(frozen=True)
class Recipe:
    """Training budget and hyper-parameters shared by every method."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 0.01
    weight_decay: float = 5e-4
    width: int = 16
    trade_off: dict[str, float] | None = None

    def weight(self, method: str) -> float:
        """Final weight of the adaptation term of ``method``."""
        defaults = {"mmd": 1.0, "coral": 10.0, "dann": 0.3, "cdan+e": 0.3}
        chosen = {**defaults, **(self.trade_off or {})}
        return chosen.get(method, 0.0)


def make_adaptation(
    method: str, feature_dim: int, num_classes: int, recipe: Recipe
) -> tuple[nn.Module | None, tk.WarmStartSchedule]:
    """The adaptation module of ``method`` (None if it has no parameters) and its ramp."""
    hi = recipe.weight(method)
    schedule = tk.WarmStartSchedule(recipe.steps, alpha=10.0, hi=max(hi, 0.0) or 1.0)
    if method == "dann":
        discriminator = tk.DomainDiscriminator(feature_dim, hidden=256)
        return tk.DomainAdversarialLoss(discriminator, grl=tk.GradientReversal(schedule)), schedule
    if method == "cdan+e":
        discriminator = tk.DomainDiscriminator(feature_dim * num_classes, hidden=256)
        criterion = tk.ConditionalDomainAdversarialLoss(
            discriminator,
            num_classes,
            feature_dim,
            entropy_conditioning=True,
            grl=tk.GradientReversal(schedule),
        )
        return criterion, schedule
    return None, schedule


def adaptation_loss(
    method: str,
    module: nn.Module | None,
    schedule: tk.WarmStartSchedule,
    features: tuple[Tensor, Tensor],
    logits: tuple[Tensor, Tensor],
) -> Tensor:
    """The adaptation term of one step (the adversarial losses ramp inside their GRL)."""
    f_s, f_t = features
    if method == "mmd":
        return schedule.value * losses.mmd(f_s, f_t, kernels.GaussianKernel())
    if method == "coral":
        return schedule.value * losses.coral(f_s, f_t)
    if method == "dann" and module is not None:
        out: Tensor = module(f_s, f_t)
        return out
    if method == "cdan+e" and module is not None:
        out = module(logits[0], f_s, logits[1], f_t)
        return out
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(512)])
    return float((predictions == y).float().mean())


def train_and_evaluate(
    task: tk.datasets.DomainTask,
    method: str,
    *,
    seed: int,
    recipe: Recipe,
    device: torch.device,
) -> float:
    """Train one network with ``method`` and return its target-test accuracy."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    tk.seed_everything(seed)
    model = tk.models.SmallCNN(num_classes=task.num_classes, width=recipe.width).to(device)
    module, schedule = make_adaptation(method, model.feature_dim, task.num_classes, recipe)
    params = list(model.parameters())
    if module is not None:
        module.to(device)
        params += list(module.parameters())
    optimizer = torch.optim.SGD(
        params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay, nesterov=True
    )
    steps = recipe.steps
    annealing = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + 10.0 * step / steps) ** -0.75
    )
    batch = recipe.batch_size
    source = tk.datasets.infinite(
        tk.datasets.make_loader(
            task.source_x, task.source_y, batch_size=batch, drop_last=True, seed=seed
        )
    )
    target = tk.datasets.infinite(
        tk.datasets.make_loader(task.target_x, batch_size=batch, drop_last=True, seed=seed + 1)
    )
    model.train()
    if module is not None:
        module.train()
    for _ in range(steps):
        x_s, y_s = (t.to(device) for t in next(source))
        if method == "source-only":
            loss = nn.functional.cross_entropy(model(x_s), y_s)
        else:
            (x_t,) = (t.to(device) for t in next(target))
            features = model.forward_features(torch.cat([x_s, x_t]))
            logits = model.fc(features)
            f_s, f_t = features[:batch], features[batch:]
            g_s, g_t = logits[:batch], logits[batch:]
            loss = nn.functional.cross_entropy(g_s, y_s)
            loss = loss + adaptation_loss(method, module, schedule, (f_s, f_t), (g_s, g_t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        annealing.step()
        schedule.step()
    return accuracy(model, task.target_test_x, task.target_test_y, device)


def _job(
    shift: str, seed: int, method: str, recipe: Recipe, device: str, size: int
) -> tuple[float, float, float]:
    """One (shift, seed, method) run: target-test accuracy, wall and CPU seconds."""
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    task = tk.datasets.digits(SHIFTS[shift](), size=size, seed=seed)
    acc = train_and_evaluate(
        task, method, seed=seed, recipe=recipe, device=tk.resolve_device(device)
    )
    return acc, time.perf_counter() - start, time.process_time() - cpu_start


def run(
    shifts: Sequence[str],
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    recipe: Recipe | None = None,
    device: str = "auto",
    size: int = 16,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]], dict[str, list[float]]]:
    """Run every (shift, seed, method); return accuracies, wall and CPU seconds per run.

    ``accuracies[shift][method]`` lists the target-test accuracy per seed;
    ``seconds[method]`` and ``cpu_seconds[method]`` the wall and CPU time of each run.
    ``jobs > 1`` runs that many worker processes (one thread each).
    """
    recipe = recipe or Recipe()
    for shift in shifts:
        if shift not in SHIFTS:
            raise ValueError(f"shift: expected one of {tuple(SHIFTS)}, got {shift!r}")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    keys = [(shift, seed, method) for shift in shifts for seed in seeds for method in methods]
    args = [(shift, seed, method, recipe, device, size) for shift, seed, method in keys]
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_job, *a) for a in args]
            outcomes = []
            for key, future in zip(keys, futures, strict=True):
                outcomes.append(future.result())
                log(_line(key, *outcomes[-1]))
    else:
        outcomes = []
        for key, a in zip(keys, args, strict=True):
            outcomes.append(_job(*a))
            log(_line(key, *outcomes[-1]))
    accuracies: dict[str, dict[str, list[float]]] = {
        shift: {method: [] for method in methods} for shift in shifts
    }
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    cpu_seconds: dict[str, list[float]] = {method: [] for method in methods}
    for (shift, _, method), (acc, took, cpu) in zip(keys, outcomes, strict=True):
        accuracies[shift][method].append(acc)
        seconds[method].append(took)
        cpu_seconds[method].append(cpu)
    return accuracies, seconds, cpu_seconds


def _line(key: tuple[str, int, str], acc: float, took: float, cpu: float) -> str:
    shift, seed, method = key
    return f"  {shift:<22} seed {seed}  {method:<12} {acc:.3f}  ({took:.1f} s, CPU {cpu:.1f} s)"


def summary(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """A Markdown table: one row per method, one column per shift, plus the average."""
    shifts = list(results)
    methods = list(next(iter(results.values())))
    lines = [
        "| method | " + " | ".join(shifts) + " | average |",
        "|---|" + "---|" * (len(shifts) + 1),
    ]
    for method in methods:
        cells = [summary(results[shift][method]) for shift in shifts]
        average = statistics.mean(statistics.mean(results[s][method]) for s in shifts)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average:.3f} |")
    return "\n".join(lines)


def average(results: dict[str, dict[str, list[float]]], method: str) -> float:
    return statistics.mean(statistics.mean(per[method]) for per in results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="+", default=list(DEFAULT_SHIFTS), choices=SHIFTS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--smoke", action="store_true", help="quick run that asserts the result")
    args = parser.parse_args()
    # Small CNNs on 16x16 images: one thread per process is fastest, and on a shared
    # machine extra threads spin and slow everything down.
    torch.set_num_threads(1)
    if args.smoke:
        args.shifts, args.seeds = ["rotate(35)"], 1
        args.methods = ["source-only", "dann"]
    start = time.perf_counter()
    results, _, _ = run(
        args.shifts,
        args.methods,
        range(args.seeds),
        recipe=Recipe(steps=args.steps),
        device=args.device,
        jobs=args.jobs,
    )
    print(
        f"\ntarget-test accuracy, mean ± std over {args.seeds} seed(s), "
        f"{args.steps} steps, SmallCNN"
    )
    print(table(results))
    print(f"done in {time.perf_counter() - start:.1f} s")
    if args.smoke:
        gain = average(results, "dann") - average(results, "source-only")
        assert gain > 0.0, f"DANN should beat source-only on the target, gain was {gain:.3f}"


if __name__ == "__main__":
    main()
