"""Adaptation recipes side by side: MNIST -> MNIST-M-lite and MNIST -> digits, offline.

Every row trains the same network (``tk.models.SmallCNN``, width 16, 128-d bottleneck)
with the same budget (steps, batches of 64 source + 64 target images) and the same
optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4, learning rate
``lr0 * (1 + 10 p) ** -0.75`` from ``tk.recipe``). ``lr0`` and whether source batches
are shifted by ``tk.augment.weak`` are chosen first, per task, for source only: it is
trained on every point of ``GRID`` and the point with the best accuracy on held-out
SOURCE images (the source test split, mean over the seeds) is kept; no target label is
read. Every other row then trains with that optimiser; only the transfer term differs,
each with its shipped ``tk.recipe(method).at_lr(lr0)`` trade-off and ramp:

* ``source_only`` (no target data) and ``source_only+adabn`` (the same network with
  target BatchNorm statistics, ``tk.adapt_batchnorm``);
* adaptation rows train with domain-specific BatchNorm (``tk.convert_domain_bn``:
  source and target batches are normalised with their own statistics) and are tested
  with target statistics re-estimated by ``tk.adapt_batchnorm``: ``dann``, ``cdan``,
  ``dan`` (MK-MMD), ``mcc``, ``bnm``, ``afn``, ``mdd``, ``self_training``
  (``tk.FixMatchLoss`` + ``tk.recipe("self_training").pseudo_labeler``, which warms
  up on the source first, with pseudo-labels from the recipe's ``mean_teacher``) and
  combinations such as ``dann+self_training``;
* ``oracle``: trained on the labelled target training split (the ceiling).

"Gap closed" is ``(method - source_only) / (oracle - source_only)`` of the mean
accuracies. Run ``python benchmarks/bench_adaptation_recipes.py`` (3 seeds, both
tasks, two worker processes); it writes ``benchmarks/results/adaptation_recipes.{json,md}``
and the table of ``docs/guides/adaptation-results.md``. ``--quick`` runs one seed with
fewer steps and smaller data and checks the direction of the headline results.
Finished runs are appended to ``.cache/bench_adaptation_recipes/rows.jsonl`` with a
fingerprint of what they compute (``fingerprint``: recipe values and the row's own loop
run on a tiny synthetic task) and of their data; ``--resume`` reuses only rows whose
fingerprints match the current code and data, so a changed method reruns and a moved
file does not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import transferkit as tk
from transferkit.datasets import DomainTask, infinite, make_loader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import environment, write_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "bench_adaptation_recipes"
DOCS_PAGE = ROOT / "docs" / "guides" / "adaptation-results.md"
BEGIN, END = "<!-- recipes-table:begin -->", "<!-- recipes-table:end -->"

METHODS = (  # the first group runs for every seed before the second one starts
    "source_only",
    "oracle",
    "dann",
    "cdan",
    "dan",
    "mcc",
    "self_training",
    "dann+self_training",
    "mcc+self_training",
    "bnm",
    "mdd",
    "afn",
)
SECOND_GROUP = ("mcc+self_training", "bnm", "mdd", "afn")
QUICK_METHODS = ("source_only", "dann", "dann+self_training")
LABELS = {
    "source_only": "source only",
    "source_only+adabn": "source only + AdaBN",
    "dann": "DANN",
    "cdan": "CDAN",
    "dan": "DAN (MK-MMD)",
    "mcc": "MCC",
    "bnm": "BNM",
    "afn": "AFN (SAFN)",
    "mdd": "MDD",
    "self_training": "self-training (FixMatch-style)",
    "dann+self_training": "DANN + self-training",
    "mcc+self_training": "MCC + self-training",
    "oracle": "target-supervised (oracle)",
}


@dataclass(frozen=True)
class Budget:
    """What every row of one task shares."""

    steps: int
    batch_size: int = 64
    lr: float = 0.03
    width: int = 16
    feature_dim: int = 128
    disc_hidden: int = 256
    neck_norm: str | None = None  # "batch": SmallCNN's BatchNorm bottleneck (--neck-norm)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    size: int
    budget: Budget


def task_specs(quick: bool) -> dict[str, TaskSpec]:
    if quick:
        return {
            "mnist->mnist_m_lite": TaskSpec("mnist->mnist_m_lite", 1000, Budget(steps=120)),
            "mnist->digits": TaskSpec("mnist->digits", 1000, Budget(steps=100)),
        }
    return {
        "mnist->mnist_m_lite": TaskSpec("mnist->mnist_m_lite", 3000, Budget(steps=400)),
        "mnist->digits": TaskSpec("mnist->digits", 3000, Budget(steps=300)),
    }


def build_task(name: str, size: int, seed: int) -> DomainTask:
    if name == "mnist->mnist_m_lite":
        return tk.datasets.mnist_to_mnist_m_lite(
            source_size=size, target_size=size, test_size=max(500, size // 3), seed=seed
        )
    return tk.datasets.mnist_to_digits(source_size=size, seed=seed)


# --------------------------------------------------------------------------- one run

Term = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def transfer_term(
    method: str, recipe: tk.Recipe, budget: Budget, num_classes: int, seed: int
) -> tuple[Term | None, list[nn.Module], bool]:
    """The transfer term ``term(f_s, logits_s, f_t, logits_t)`` and its modules.

    The flag says whether the loop ramps its weight (adversarial terms ramp their
    gradient reversal instead).
    """
    d = budget.feature_dim
    if method in ("source_only", "oracle", "self_training"):
        return None, [], False
    if method in ("dann", "cdan"):
        schedule = tk.WarmStartSchedule(budget.steps, alpha=10.0)
        grl = tk.GradientReversal(schedule)
        if method == "dann":
            loss = tk.DomainAdversarialLoss(
                tk.DomainDiscriminator(d, hidden=budget.disc_hidden), grl=grl
            )
            return (lambda fs, ls, ft, lt: loss(fs, ft)), [loss], False
        cdan = tk.ConditionalDomainAdversarialLoss(
            tk.DomainDiscriminator(d * num_classes, hidden=budget.disc_hidden),
            num_classes,
            d,
            entropy_conditioning=bool(recipe.options.get("entropy_conditioning", 0.0)),
            grl=grl,
            seed=seed,
        )
        return (lambda fs, ls, ft, lt: cdan(ls, fs, lt, ft)), [cdan], False
    if method == "mdd":
        # the adversary needs a hidden layer: a single Linear collapses (adversarial guide)
        head = tk.ClassifierHead(d, num_classes, hidden=(d,), dropout=0.0, pool=None)
        mdd = tk.MarginDisparityDiscrepancy(head, margin=float(recipe.options["margin"]))
        return (lambda fs, ls, ft, lt: mdd(ls, fs, lt, ft)), [mdd], True
    if method == "dan":
        kernel = tk.kernels.GaussianKernel()
        return (lambda fs, ls, ft, lt: tk.losses.mmd(fs, ft, kernel)), [], True
    if method == "mcc":
        temperature = float(recipe.options["temperature"])
        return (lambda fs, ls, ft, lt: tk.losses.mcc(lt, temperature=temperature)), [], True
    if method == "bnm":
        return (lambda fs, ls, ft, lt: tk.losses.bnm(lt)), [], True
    if method == "afn":
        # SAFN on each domain's (dropped-out) bottleneck features, summed; the norm step
        # lr * lambda * delta_r of the paper's learning rate (tk.recipe("afn").lr) is kept
        # (recipe.tradeoff already carries at_lr's scaling); with option ``entropy`` the
        # target predictions' entropy is added at that weight (SAFN+ENT)
        delta = float(recipe.options["delta"])
        entropy = float(recipe.options.get("entropy", 0.0)) / max(recipe.tradeoff, 1e-12)

        def afn(fs: Tensor, ls: Tensor, ft: Tensor, lt: Tensor) -> Tensor:
            norm = tk.losses.adaptive_feature_norm(
                fs, delta=delta
            ) + tk.losses.adaptive_feature_norm(ft, delta=delta)
            return norm + entropy * tk.losses.entropy(lt) if entropy else norm

        return afn, [], True
    raise ValueError(f"unknown method {method!r}")


def _recipe_name(method: str) -> str:
    """The oracle trains like source only, on target labels."""
    return "source_only" if method == "oracle" else method


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
        for i in range(0, len(x), 500)
    )
    return correct / len(x)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a seeded train / held-out split of ``n`` samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    cut = n - max(1, round(fraction * n))
    return order[:cut], order[cut:]


def train(
    method: str,
    task: DomainTask,
    budget: Budget,
    seed: int,
    *,
    overrides: dict[str, Any] | None = None,
    holdout: float = 0.0,
    trained: list[nn.Module] | None = None,
) -> dict[str, float]:
    """Train one row; return target-test (and source-test) accuracies.

    ``overrides`` replace fields of the method's recipe (``lr``, ``tradeoff`` ...) and
    ``"augment"`` (shift the labelled batches). With ``holdout > 0`` a supervised row
    (source only, oracle) trains on part of its labelled data and reports the accuracy on
    the rest as ``"val"`` (hyper-parameter selection without the test split).
    ``trained`` (a list) receives the network and the transfer term's modules.
    """
    tk.seed_everything(seed)
    overrides = dict(overrides or {})
    augment_labelled = bool(overrides.pop("augment", True))
    parts = method.split("+")
    base, self_training = parts[0], "self_training" in parts
    model = tk.models.SmallCNN(
        task.input_shape[0],
        task.num_classes,
        width=budget.width,
        feature_dim=budget.feature_dim,
        neck_norm="batch" if budget.neck_norm == "batch" else None,
    )
    adapt = method not in ("source_only", "oracle")
    if adapt:
        tk.convert_domain_bn(model)
    lr = float(overrides.pop("lr", budget.lr))
    if base == "afn" and budget.neck_norm == "batch" and "options" not in overrides:
        # With a BatchNorm bottleneck (TLlib's), TLlib's digit scripts keep lambda 0.05
        # at lr 0.01-0.1: the paper's value, not scaled down with the learning rate.
        overrides["options"] = {"scale_tradeoff_with_lr": 0.0}
    recipe = tk.recipe(_recipe_name(base), **overrides).at_lr(lr)
    term, modules, ramped = transfer_term(base, recipe, budget, task.num_classes, seed)
    fixmatch = None
    teacher = None
    if self_training:
        labeler = tk.recipe("self_training").pseudo_labeler(task.num_classes, budget.steps)
        fixmatch = tk.FixMatchLoss(labeler, weak=tk.augment.weak, strong=tk.augment.strong)
        teacher = tk.recipe("self_training").mean_teacher(model)
    params = [*model.parameters(), *(p for m in modules for p in m.parameters())]
    optimizer = recipe.optimizer(params)
    scheduler = recipe.scheduler(optimizer, budget.steps)
    x_source, y_source = (
        (task.target_x, task.target_y) if method == "oracle" else (task.source_x, task.source_y)
    )
    x_val = y_val = None
    if holdout:
        if adapt:
            raise ValueError("holdout: only for the supervised rows")
        keep, held = split_holdout(len(x_source), holdout, seed)
        x_val, y_val = x_source[held], y_source[held]
        x_source, y_source = x_source[keep], y_source[keep]
    source = infinite(make_loader(x_source, y_source, batch_size=budget.batch_size, seed=seed))
    target = infinite(
        make_loader(task.target_x, batch_size=budget.batch_size, drop_last=True, seed=seed + 1)
    )
    shift = tk.augment.weak if augment_labelled else (lambda x: x)
    drop = float(recipe.options.get("dropout", 0.0))

    def neck(f: Tensor) -> Tensor:
        # L2-preserving dropout on the bottleneck (AFN): kept units scaled by 1/sqrt(1-p)
        if not drop:
            return f
        return F.dropout(f, drop) * (1.0 - drop) ** 0.5

    def domain(name: str) -> contextlib.AbstractContextManager[Any]:
        return tk.bn_domain(model, name) if adapt else contextlib.nullcontext()

    model.train()
    for module in modules:
        module.train()
    for step in range(budget.steps):
        progress = step / budget.steps
        x_s, y_s = next(source)
        with domain("source"):
            f_s = neck(model.forward_features(shift(x_s)))
            logits_s = model.fc(f_s)
        loss = F.cross_entropy(logits_s, y_s)
        if adapt:
            (x_t,) = next(target)
            with domain("target"):
                if term is not None:
                    f_t = neck(model.forward_features(x_t))
                    weight = recipe.tradeoff_at(progress) if ramped else recipe.tradeoff
                    loss = loss + weight * term(f_s, logits_s, f_t, model.fc(f_t))
                if fixmatch is not None and teacher is not None:
                    # pseudo-labels from the mean teacher, with target batch statistics
                    with tk.bn_domain(teacher, "target"):
                        loss = loss + fixmatch(model, x_t, teacher=teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for module in modules:
            grl = getattr(module, "grl", None)
            schedule = getattr(grl, "schedule", None)
            if schedule is not None:
                schedule.step()
        if fixmatch is not None:
            fixmatch.step()
        if teacher is not None:
            teacher.update(model)
    if trained is not None:
        trained += [model, *modules]
    result: dict[str, float] = {}
    if x_val is not None and y_val is not None:
        return {"val": accuracy(model, x_val, y_val)}
    with domain("source"):
        result["source"] = accuracy(model, task.source_test_x, task.source_test_y)
    if method == "oracle":
        result["target"] = accuracy(model, task.target_test_x, task.target_test_y)
        return result
    if method == "source_only":
        result["target"] = accuracy(model, task.target_test_x, task.target_test_y)
    with domain("target"):
        tk.adapt_batchnorm(model, task.target_x, progress=False)
        key = "target_adabn" if method == "source_only" else "target"
        result[key] = accuracy(model, task.target_test_x, task.target_test_y)
    return result


# --------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class Unit:
    task: str
    method: str
    seed: int
    quick: bool
    lr: float
    shift: bool
    neck_norm: str | None = None


#: The optimiser settings source only chooses from (on held-out source accuracy).
GRID = tuple((lr, shift) for lr in (0.01, 0.03, 0.1) for shift in (False, True))


def _probe_task() -> DomainTask:
    """A tiny synthetic task on which every code path of a row runs in a few steps."""
    g = torch.Generator().manual_seed(0)

    def images(n: int, offset: float) -> Tensor:
        return torch.rand(n, 1, 28, 28, generator=g) + offset

    def labels(n: int) -> Tensor:
        return torch.arange(n) % 10

    return DomainTask(
        name="probe",
        num_classes=10,
        source_x=images(40, 0.0),
        source_y=labels(40),
        source_test_x=images(20, 0.0),
        source_test_y=labels(20),
        target_x=images(40, 0.5),
        target_test_x=images(20, 0.5),
        target_test_y=labels(20),
        target_y=labels(40),
    )


def _hash_tensors(tensors: list[Any], digest: Any) -> None:
    for tensor in tensors:
        if not isinstance(tensor, Tensor):  # extra state (e.g. a schedule's step)
            digest.update(repr(tensor).encode())
            continue
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())


def fingerprint(method: str, neck_norm: str | None = None) -> str:
    """What a row of ``method`` computes, independent of where the code lives.

    Hashes the torch version, the recipe values the row uses (not their ``reference``
    text) and a *behavioural probe*:
    the trained parameters and accuracies of the row's own training loop run for 6 steps
    on a tiny synthetic task (every code path of the row: network, BatchNorm handling,
    transfer term, self-training warm-up, optimiser, schedules, AdaBN, evaluation). Moving
    code between files (issue 17) keeps the fingerprint; any change in what the code
    computes changes it and invalidates the cached rows of that method.
    """
    import hashlib

    digest = hashlib.sha256(torch.__version__.encode())
    for part in method.split("+"):
        values = tk.recipe(_recipe_name(part)).to_dict()
        values.pop("reference")  # words, not computation
        digest.update(json.dumps(values, sort_keys=True).encode())
    trained: list[nn.Module] = []
    budget = Budget(
        steps=6, batch_size=16, width=4, feature_dim=16, disc_hidden=16, neck_norm=neck_norm
    )
    with _one_thread():
        result = train(method, _probe_task(), budget, 0, overrides={"lr": 0.1}, trained=trained)
    digest.update(json.dumps(result, sort_keys=True).encode())
    for module in trained:
        _hash_tensors(list(module.state_dict().values()), digest)
    return digest.hexdigest()[:16]


def data_fingerprint(task: DomainTask) -> str:
    """A hash of a task's tensors (the data a row trains and tests on)."""
    import hashlib

    digest = hashlib.sha256(task.name.encode())
    _hash_tensors(
        [
            task.source_x,
            task.source_y,
            task.source_test_x,
            task.source_test_y,
            task.target_x,
            task.target_y,
            task.target_test_x,
            task.target_test_y,
        ],
        digest,
    )
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_TASKS: dict[tuple[str, int, bool], DomainTask] = {}


