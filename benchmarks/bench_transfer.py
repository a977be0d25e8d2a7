"""Real cross-dataset transfer, offline: MNIST -> MNIST-M-lite and MNIST -> digits.

One LeNet-style network (``tk.models.SmallCNN``) and one training budget per task; the
methods differ only in the transfer term added to the source cross-entropy:

* ``source_only`` -- no transfer term (the lower baseline);
* ``dan``   -- multi-kernel MMD on the bottleneck features (Long et al., 2015);
* ``jan``   -- joint MMD of bottleneck features and softmax outputs (Long et al., 2017);
* ``coral`` -- Deep CORAL (Sun & Saenko, 2016);
* ``dann``  -- domain-adversarial training (Ganin & Lempitsky, 2015);
* ``cdan`` / ``cdan_e`` -- conditional adversarial, without/with entropy weighting
  (Long et al., 2018);
* ``oracle`` -- trained on the *labelled* target training split (the ceiling).

The recipe is the one of Ganin & Lempitsky (2015): SGD with momentum 0.9, learning rate
``mu0 / (1 + 10 p)^0.75`` with ``p`` the training progress, trade-off ramped by
``2 / (1 + exp(-10 p)) - 1``, a bottleneck (the network's ``neck``) and balanced
source/target batches. Run ``python benchmarks/bench_transfer.py`` (``make bench``); it
writes ``benchmarks/results/bench_transfer.{json,md}`` and ``docs/benchmarks.md``.
``--smoke`` runs a small version that asserts the direction of the headline results.
Finished units are appended to ``.cache/bench_transfer/rows.jsonl``: ``--resume`` skips
them, ``--render-only`` writes the tables from whatever has finished. ``--jobs`` sets the
worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import transferkit as tk
from transferkit.datasets import DomainTask, infinite, make_loader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import environment, write_atomic, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("source_only", "dan", "jan", "coral", "dann", "cdan", "cdan_e", "oracle")
ADAPTATION = ("dan", "jan", "coral", "dann", "cdan", "cdan_e")
PAPER = {  # Ganin & Lempitsky (2015), Table 2, MNIST -> MNIST-M
    "source_only": 52.25,
    "dann": 76.66,
    "oracle": 96.24,
}


@dataclass(frozen=True)
class Budget:
    """Everything that is shared by all methods on one task."""

    steps: int
    batch_size: int = 64  # per domain: each step sees batch_size source + batch_size target
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    feature_dim: int = 128
    tradeoff: dict[str, float] = field(default_factory=dict)
    disc_hidden: int = 256
    # "domain": each domain's batch is normalised with its own BatchNorm statistics and
    # the target is evaluated with target statistics (AdaBN); "joint": one concatenated
    # batch, shared statistics
    bn: str = "domain"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[int], DomainTask]
    budget: Budget
    smoke_budget: Budget


def mnist_m_task(scale: float) -> Callable[[int], DomainTask]:
    def build(seed: int) -> DomainTask:
        n = int(3000 * scale)
        return tk.datasets.mnist_to_mnist_m_lite(
            source_size=n, target_size=n, test_size=max(500, n // 3), seed=seed
        )

    return build


def digits_task(scale: float) -> Callable[[int], DomainTask]:
    def build(seed: int) -> DomainTask:
        return tk.datasets.mnist_to_digits(source_size=int(3000 * scale), seed=seed)

    return build


DEFAULT_TRADEOFF = {"dan": 1.0, "jan": 1.0, "coral": 1.0, "dann": 1.0, "cdan": 1.0, "cdan_e": 1.0}


def task_specs(smoke: bool = False) -> dict[str, TaskSpec]:
    scale = 0.5 if smoke else 1.0
    return {
        "mnist->mnist_m_lite": TaskSpec(
            "mnist->mnist_m_lite",
            mnist_m_task(scale),
            Budget(steps=400, tradeoff=dict(DEFAULT_TRADEOFF)),
            Budget(steps=300, tradeoff=dict(DEFAULT_TRADEOFF)),
        ),
        "mnist->digits": TaskSpec(
            "mnist->digits",
            digits_task(scale),
            Budget(steps=200, tradeoff=dict(DEFAULT_TRADEOFF)),
            Budget(steps=200, tradeoff=dict(DEFAULT_TRADEOFF)),
        ),
    }


# --------------------------------------------------------------------------- methods


def ramp(progress: float) -> float:
    """The DANN trade-off ramp ``2 / (1 + exp(-10 p)) - 1``."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def make_transfer_loss(
    method: str, budget: Budget, num_classes: int, seed: int
) -> tuple[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None, list[nn.Module]]:
    """The transfer term ``loss(f_s, g_s, f_t, g_t)`` and the modules it trains."""
    feature_dim = budget.feature_dim
    if method in ("source_only", "oracle"):
        return None, []
    if method in ("dan", "jan", "coral"):
        from transferkit import kernels, losses

        if method == "dan":
            kernel = kernels.GaussianKernel()

            def dan(f_s: Tensor, g_s: Tensor, f_t: Tensor, g_t: Tensor) -> Tensor:
                return losses.mmd(f_s, f_t, kernel)

            return dan, []
        if method == "jan":
            jmmd = losses.JointMMDLoss(
                [kernels.GaussianKernel(), kernels.GaussianKernel(0.92, multipliers=(1.0,))]
            )

            def jan(f_s: Tensor, g_s: Tensor, f_t: Tensor, g_t: Tensor) -> Tensor:
                return jmmd([f_s, g_s.softmax(1)], [f_t, g_t.softmax(1)])

            return jan, []

        def coral(f_s: Tensor, g_s: Tensor, f_t: Tensor, g_t: Tensor) -> Tensor:
            return losses.coral(f_s, f_t)

        return coral, []
    from transferkit.adversarial import (
        ConditionalDomainAdversarialLoss,
        DomainAdversarialLoss,
        DomainDiscriminator,
        GradientReversal,
        WarmStartSchedule,
    )

    # adversarial methods ramp the reversal coefficient (the discriminator itself always
    # learns at full rate), as in the DANN paper; the loop steps the schedule
    schedule = WarmStartSchedule(budget.steps, alpha=10.0)
    if method == "dann":
        disc = DomainDiscriminator(feature_dim, hidden=budget.disc_hidden)
        dann = DomainAdversarialLoss(disc, grl=GradientReversal(schedule))

        def dann_loss(f_s: Tensor, g_s: Tensor, f_t: Tensor, g_t: Tensor) -> Tensor:
            return dann(f_s, f_t)

        return dann_loss, [dann]
    entropy = method == "cdan_e"
    in_features = feature_dim * num_classes
    randomized = in_features > 4096
    disc = DomainDiscriminator(1024 if randomized else in_features, hidden=budget.disc_hidden)
    cdan = ConditionalDomainAdversarialLoss(
        disc,
        num_classes,
        feature_dim,
        entropy_conditioning=entropy,
        randomized=randomized,
        grl=GradientReversal(schedule),
        seed=seed,
    )

    def cdan_loss(f_s: Tensor, g_s: Tensor, f_t: Tensor, g_t: Tensor) -> Tensor:
        return cdan(g_s, f_s, g_t, f_t)

    return cdan_loss, [cdan]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 512):
        logits = model(x[start : start + 512].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + 512]).sum())
    return correct / len(x)