def run_unit(unit: Unit) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = task_specs(unit.quick)[unit.task]
    task = task_for(unit.task, unit.seed, unit.quick)
    start, cpu_start = time.perf_counter(), time.process_time()
    overrides = {"lr": unit.lr, "augment": unit.shift}
    budget = dataclasses.replace(spec.budget, neck_norm=unit.neck_norm)
    acc = train(unit.method, task, budget, unit.seed, overrides=overrides)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # one thread: what the run costs on an idle core
    print(
        f"{unit.task:20s} {unit.method:20s} seed={unit.seed} lr={unit.lr} shift={unit.shift:d} "
        + " ".join(f"{k}={v:.3f}" for k, v in acc.items())
        + f" ({wall:.0f}s)",
        flush=True,
    )
    return {
        **asdict(unit),
        "steps": spec.budget.steps,
        "code": _fingerprint(unit.method, unit.neck_norm),
        "data": data_fingerprint(task),
        "wall_s": wall,
        "cpu_s": cpu,
        **acc,
    }


KEY_FIELDS = (
    "task",
    "method",
    "seed",
    "quick",
    "steps",
    "lr",
    "shift",
    "neck_norm",
    "code",
    "data",
)


_FINGERPRINTS: dict[tuple[str, str | None], str] = {}