def train(
    method: str,
    task: DomainTask,
    budget: Budget,
    *,
    seed: int,
    device: torch.device,
    tradeoff: float | None = None,
) -> dict[str, float]:
    """Train one method on one task; return target-test and source-test accuracy."""
    tk.seed_everything(seed)
    in_channels = task.input_shape[0]
    model = tk.models.SmallCNN(
        in_channels, task.num_classes, width=budget.width, feature_dim=budget.feature_dim
    ).to(device)
    transfer, extra = make_transfer_loss(method, budget, task.num_classes, seed)
    for module in extra:
        module.to(device)
    weight = budget.tradeoff.get(method, 1.0) if tradeoff is None else tradeoff
    params = list(model.parameters()) + [p for m in extra for p in m.parameters()]
    optimizer = torch.optim.SGD(
        params, lr=budget.lr, momentum=budget.momentum, weight_decay=budget.weight_decay
    )
    if method == "oracle":
        source = infinite(
            make_loader(task.target_x, task.target_y, batch_size=budget.batch_size, seed=seed)
        )
    else:
        source = infinite(
            make_loader(task.source_x, task.source_y, batch_size=budget.batch_size, seed=seed)
        )
    target = infinite(
        make_loader(task.target_x, batch_size=budget.batch_size, drop_last=True, seed=seed + 1)
    )
    for step in range(budget.steps):
        progress = step / budget.steps
        for group in optimizer.param_groups:
            group["lr"] = budget.lr / (1.0 + 10.0 * progress) ** 0.75
        model.train()
        for module in extra:
            module.train()
        x_s, y_s = (t.to(device) for t in next(source))
        if transfer is None:
            loss = F.cross_entropy(model(x_s), y_s)
        else:
            (x_t,) = next(target)
            # one forward pass over both domains: the batch statistics are shared, as in
            # the reference implementations of DANN/CDAN
            x_t = x_t.to(device)
            if budget.bn == "joint":
                features = model.forward_features(torch.cat([x_s, x_t]))
            else:
                features = torch.cat([model.forward_features(x_s), model.forward_features(x_t)])
            logits = model.fc(features)
            n = x_s.shape[0]
            term = transfer(features[:n], logits[:n], features[n:], logits[n:])
            # discrepancy losses ramp their weight; adversarial ones ramp the reversal
            coeff = weight if extra else weight * ramp(progress)
            loss = F.cross_entropy(logits[:n], y_s) + coeff * term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for module in extra:
            module.grl.schedule.step()
    result = {"source": accuracy(model, task.source_test_x, task.source_test_y, device)}
    if method == "source_only":
        result["target"] = accuracy(model, task.target_test_x, task.target_test_y, device)
        # the same network with target BatchNorm statistics: the AdaBN baseline, which
        # tells how much of a method's gain comes from per-domain statistics alone
        adapt_batchnorm(model, task.target_x, device)
        result["target_adabn"] = accuracy(model, task.target_test_x, task.target_test_y, device)
        return result
    if budget.bn == "domain" and method != "oracle":
        adapt_batchnorm(model, task.target_x, device)
    result["target"] = accuracy(model, task.target_test_x, task.target_test_y, device)
    return result


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, x: Tensor, device: torch.device) -> None:
    """AdaBN: replace BatchNorm running statistics by those of ``x`` (unlabelled)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for start in range(0, len(x), 256):
        model(x[start : start + 256].to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


# --------------------------------------------------------------------------- runner

_TASK_CACHE: dict[tuple[str, int, bool], DomainTask] = {}


def _task(name: str, seed: int, smoke: bool) -> DomainTask:
    key = (name, seed, smoke)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = task_specs(smoke)[name].build(seed)
    return _TASK_CACHE[key]


@dataclass(frozen=True)
class Unit:
    task: str
    method: str
    seed: int
    smoke: bool
    device: str
    steps: int | None = None
    tradeoff: float | None = None
    threads: int = 1


def run_unit(unit: Unit) -> dict[str, Any]:
    torch.set_num_threads(unit.threads)
    spec = task_specs(unit.smoke)[unit.task]
    budget = spec.smoke_budget if unit.smoke else spec.budget
    if unit.steps:
        budget = replace(budget, steps=unit.steps)
    task = _task(unit.task, unit.seed, unit.smoke)
    start = time.perf_counter()
    acc = train(
        unit.method,
        task,
        budget,
        seed=unit.seed,
        device=torch.device(unit.device),
        tradeoff=unit.tradeoff,
    )
    wall = time.perf_counter() - start
    weight = budget.tradeoff.get(unit.method, 1.0) if unit.tradeoff is None else unit.tradeoff
    row = {**asdict(unit), "tradeoff": weight, "steps": budget.steps, "wall_s": wall, **acc}
    print(
        f"{unit.task:20s} {unit.method:12s} seed={unit.seed} lambda={weight:g} "
        f"target={acc['target']:.3f} source={acc['source']:.3f} ({wall:.1f}s)",
        flush=True,
    )
    return row


CACHE = ROOT / ".cache" / "bench_transfer"


def effective(unit: Unit) -> tuple[int, float]:
    """The step budget and trade-off a unit really runs with."""
    spec = task_specs(unit.smoke)[unit.task]
    budget = spec.smoke_budget if unit.smoke else spec.budget
    steps = unit.steps or budget.steps
    weight = budget.tradeoff.get(unit.method, 1.0) if unit.tradeoff is None else unit.tradeoff
    return steps, weight


def unit_key(task: str, method: str, seed: int, smoke: bool, steps: int, tradeoff: float) -> str:
    return json.dumps([task, method, seed, smoke, steps, round(float(tradeoff), 6)])


def load_rows() -> dict[str, dict[str, Any]]:
    """Rows of earlier runs (``--resume``): one JSON object per finished unit."""
    path = CACHE / "rows.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                key = unit_key(
                    row["task"],
                    row["method"],
                    row["seed"],
                    row["smoke"],
                    row["steps"],
                    row["tradeoff"],
                )
                rows[key] = row
    return rows


def run_units(
    units: list[Unit], pool: Any | None, *, resume: bool, run: bool = True
) -> list[dict[str, Any]]:
    """Run the units (in parallel with a pool), appending each row to the cache."""
    cached = load_rows() if resume else {}
    done: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, Unit]] = []
    for i, unit in enumerate(units):
        key = unit_key(unit.task, unit.method, unit.seed, unit.smoke, *effective(unit))
        if key in cached:
            done[i] = cached[key]
        else:
            todo.append((i, unit))
    if run and todo:
        CACHE.mkdir(parents=True, exist_ok=True)
        results = (
            map(run_unit, [u for _, u in todo])
            if pool is None
            else pool.imap(run_unit, [u for _, u in todo], chunksize=1)
        )
        with open(CACHE / "rows.jsonl", "a") as handle:
            for (i, _), row in zip(todo, results, strict=True):
                done[i] = row
                handle.write(json.dumps(row) + "\n")
                handle.flush()
    return [done[i] for i in sorted(done)]


def _pretrained_job(smoke: bool, seeds: list[int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = pretrained_table(smoke, seeds)
    result["wall_s"] = time.perf_counter() - start
    return result


def _text_job(seeds: list[int]) -> dict[str, Any] | None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = text_table(seeds, max_per_domain=TEXT_MAX_PER_DOMAIN)
    except tk.datasets.MissingDataError as error:
        print(f"text rows skipped: {error}", flush=True)
        return None
    result["wall_s"] = time.perf_counter() - start
    return result


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cell = table.setdefault(row["task"], {}).setdefault(
            row["method"], {"target": [], "source": [], "wall_s": 0.0, "tradeoff": row["tradeoff"]}
        )
        cell["target"].append(row["target"])
        cell["source"].append(row["source"])
        cell["wall_s"] += row["wall_s"]
        if "target_adabn" in row:
            ada = table[row["task"]].setdefault(
                "source_only+adabn", {"target": [], "source": [], "wall_s": 0.0, "tradeoff": 0.0}
            )
            ada["target"].append(row["target_adabn"])
            ada["source"].append(row["source"])
    for methods in table.values():
        for cell in methods.values():
            values = cell["target"]
            cell["mean"] = statistics.fmean(values)
            cell["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            cell["source_mean"] = statistics.fmean(cell["source"])
    return table


LABELS = {
    "source_only": "source only",
    "source_only+adabn": "source only + AdaBN",
    "dan": "DAN (MK-MMD)",
    "jan": "JAN (JMMD)",
    "coral": "Deep CORAL",
    "dann": "DANN",
    "cdan": "CDAN",
    "cdan_e": "CDAN+E",
    "oracle": "target-supervised (oracle)",
}


def adaptation_markdown(table: dict[str, dict[str, dict[str, Any]]], seeds: int) -> str:
    tasks = list(table)
    lines = [
        "| method | " + " | ".join(f"{t} target acc (%)" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    order = [m for m in LABELS if any(m in table[t] for t in tasks)]
    for method in order:
        cells = []
        for t in tasks:
            cell = table[t].get(method)
            if cell is None:
                cells.append("n/a")
                continue
            base = table[t].get("source_only")
            delta = ""
            if base is not None and method not in ("source_only", "oracle"):
                delta = f" ({100 * (cell['mean'] - base['mean']):+.1f})"
            runs = len(cell["target"])
            partial = f" [{runs} of {seeds} seeds]" if runs < seeds else ""
            cells.append(f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}{delta}{partial}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± standard deviation over {seeds} seed(s); in brackets the change vs. source only."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- pretrained

SHOTS = (10, 20, 50, 100)  # labelled target digits in total (k / 10 per class)


def pretrain(images: Tensor, labels: Tensor, *, steps: int, seed: int) -> nn.Module:
    """A SmallCNN trained on (a subset of) MNIST or Fashion-MNIST."""
    tk.seed_everything(seed)
    model = tk.models.SmallCNN(1, 10, width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stream = infinite(make_loader(images, labels, batch_size=128, seed=seed))
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 / (1.0 + 10.0 * step / steps) ** 0.75
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, seed: int) -> nn.Module:
    """Fine-tune every layer with a new head on the few labelled target samples."""
    import copy

    tk.seed_everything(seed)
    net = copy.deepcopy(model)
    net.fc = nn.Linear(net.fc.in_features, 10)  # type: ignore[union-attr,arg-type]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def pretrained_table(smoke: bool, seeds: Sequence[int]) -> dict[str, Any]:
    """Frozen features + kernel SVM / linear probe, and fine-tuning, on k labelled digits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from transferkit.sklearn import TorchKernelSVC

    task = tk.datasets.mnist_to_digits(source_size=10, source_test_size=10, seed=0)
    # the same pretraining in smoke mode: shorter pretraining makes worse features than
    # random ones (measured: 2,000 images x 100 steps gave 63% vs 70% for random-init)
    n_pre, steps = 10_000, 400
    mnist = tk.datasets.mnist()
    scale = tk.datasets.ImageSplits.float_images
    backbones: dict[str, nn.Module | None] = {
        "MNIST-pretrained CNN": pretrain(
            scale(mnist.train_images[:n_pre]), mnist.train_labels[:n_pre], steps=steps, seed=0
        ),
        "random-init CNN": tk.models.SmallCNN(1, 10, width=16).eval(),
        "raw pixels": None,
    }
    if not smoke:  # the negative-transfer control
        fashion = tk.datasets.fashion_mnist()
        backbones["Fashion-MNIST-pretrained CNN"] = pretrain(
            scale(fashion.train_images[:n_pre]), fashion.train_labels[:n_pre], steps=steps, seed=0
        )
    shots = (20,) if smoke else SHOTS
    results: dict[str, Any] = {"shots": list(shots), "rows": {}}
    for name, model in backbones.items():

        def features(x: Tensor, model: nn.Module | None = model) -> np.ndarray:
            if model is None:
                return x.reshape(len(x), -1).numpy()
            with torch.no_grad():
                return model.forward_features(x).numpy()  # type: ignore[operator,no-any-return]

        test_features = features(task.target_test_x)
        row: dict[str, dict[int, list[float]]] = {"svm": {}, "linear": {}, "finetune": {}}
        for k in shots:
            for seed in seeds:
                x, y = task.few_shot(k // 10, seed=seed)
                train_features = features(x)
                scaler = StandardScaler().fit(train_features)
                a, b = scaler.transform(train_features), scaler.transform(test_features)
                y_np, y_test = y.numpy(), task.target_test_y.numpy()
                svm = TorchKernelSVC(kernel="rbf", C=10.0, device="cpu").fit(a, y_np)
                row["svm"].setdefault(k, []).append(float(svm.score(b, y_test)))
                probe = LogisticRegression(C=1.0, max_iter=500).fit(a, y_np)
                row["linear"].setdefault(k, []).append(float(probe.score(b, y_test)))
                if model is not None and not smoke:
                    net = fine_tune(model, x, y, steps=100, seed=seed)
                    acc = accuracy(net, task.target_test_x, task.target_test_y, torch.device("cpu"))
                    row["finetune"].setdefault(k, []).append(acc)
        if not row["finetune"]:
            del row["finetune"]
        results["rows"][name] = row
        try:
            from transferkit import selection

            x, y = task.few_shot(10, seed=0)
            results["rows"][name]["logme"] = float(selection.logme(features(x), y.numpy()))
        except (ImportError, AttributeError):
            pass
    return results


def pretrained_markdown(results: dict[str, Any]) -> str:
    shots = results["shots"]
    header = "| features | classifier | " + " | ".join(f"k={k}" for k in shots) + " |"
    lines = [header, "|---|---|" + "---|" * len(shots)]
    names = {"svm": "TorchKernelSVC (RBF)", "linear": "linear probe", "finetune": "fine-tune"}
    for backbone, row in results["rows"].items():
        for key, label in names.items():
            if key not in row:
                continue
            # keys are ints when fresh, strings after a JSON round trip
            values = {int(k): v for k, v in row[key].items()}
            cells = [
                f"{100 * statistics.fmean(values[k]):.1f}" if k in values else "n/a" for k in shots
            ]
            lines.append(f"| {backbone} | {label} | " + " | ".join(cells) + " |")
    if any("logme" in row for row in results["rows"].values()):
        lines += [
            "",
            "| features | LogME on 100 labelled digits (higher: more transferable) |",
            "|---|---|",
        ]
        for backbone, row in results["rows"].items():
            if "logme" in row:
                lines.append(f"| {backbone} | {row['logme']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- text

TEXT_PAIRS = (("airline", "deflategate"), ("airline", "apple"))
TEXT_MAX_PER_DOMAIN = 500


def mmd_head(task: DomainTask, *, seed: int, adapt: bool, steps: int = 300) -> float:
    """A one-hidden-layer head on frozen MiniLM embeddings, optionally MMD-adapted."""
    tk.seed_everything(seed)
    head = tk.models.MLP(task.source_x.shape[1], 2, hidden=(128,))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    source = infinite(make_loader(task.source_x, task.source_y, batch_size=64, seed=seed))
    target = infinite(make_loader(task.target_x, batch_size=64, drop_last=True, seed=seed + 1))
    if adapt:
        from transferkit import kernels, losses

        kernel = kernels.GaussianKernel()
    for step in range(steps):
        x_s, y_s = next(source)
        f_s = head.forward_features(x_s)
        loss = F.cross_entropy(head.fc(f_s), y_s)
        if adapt:
            (x_t,) = next(target)
            loss = loss + ramp(step / steps) * losses.mmd(f_s, head.forward_features(x_t), kernel)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        predicted = head(task.target_test_x).argmax(1)
    return float((predicted == task.target_test_y).float().mean())


def text_table(seeds: Sequence[int], max_per_domain: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from transferkit.sklearn import TorchKernelSVC

    cache = ROOT / ".cache" / "data" / "embeddings"
    results: dict[str, Any] = {}
    for source, target in TEXT_PAIRS:
        rows: dict[str, list[float]] = {}
        # one draw of the tweets (encoding is the slow part); the seeds vary the training
        task = tk.datasets.tweet_topics(
            source, target, max_per_domain=max_per_domain, seed=0, cache=cache, device="cpu"
        )
        for seed in seeds:
            xs, ys = task.source_x.numpy(), task.source_y.numpy()
            xt, yt = task.target_test_x.numpy(), task.target_test_y.numpy()
            rows.setdefault("logistic regression", []).append(
                float(LogisticRegression(max_iter=1000).fit(xs, ys).score(xt, yt))
            )
            rows.setdefault("TorchKernelSVC (RBF)", []).append(
                float(TorchKernelSVC(kernel="rbf", C=1.0, device="cpu").fit(xs, ys).score(xt, yt))
            )
            rows.setdefault("MLP head, source only", []).append(
                mmd_head(task, seed=seed, adapt=False)
            )
            rows.setdefault("MLP head + MK-MMD", []).append(mmd_head(task, seed=seed, adapt=True))
            in_domain = LogisticRegression(max_iter=1000).fit(
                task.target_x.numpy(), task.target_y.numpy()
            )
            rows.setdefault("target-supervised logistic regression (oracle)", []).append(
                float(in_domain.score(xt, yt))
            )
            rows.setdefault("majority class of the target (reference)", []).append(
                float(np.bincount(yt).max() / len(yt))
            )
        results[f"{source}->{target}"] = rows
    return results


def text_markdown(results: dict[str, Any]) -> str:
    pairs = list(results)
    lines = [
        "| classifier on MiniLM embeddings | " + " | ".join(pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for name in results[pairs[0]]:
        cells = [f"{100 * statistics.fmean(results[p][name]):.1f}" for p in pairs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

SWEEP = (0.1, 0.3, 3.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small, fast run that asserts")
    parser.add_argument("--quick", action="store_true", help="alias of --smoke")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(task_specs()))
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="override the step budget")
    parser.add_argument("--tradeoff", type=float, default=None, help="override the trade-off")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--no-sweep", action="store_true", help="skip the trade-off sweep")
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--no-text", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished units from .cache/bench_transfer"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: tables from the finished units in the cache (implies --resume)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke or args.quick
    resume = args.resume or args.render_only
    run = not args.render_only
    device = tk.resolve_device(args.device)
    jobs = args.jobs or (1 if device.type != "cpu" else max(1, min(4, os.cpu_count() or 1)))
    torch.set_num_threads(args.threads)
    tasks = args.tasks or list(task_specs())
    if args.methods:
        methods = list(args.methods)
    elif smoke:
        methods = ["source_only", "dann", "dan"]
    else:
        methods = list(METHODS)
    seeds = args.seeds or ([0] if smoke else [0, 1, 2])
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_transfer",
        "smoke": smoke,
        "jobs": jobs,
        "command": " ".join(sys.argv),
        "resumed": resume,
        "run_wall_s": None,
        "seeds": seeds,
        "environment": environment(device),
        "budgets": {
            name: asdict(spec.smoke_budget if smoke else spec.budget)
            for name, spec in task_specs(smoke).items()
        },
    }

    previous = RESULTS / "bench_transfer.json"
    if args.render_only and previous.is_file():
        # keep the wall time of the run that produced the cached units
        old = json.loads(previous.read_text())
        report["run_wall_s"] = old.get("run_wall_s") or old.get("wall_s")
        report["environment"] = old.get("environment", report["environment"])
        report["jobs"] = old.get("jobs", report["jobs"])
    import multiprocessing

    # one process per job and one thread per process: small convolutions scale badly over
    # threads, and the units are independent. The pretrained and text tables run beside
    # the adaptation units.
    pool = multiprocessing.get_context("spawn").Pool(jobs) if jobs > 1 and run else None
    pending: dict[str, Any] = {}
    side_cache = {
        name: CACHE / f"{name}{'-smoke' if smoke else ''}.json" for name in ("pretrained", "text")
    }
    cached_side = {name: resume and path.is_file() for name, path in side_cache.items()}
    if pool is not None and not args.no_pretrained and not cached_side["pretrained"]:
        pending["pretrained"] = pool.apply_async(_pretrained_job, (smoke, seeds))
    if pool is not None and not smoke and not args.no_text and not cached_side["text"]:
        pending["text"] = pool.apply_async(_text_job, (seeds,))
    # seed-major order: an interrupted run has complete seeds for every task
    units = [
        Unit(t, m, seed, smoke, str(device), args.steps, args.tradeoff, args.threads)
        for seed in seeds
        for t in tasks
        for m in methods
    ]
    rows = run_units(units, pool, resume=resume, run=run)
    table = summarise(rows)
    report["rows"] = rows
    report["adaptation"] = {
        t: {m: {k: v for k, v in c.items() if k != "source"} for m, c in ms.items()}
        for t, ms in table.items()
    }
    report["adaptation_wall_s"] = time.perf_counter() - started

    # methods that do not beat source only get a trade-off sweep (seed 0), reported too
    sweep_rows: list[dict[str, Any]] = []
    if not smoke and not args.no_sweep:
        losers = [
            Unit(t, m, seeds[0], smoke, str(device), args.steps, w, args.threads)
            for t, ms in table.items()
            for m in ms
            if m in ADAPTATION
            and "source_only" in ms
            and ms[m]["mean"] <= ms["source_only"]["mean"]
            for w in SWEEP
        ]
        sweep_rows = run_units(losers, pool, resume=resume, run=run) if losers else []
    report["sweep"] = sweep_rows

    def side_table(name: str, job: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        path = side_cache[name]
        if name in pending:
            result = pending[name].get()
        elif resume and path.is_file():
            result = json.loads(path.read_text())
        elif run:
            result = job()
        else:
            return None
        if result is not None:
            write_atomic(path, json.dumps(result))
        return result

    pretrained: dict[str, Any] | None = None
    if not args.no_pretrained:
        pretrained = side_table("pretrained", lambda: _pretrained_job(smoke, seeds))
        report["pretrained"] = pretrained
    text: dict[str, Any] | None = None
    if not smoke and not args.no_text:
        text = side_table("text", lambda: _text_job(seeds))
        report["text"] = text
    if pool is not None:
        pool.close()
        pool.join()
    report["wall_s"] = time.perf_counter() - started

    markdown = render_markdown(report, table, pretrained, text)
    print(markdown)
    if not args.no_write and not smoke:
        write_results(RESULTS / "bench_transfer.json", report, markdown + "\n")
        write_atomic(ROOT / "docs" / "benchmarks.md", docs_page(markdown) + "\n")
    if smoke:
        check_smoke(table, pretrained)
    return 0


def render_markdown(
    report: dict[str, Any],
    table: dict[str, dict[str, dict[str, Any]]],
    pretrained: dict[str, Any] | None,
    text: dict[str, Any] | None,
) -> str:
    env = report["environment"]
    parts = [
        "## Unsupervised domain adaptation (target test accuracy)",
        "",
        adaptation_markdown(table, len(report["seeds"])),
        "",
        f"Device: {env['device']} ({env['device_name']}, {env['cpu_count']} cores), "
        f"torch {env['torch']}, {report['jobs']} worker processes of one thread. "
        f"Training time of the {len(report['rows'])} adaptation runs, summed over runs: "
        f"{sum(r['wall_s'] for r in report['rows']):.0f} s; wall time of this invocation "
        f"{report['wall_s']:.0f} s"
        + (
            f" (rendered from cached runs; the run took {report['run_wall_s']:.0f} s)"
            if report["run_wall_s"]
            else (" (resumed from cached runs)" if report["resumed"] else "")
        )
        + ". The CPU was shared with other jobs (load average "
        f"{env['load_average_at_start']:.1f} at the start), so times are upper bounds.",
    ]
    parts += ["", "### Summary", ""]
    for task_name, cells in table.items():
        if "source_only" not in cells:
            continue
        base = cells["source_only"]["mean"]
        winners = [
            f"{LABELS[m]} ({100 * (cells[m]['mean'] - base):+.1f})"
            for m in ADAPTATION
            if m in cells and cells[m]["mean"] > base
        ]
        losers = [LABELS[m] for m in ADAPTATION if m in cells and cells[m]["mean"] <= base]
        line = f"- {task_name}: source only {100 * base:.1f}%; "
        line += "beat it: " + (", ".join(winners) if winners else "none")
        if losers:
            line += "; did not: " + ", ".join(losers) + " (trade-off sweep below)"
        if "source_only+adabn" in cells:
            gain = 100 * (cells["source_only+adabn"]["mean"] - base)
            line += f"; AdaBN alone: {gain:+.1f}"
        parts.append(line + ".")
    if report["sweep"]:
        parts += [
            "",
            "### Trade-off sweep for methods that did not beat source only (seed 0)",
            "",
            "| task | method | trade-off | target acc (%) |",
            "|---|---|---|---|",
        ]
        for row in report["sweep"]:
            parts.append(
                f"| {row['task']} | {LABELS[row['method']]} | {row['tradeoff']:g} | "
                f"{100 * row['target']:.1f} |"
            )
    if pretrained is not None:
        parts += [
            "",
            "## Transfer from pretrained features: k labelled scikit-learn digits (28x28)",
            "",
            pretrained_markdown(pretrained),
        ]
    if text is not None:
        parts += [
            "",
            "## Text: tweet sentiment across topics, frozen MiniLM embeddings",
            "",
            text_markdown({k: v for k, v in text.items() if k != "wall_s"}),
        ]
    return "\n".join(parts)


def docs_page(markdown: str) -> str:
    return DOCS_HEADER + "\n" + markdown + "\n\n" + DOCS_FOOTER


DOCS_HEADER = """# Benchmarks: real cross-dataset transfer

Generated by `python benchmarks/bench_transfer.py` (`make bench`); the raw numbers, the
budgets and the environment are in `benchmarks/results/bench_transfer.json`. Every
number comes from data that installs offline (`scripts/fetch_offline_data.sh`, see the
[real-data guide](guides/real-data.md)).

**Setup.** One LeNet-style network (`tk.models.SmallCNN`, width 16, 128-d bottleneck)
and one budget per task for every method. The recipe follows Ganin & Lempitsky (2015):
SGD with momentum 0.9 and weight decay 5e-4, learning rate `0.01 / (1 + 10 p)^0.75`,
trade-off ramped with `2 / (1 + exp(-10 p)) - 1` (the gradient-reversal coefficient for
DANN/CDAN through `tk.WarmStartSchedule`, the loss weight for DAN/JAN/CORAL), balanced
batches of 64 source + 64 target images, and per-domain BatchNorm statistics: source and
target batches are normalised separately during training and the target is evaluated
with target statistics (AdaBN). The "source only + AdaBN" row is the source-only network
evaluated with target statistics, so the gain of each method over plain statistics
alignment can be read off. Source only itself uses no target data at all.

**Paper comparison.** Ganin & Lempitsky (2015, Table 2) report on MNIST -> MNIST-M:
source only 52.25%, DANN 76.66% (train on target: 96.24%), a gain of +24 points. Our
MNIST-M-lite blends MNIST digits with crops of scikit-learn's two sample photos
(china.jpg, flower.jpg) instead of the 5,000 BSDS500 photos of MNIST-M, uses 3,000
images per domain and a few hundred steps on a CPU, so the numbers are comparable in
pattern, not in value. MNIST -> scikit-learn digits stands in for MNIST -> USPS (USPS is
not available offline).

**Recipes.** This page measures the losses with one shared recipe. The library's
per-method recipes (`tk.recipe`), per-domain BatchNorm, AdaBN and self-training are
compared side by side, with the oracle and the fraction of the gap each closes, by
`benchmarks/bench_adaptation_recipes.py`: see [adaptation results](guides/adaptation-results.md).
"""

DOCS_FOOTER = """## Reading these numbers (the committed run, 2026-11-25)

- **MNIST -> MNIST-M-lite** reproduces the paper's pattern: DANN gains +16 points over
  source only (mean of 3 seeds; the paper: +24 on MNIST-M), CDAN/CDAN+E +12, JAN +14.
  Part of every gain is per-domain BatchNorm: AdaBN alone gives +6.5, so DANN adds about
  +10 points on top of statistics alignment.
- **MNIST -> digits**: DAN, JAN and Deep CORAL beat source only by about 8 points, but
  AdaBN alone does as well (+7.9): with this budget the discrepancy losses add nothing
  measurable beyond per-domain statistics. DANN/CDAN/CDAN+E lose at trade-off 1 (the
  discriminator wins against 200 steps of feature learning and source accuracy drops);
  the sweep shows that a trade-off of 0.1 makes them beat source only (seed 0:
  54.7-56.0% vs 44.0%), on a par with DAN/CORAL. The benchmark keeps one trade-off
  per method for both tasks on purpose and reports the sweep rather than tuning on
  target labels.
- **Pretrained features**: at 20 labelled digits MNIST-pretrained features beat
  random-init features and raw pixels with every classifier (SVM 77.3 vs 68.8 / 67.8);
  Fashion-MNIST-pretrained features are *worse* than random ones for the SVM and the
  linear probe (64.1 / 68.2 vs 68.8 / 72.5): negative transfer. LogME puts the
  MNIST-pretrained features first by far but ranks the Fashion ones above random-init
  and raw pixels, so it misses the negative transfer. LP-FT is not in this table.
- **Text**: on these pos/neg tweets frozen MiniLM + a linear or kernel classifier trained
  on airline tweets only matches the majority class of the target topic (80.7 vs 80.7%
  on deflategate, 74.7 vs 74.0% on apple), and the MMD-adapted MLP head is worse than the plain head
  on both pairs. The target-supervised oracle reaches 83-85%, so the gap is real, but
  this simple adaptation does not close it.

Notes: the text rows use at most 500 tweets per topic (positive/negative only,
topics separated by keywords, see `tk.datasets.TWEET_TOPICS`); embeddings are cached in
`.cache/data/embeddings`. The Fashion-MNIST-pretrained row is the negative-transfer
control: features learned on clothing transfer worse to digits than random features or
raw pixels do.
"""


def check_smoke(
    table: dict[str, dict[str, dict[str, Any]]], pretrained: dict[str, Any] | None
) -> None:
    """The direction of the headline results, at smoke size."""
    if "mnist->mnist_m_lite" in table:
        cells = table["mnist->mnist_m_lite"]
        best = max(cells[m]["mean"] for m in ("dann", "cdan", "cdan_e") if m in cells)
        base = cells["source_only"]["mean"]
        assert best > base, f"MNIST->MNIST-M-lite: adversarial {best:.3f} <= {base:.3f}"
    if "mnist->digits" in table:
        cells = table["mnist->digits"]
        base = cells["source_only"]["mean"]
        gains = [m for m in ADAPTATION if m in cells and cells[m]["mean"] > base]
        assert gains, f"MNIST->digits: no adaptation method beat source only ({base:.3f})"
    if pretrained is not None:
        rows = pretrained["rows"]

        def at_20(row: dict[str, Any]) -> float:
            svm = {int(k): v for k, v in row["svm"].items()}
            return statistics.fmean(svm[20])

        mnist = at_20(rows["MNIST-pretrained CNN"])
        for other in ("random-init CNN", "raw pixels"):
            value = at_20(rows[other])
            assert mnist > value, f"k=20: MNIST-pretrained {mnist:.3f} <= {other} {value:.3f}"
    print("smoke checks passed")


if __name__ == "__main__":
    sys.exit(main())