def _fingerprint(method: str, neck_norm: str | None = None) -> str:
    if (method, neck_norm) not in _FINGERPRINTS:
        _FINGERPRINTS[method, neck_norm] = fingerprint(method, neck_norm)
    return _FINGERPRINTS[method, neck_norm]


def task_for(task: str, seed: int, quick: bool) -> DomainTask:
    key = (task, seed, quick)
    if key not in _TASKS:
        _TASKS[key] = build_task(task, task_specs(quick)[task].size, seed)
    return _TASKS[key]


def unit_key(row: dict[str, Any]) -> str:
    # rows written before the neck_norm field existed ran the plain bottleneck
    return json.dumps([row.get(name) for name in KEY_FIELDS])


def _unit_key(unit: Unit) -> str:
    steps = task_specs(unit.quick)[unit.task].budget.steps
    data = data_fingerprint(task_for(unit.task, unit.seed, unit.quick))
    return unit_key(
        {
            **asdict(unit),
            "steps": steps,
            "code": _fingerprint(unit.method, unit.neck_norm),
            "data": data,
        }
    )


def _cached_rows(quick: bool) -> list[dict[str, Any]]:
    path = CACHE / ("rows-quick.jsonl" if quick else "rows.jsonl")
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "code" in row]


def run_units(units: list[Unit], jobs: int, *, resume: bool) -> list[dict[str, Any]]:
    """Run (or, with ``resume``, reuse rows of the same code for) every unit."""
    path = CACHE / ("rows-quick.jsonl" if units and units[0].quick else "rows.jsonl")
    cached: dict[str, dict[str, Any]] = {}
    if resume and units:
        cached = {unit_key(row): row for row in _cached_rows(units[0].quick)}
    done: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, Unit]] = []
    for i, unit in enumerate(units):
        key = _unit_key(unit)
        if key in cached:
            done[i] = cached[key]
        else:
            todo.append((i, unit))
    if todo:
        CACHE.mkdir(parents=True, exist_ok=True)
        results: Iterator[dict[str, Any]]
        pool = None
        if jobs > 1:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(jobs)
            results = pool.imap(run_unit, [u for _, u in todo], chunksize=1)
        else:
            results = map(run_unit, [u for _, u in todo])
        with open(path, "a") as handle:
            for (i, _), row in zip(todo, results, strict=True):
                done[i] = row
                handle.write(json.dumps(row) + "\n")
                handle.flush()
        if pool is not None:
            pool.close()
            pool.join()
    return [done[i] for i in sorted(done)]


def select_optimiser(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the grid point whose source-only model is best on held-out SOURCE data.

    The criterion is the mean source-test accuracy over the seeds (MNIST test images
    never seen in training); no target label is read. Ties go to the smaller learning
    rate. Returns ``{task: {"lr", "shift", "grid": [...]}}``.
    """
    by_task: dict[str, dict[tuple[float, bool], list[float]]] = {}
    for row in rows:
        if row["method"] == "source_only":
            cell = by_task.setdefault(row["task"], {}).setdefault((row["lr"], row["shift"]), [])
            cell.append(row["source"])
    chosen: dict[str, dict[str, Any]] = {}
    for task, cells in by_task.items():
        means = {cfg: statistics.fmean(v) for cfg, v in cells.items()}
        lr, shift = max(means, key=lambda cfg: (means[cfg], -cfg[0]))
        chosen[task] = {
            "lr": lr,
            "shift": shift,
            "grid": [
                {"lr": c[0], "shift": c[1], "source_val": means[c], "runs": len(cells[c])}
                for c in sorted(means)
            ],
        }
    return chosen


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        cells = values.setdefault(row["task"], {})
        cells.setdefault(row["method"], []).append(row["target"])
        if "target_adabn" in row:
            cells.setdefault("source_only+adabn", []).append(row["target_adabn"])
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task, cells in values.items():
        table[task] = {}
        for method in LABELS:
            if method not in cells:
                continue
            accs = cells[method]
            table[task][method] = {
                "values": accs,
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            }
        top = table[task].get("oracle")
        baselines = {
            "gap_closed": table[task].get("source_only"),
            "gap_closed_vs_adabn": table[task].get("source_only+adabn"),
        }
        for method, cell in table[task].items():
            if method in ("source_only", "oracle") or top is None:
                continue
            for key, base in baselines.items():
                if base is not None and base is not cell and top["mean"] > base["mean"]:
                    cell[key] = (cell["mean"] - base["mean"]) / (top["mean"] - base["mean"])
    return table


def markdown(table: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> str:
    tasks = list(table)
    header = "| method | " + " | ".join(
        f"{t}: accuracy (%) | gap closed | gap closed vs AdaBN" for t in tasks
    )
    lines = [header + " |", "|---|" + "---|---|---|" * len(tasks)]
    for method in LABELS:
        if not any(method in table[t] for t in tasks):
            continue
        cells = []
        for t in tasks:
            cell = table[t].get(method)
            if cell is None:
                cells += ["n/a", "", ""]
                continue
            runs = len(cell["values"])
            partial = f" [{runs} of {len(seeds)} seeds]" if runs < len(seeds) else ""
            cells.append(f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}{partial}")
            for key in ("gap_closed", "gap_closed_vs_adabn"):
                cells.append(f"{100 * cell[key]:.0f}%" if key in cell else "")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target-test accuracy, mean ± standard deviation over seeds {', '.join(map(str, seeds))} "
        "(the seed also redraws the data subsets). Gap closed = (method - source only) / "
        "(oracle - source only) of the means; gap closed vs AdaBN = (method - source only + "
        "AdaBN) / (oracle - source only + AdaBN): the share of what is left after the free "
        "BatchNorm fix.",
    ]
    return "\n".join(lines)


def selection_markdown(chosen: dict[str, dict[str, Any]], grid_rows: list[dict[str, Any]]) -> str:
    """The optimiser grid of source only: held-out source accuracy (the criterion)."""
    target: dict[tuple[str, float, bool], list[float]] = {}
    for row in grid_rows:
        target.setdefault((row["task"], row["lr"], row["shift"]), []).append(row["target"])
    lines = [
        "| task | learning rate | shifted source batches | held-out source accuracy (%) "
        "| target accuracy (%), not used |",
        "|---|---|---|---|---|",
    ]
    for task, pick in chosen.items():
        for cell in pick["grid"]:
            mark = (
                " **(chosen)**"
                if (cell["lr"], cell["shift"]) == (pick["lr"], pick["shift"])
                else ""
            )
            accs = target[(task, cell["lr"], cell["shift"])]
            lines.append(
                f"| {task} | {cell['lr']:g}{mark} | {'yes' if cell['shift'] else 'no'} | "
                f"{100 * cell['source_val']:.1f} | {100 * statistics.fmean(accs):.1f} |"
            )
    return "\n".join(lines)


def update_docs(table_md: str, report: dict[str, Any]) -> None:
    """Replace the generated table in the results page (between the markers)."""
    if not DOCS_PAGE.is_file():
        return
    text = DOCS_PAGE.read_text()
    if BEGIN not in text or END not in text:
        return
    env = report["environment"]
    runs = report["grid_rows"] + [r for r in report["rows"] if r["method"] != "source_only"]
    summed = sum(row["wall_s"] for row in runs)
    cpu = sum(row.get("cpu_s", row["wall_s"]) for row in runs)
    timing = (
        f"in {report['wall_s'] / 60:.1f} minutes of wall time"
        if report["wall_s"]
        else "(assembled from finished runs with --resume)"
    )
    block = (
        f"{BEGIN}\n{table_md}\n\nGenerated by `python benchmarks/bench_adaptation_recipes.py` "
        f"{timing}, {report['jobs']} worker processes of one thread on {env['cpu_count']} "
        f"cores shared with other jobs (load average {env['load_average_at_start']:.1f} at "
        f"the start); the {len(runs)} runs took {summed / 60:.1f} minutes of wall time "
        f"summed over runs and {cpu / 60:.1f} minutes of CPU time (about "
        f"{cpu / 60 / report['jobs']:.1f} minutes per worker process, roughly the wall "
        f"time on an otherwise idle machine). torch {env['torch']}; raw numbers in "
        "`benchmarks/results/adaptation_recipes.json`.\n" + END
    )
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    write_atomic(DOCS_PAGE, before + block + after)


def check_quick(table: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The direction of the headline results, at quick size (one seed)."""
    cells = table["mnist->mnist_m_lite"]
    base = cells["source_only"]["mean"]
    for method in ("dann", "dann+self_training"):
        if method in cells:
            assert cells[method]["mean"] > base, f"MNIST-M-lite: {method} did not beat source only"
    cells = table["mnist->digits"]
    assert cells["source_only+adabn"]["mean"] > cells["source_only"]["mean"], "AdaBN did not help"
    print("quick checks passed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps, asserts")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(task_specs(False)))
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs")
    parser.add_argument(
        "--render-only", action="store_true", help="tables from finished runs only (no training)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--neck-norm",
        choices=["batch"],
        default=None,
        help="every row on SmallCNN(neck_norm='batch'); results to adaptation_recipes_neck_batch",
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    tasks = args.tasks or list(task_specs(args.quick))
    methods = args.methods or list(QUICK_METHODS if args.quick else METHODS)
    report: dict[str, Any] = {
        "benchmark": "bench_adaptation_recipes",
        "quick": args.quick,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "seeds": seeds,
        "jobs": args.jobs,
        "environment": environment(),
        "budgets": {
            n: asdict(s.budget) | {"size": s.size, "neck_norm": args.neck_norm}
            for n, s in task_specs(args.quick).items()
        },
        "recipes": {m: tk.recipe(_recipe_name(m.split("+")[0])).to_dict() for m in methods},
    }
    stem = "adaptation_recipes" + (f"_neck_{args.neck_norm}" if args.neck_norm else "")
    started = time.perf_counter()
    cached = {unit_key(r): r for r in _cached_rows(args.quick)} if args.render_only else {}

    def fetch(units: list[Unit]) -> list[dict[str, Any]]:
        if args.render_only:
            keys = [_unit_key(u) for u in units]
            return [cached[k] for k in keys if k in cached]
        return run_units(units, args.jobs, resume=args.resume)

    # 1. source only on every grid point; the optimiser is chosen on held-out source data
    grid_rows = fetch(
        [
            Unit(t, "source_only", s, args.quick, lr, shift, args.neck_norm)
            for s in seeds
            for t in tasks
            for lr, shift in GRID
        ]
    )
    chosen = select_optimiser(grid_rows)
    report["selection"] = chosen
    # 2. every other row with the same optimiser (and budget) as the chosen source only
    groups = [
        [m for m in methods if m not in SECOND_GROUP and m != "source_only"],
        [m for m in methods if m in SECOND_GROUP],
    ]
    units = [
        Unit(t, m, s, args.quick, chosen[t]["lr"], chosen[t]["shift"], args.neck_norm)
        for g in groups
        for s in seeds
        for t in tasks
        if t in chosen
        for m in g
    ]
    rows = [
        r
        for r in grid_rows
        if (r["lr"], r["shift"]) == (chosen[r["task"]]["lr"], chosen[r["task"]]["shift"])
    ] + fetch(units)
    if args.render_only:
        previous = RESULTS / f"{stem}.json"
        if previous.is_file():
            report["environment"] = json.loads(previous.read_text())["environment"]
    report["wall_s"] = time.perf_counter() - started
    if args.render_only or args.resume:
        report["wall_s"] = None
    runs = grid_rows + [r for r in rows if r["method"] != "source_only"]
    report["wall_s_summed_over_runs"] = sum(r["wall_s"] for r in runs)
    report["cpu_s_summed_over_runs"] = sum(r.get("cpu_s", r["wall_s"]) for r in runs)
    report["grid_rows"] = grid_rows
    report["rows"] = rows
    table = summarise(rows)
    report["table"] = table
    table_md = markdown(table, seeds) + "\n\n" + selection_markdown(chosen, grid_rows)
    print(table_md)
    if not args.no_write and not args.quick:
        write_atomic(RESULTS / f"{stem}.json", json.dumps(report, indent=2) + "\n")
        write_atomic(RESULTS / f"{stem}.md", table_md + "\n")
        if args.neck_norm is None:
            update_docs(table_md, report)
    if args.quick and set(task_specs(True)) <= set(table):
        check_quick(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
