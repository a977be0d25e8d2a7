from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import entropy as scipy_entropy
from sklearn.linear_model import LogisticRegression

import transferkit as tk
from transferkit import selection

# --------------------------------------------------------------------------- references


def _load_benchmark_references() -> ModuleType:
    """``benchmarks/bench_selection.py``: its NumPy formulas are the references here too."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_selection.py"
    spec = importlib.util.spec_from_file_location("bench_selection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the authors' ``LogME._fit_fixed_point`` (thuml/LogME), ported line by line to NumPy
reference_logme_fixed_point = _load_benchmark_references().logme_numpy


def reference_logme_primal(f: np.ndarray, y: np.ndarray, iterations: int = 500) -> float:
    """MacKay's evidence maximisation written in the primal: explicit A, m and slogdet."""
    n, d = f.shape
    ftf = f.T @ f
    eig = np.linalg.eigvalsh(ftf)
    evidences = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            a = alpha * np.eye(d) + beta * ftf
            m = beta * np.linalg.solve(a, f.T @ target)
            gamma = float(np.sum(beta * eig / (alpha + beta * eig)))
            alpha = gamma / (m @ m)
            beta = (n - gamma) / np.sum((target - f @ m) ** 2)
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, f.T @ target)
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.linalg.slogdet(a)[1]
            - beta / 2 * np.sum((f @ m - target) ** 2)
            - alpha / 2 * (m @ m)
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def reference_leep(p: np.ndarray, y: np.ndarray) -> float:
    n, z_classes = p.shape
    classes = sorted(set(y.tolist()))
    joint = np.zeros((len(classes), z_classes))
    for i in range(n):
        for z in range(z_classes):
            joint[classes.index(y[i]), z] += p[i, z] / n
    total = 0.0
    for i in range(n):
        eep = 0.0
        for z in range(z_classes):
            eep += joint[classes.index(y[i]), z] / joint[:, z].sum() * p[i, z]
        total += math.log(eep)
    return total / n


def reference_hscore(f: np.ndarray, y: np.ndarray) -> float:
    """The TLlib / Bao et al. formulation with a loop over classes."""
    cov_f = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15) @ cov_g))


def reference_nce(z: np.ndarray, y: np.ndarray) -> float:
    n = len(y)
    result = 0.0
    for zz in set(z.tolist()):
        pz = np.mean(z == zz)
        for yy in set(y.tolist()):
            pyz = np.sum((z == zz) & (y == yy)) / n
            if pyz > 0:
                result += pyz * math.log(pyz / pz)
    return result


def informative_features(rng: np.random.Generator, n: int, d: int, classes: int) -> tuple:
    labels = rng.integers(0, classes, size=n)
    means = rng.normal(size=(classes, d)) * 2.0
    return means[labels] + rng.normal(size=(n, d)), labels


# --------------------------------------------------------------------------- LogME


@pytest.mark.parametrize(("n", "d", "classes"), [(50, 5, 3), (200, 16, 4), (120, 30, 10)])
def test_logme_matches_the_authors_fixed_point_code_on_full_rank_features(n, d, classes) -> None:
    rng = np.random.default_rng(n + d)
    f, y = informative_features(rng, n, d, classes)
    y[:classes] = np.arange(classes)
    assert selection.logme(f, y) == pytest.approx(reference_logme_fixed_point(f, y), rel=1e-9)


@pytest.mark.parametrize(("n", "d"), [(60, 4), (40, 60)])
def test_logme_matches_converged_primal_evidence_maximisation(n, d) -> None:
    rng = np.random.default_rng(d)
    f, y = informative_features(rng, n, d, 3)
    y[:3] = np.arange(3)
    # 11 capped fixed-point steps vs a fully converged primal solution: the evidence is
    # stationary at the optimum, so the two agree closely.
    assert selection.logme(f, y) == pytest.approx(reference_logme_primal(f, y), rel=2e-3)


def test_logme_accepts_tensors_and_integer_arrays_and_does_not_modify_input() -> None:
    rng = np.random.default_rng(0)
    f, y = informative_features(rng, 80, 6, 3)
    f32 = torch.from_numpy(f).float()
    before = f32.clone()
    from_tensor = selection.logme(f32, torch.from_numpy(y))
    assert torch.equal(f32, before)
    assert from_tensor == pytest.approx(selection.logme(f.astype(np.float32), y), rel=1e-9)
    assert isinstance(selection.logme(np.rint(f * 10).astype(np.int32), y), float)


@given(seed=st.integers(0, 10_000))
def test_logme_is_invariant_to_sample_order_and_class_names(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f, y = informative_features(rng, 40, 4, 3)
    y[:3] = np.arange(3)
    order = rng.permutation(40)
    renamed = np.array([7, 2, 5])[y]
    base = selection.logme(f, y)
    assert selection.logme(f[order], y[order]) == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert selection.logme(f, renamed) == pytest.approx(base, rel=1e-9)


# --------------------------------------------------------------------------- LEEP, H, NCE


@pytest.mark.filterwarnings("ignore:leep.*in-sample estimate")
@given(
    p=arrays(np.float64, (12, 4), elements=st.floats(0.01, 1.0)),
    y=arrays(np.int64, (12,), elements=st.integers(0, 2)),
)
def test_leep_equals_loop_reference(p: np.ndarray, y: np.ndarray) -> None:
    p = p / p.sum(1, keepdims=True)
    assert selection.leep(p, y, estimator="empirical") == pytest.approx(
        reference_leep(p, y), rel=1e-9
    )


@pytest.mark.filterwarnings("ignore:leep.*in-sample estimate")
def test_leep_is_at_most_zero_and_zero_for_deterministic_source_labels() -> None:
    y = np.array([0, 1, 1, 0, 2])
    p = np.eye(3)[[2, 0, 0, 2, 1]]
    assert selection.leep(p, y, estimator="empirical") == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(3), size=5)
    assert selection.leep(q, y) <= 0.0


@pytest.mark.parametrize(("n", "d", "classes"), [(30, 3, 2), (100, 8, 5), (300, 20, 10)])
def test_hscore_equals_class_loop_reference(n, d, classes) -> None:
    rng = np.random.default_rng(n)
    f, y = informative_features(rng, n, d, classes)
    assert selection.hscore(f, y, shrinkage=None) == pytest.approx(reference_hscore(f, y), rel=1e-8)


@given(seed=st.integers(0, 10_000))
def test_hscore_is_invariant_to_invertible_affine_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f, y = informative_features(rng, 60, 3, 3)
    a = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    mapped = f @ a + rng.normal(size=3)
    assert selection.hscore(mapped, y, shrinkage=None) == pytest.approx(
        selection.hscore(f, y, shrinkage=None), rel=1e-6
    )


def test_hscore_is_bounded_by_classes_minus_one() -> None:
    rng = np.random.default_rng(1)
    f, y = informative_features(rng, 200, 6, 4)
    assert 0.0 <= selection.hscore(f, y, shrinkage=None) <= 3.0 + 1e-9
    assert selection.hscore(np.eye(4)[y], y, shrinkage=None) == pytest.approx(3.0)
    # the Ledoit-Wolf regularised score only shrinks it
    assert 0.0 <= selection.hscore(f, y) <= selection.hscore(f, y, shrinkage=None)


@pytest.mark.filterwarnings("ignore:nce.*in-sample estimate")
@given(
    z=arrays(np.int64, (20,), elements=st.integers(0, 4)),
    y=arrays(np.int64, (20,), elements=st.integers(0, 3)),
)
def test_nce_equals_count_reference_and_accepts_scores(z: np.ndarray, y: np.ndarray) -> None:
    expected = reference_nce(z, y)
    assert selection.nce(z, y, estimator="empirical") == pytest.approx(expected, abs=1e-12)
    scores = np.eye(5)[z] + 0.01 * np.arange(5)
    assert selection.nce(
        torch.from_numpy(scores), torch.from_numpy(y), estimator="empirical"
    ) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- ranking on real data


@pytest.fixture(scope="module")
def digits_candidates() -> dict[str, np.ndarray]:
    """Informative features of target digits vs a random projection of pure noise."""
    task = tk.datasets.digits("noise", size=8, seed=0).flat()
    source_x, source_y = task.source_x.numpy(), task.source_y.numpy()
    target_x, target_y = task.target_x.numpy(), task.target_y.numpy()
    rng = np.random.default_rng(0)
    classifier = LogisticRegression(max_iter=2000).fit(source_x, source_y)
    random_weights = rng.normal(size=(64, 10))
    noise_projection = rng.normal(size=target_x.shape) @ random_weights
    random_logits = target_x @ random_weights
    return {
        "labels": target_y,
        "good_features": target_x,
        "random_features": noise_projection,
        "good_probs": classifier.predict_proba(target_x),
        "random_probs": torch.softmax(torch.from_numpy(random_logits), 1).numpy(),
    }


@pytest.mark.parametrize("score", selection.SCORES)
def test_every_score_ranks_informative_digits_above_a_random_projection(
    score: str, digits_candidates: dict[str, np.ndarray]
) -> None:
    kind = "probs" if score in ("leep", "nce") else "features"
    table = selection.rank(
        {
            "random": digits_candidates[f"random_{kind}"],
            "good": digits_candidates[f"good_{kind}"],
        },
        digits_candidates["labels"],
        score=score,
    )
    assert table.names == ["good", "random"]
    assert table.score == score
    assert table["good"].score > table["random"].score


def test_rank_accepts_a_callable_and_prints_a_table() -> None:
    def spread(features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.std(features))

    rng = np.random.default_rng(0)
    table = selection.rank(
        {"narrow": rng.normal(size=(10, 2)), "wide": 5 * rng.normal(size=(10, 2))},
        np.arange(10) % 2,
        score=spread,
    )
    assert [row.rank for row in table] == [1, 2]
    assert table.best == "wide" and len(table) == 2
    text = str(table)
    assert text.splitlines()[0].split() == ["rank", "candidate", "spread"]
    assert "wide" in text.splitlines()[2]
    markdown = table.to_markdown().splitlines()
    assert markdown[0] == "| rank | candidate | spread |" and len(markdown) == 4
    with pytest.raises(KeyError, match="did you mean 'wide'"):
        table["wid"]


# --------------------------------------------------------------------------- input validation


def test_scores_reject_bad_inputs_with_the_argument_name() -> None:
    f = np.random.default_rng(0).normal(size=(10, 3))
    y = np.arange(10) % 2
    bad = f.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="features"):
        selection.logme(bad, y)
    with pytest.raises(ValueError, match="labels: expected 10 labels"):
        selection.hscore(f, y[:5])
    with pytest.raises(TypeError, match="labels"):
        selection.logme(f, y.astype(float))
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        selection.logme(f, np.zeros(10, dtype=int))
    with pytest.raises(TypeError, match="features"):
        selection.logme(f.tolist(), y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source_probs.*softmax"):
        selection.leep(f, y)
    with pytest.raises(ValueError, match="score: .*did you mean 'logme'"):
        selection.rank({"a": f}, y, score="logmee")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidate 'a'"):
        selection.rank({"a": f[:5]}, y)
    with pytest.raises(ValueError, match="candidates"):
        selection.rank({}, y)
    with pytest.raises(ValueError, match="every class needs at least 2"):
        selection.knn_score(f[:3], np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="metric"):
        selection.knn_score(f, y, metric="manhattan")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- validators


def covariate_shift_toy(seed: int, n_source: int = 400, n_target: int = 400) -> dict:
    """Source x ~ N(0, I), target x ~ N((1, 0.5), I); p(y | x) is shared. The labelling
    rule has a second boundary at x_0 = 1.5 that a fixed model misses, so the model's
    risk is larger where the target lives. The true target risk is a Monte-Carlo
    average over 200,000 fresh target samples."""
    rng = np.random.default_rng(seed)
    shift = np.array([1.0, 0.5])

    def label(x: np.ndarray) -> np.ndarray:
        return ((x[:, 0] + 0.3 * x[:, 1] > 0) ^ (x[:, 0] > 1.5)).astype(int)

    def loss(x: np.ndarray) -> np.ndarray:
        predicted = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(int)
        return (predicted != label(x)).astype(float)

    source = rng.normal(size=(n_source, 2))
    target = rng.normal(size=(n_target, 2)) + shift
    fresh_target = rng.normal(size=(200_000, 2)) + shift
    return {
        "source": source,
        "target": target,
        "source_losses": loss(source),
        "true_risk": float(loss(fresh_target).mean()),
    }


def test_iwcv_and_dev_recover_the_target_risk_better_than_source_validation() -> None:
    errors: dict[str, list[float]] = {"source": [], "iwcv": [], "iwcv_clip5": [], "dev": []}
    for seed in range(8):
        toy = covariate_shift_toy(seed)
        truth, losses = toy["true_risk"], toy["source_losses"]
        if seed == 0:  # the feature path and the weights path agree
            direct = selection.iwcv(losses, toy["source"], toy["target"])
        weights = selection.importance_weights(toy["source"], toy["target"])
        if seed == 0:
            assert direct == pytest.approx(selection.iwcv(losses, weights=weights))
        clipped = np.minimum(weights, 5.0 * weights.mean())
        errors["source"].append(abs(losses.mean() - truth))
        errors["iwcv"].append(abs(selection.iwcv(losses, weights=weights) - truth))
        errors["iwcv_clip5"].append(abs(selection.iwcv(losses, weights=clipped) - truth))
        errors["dev"].append(abs(selection.dev(losses, weights=weights) - truth))
    mean = {name: float(np.mean(values)) for name, values in errors.items()}
    print("mean |estimate - true target risk| over 8 seeds:", mean)
    assert mean["iwcv"] < 0.5 * mean["source"]
    assert mean["dev"] < 0.5 * mean["source"]
    assert mean["iwcv_clip5"] < mean["source"]


def test_importance_weights_match_the_true_gaussian_density_ratio() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(2000, 1))
    target = rng.normal(loc=1.0, size=(2000, 1))
    true_ratio = np.exp(source[:, 0] - 0.5)  # N(1, 1) / N(0, 1)
    estimated = selection.importance_weights(source, target)
    central = np.abs(source[:, 0]) < 2
    relative = np.abs(estimated[central] - true_ratio[central]) / true_ratio[central]
    assert float(np.median(relative)) < 0.1
    assert estimated.mean() == pytest.approx(1.0, abs=0.1)
    clipped = selection.importance_weights(source, target, clip=3.0)
    assert clipped.max() <= 3.0 * estimated.mean() + 1e-12
    assert clipped.max() < estimated.max()


def test_dev_equals_the_control_variate_formula() -> None:
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=50)
    weights = rng.exponential(size=50)
    weighted = weights * losses
    eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
    expected = weighted.mean() + eta * weights.mean() - eta
    assert selection.dev(losses, weights=weights) == pytest.approx(expected, rel=1e-12)
    assert selection.dev(losses, weights=np.full(50, 2.0)) == pytest.approx(2 * losses.mean())
    assert selection.iwcv(losses, weights=weights) == pytest.approx(
        np.sum(weighted) / np.sum(weights)
    )
    assert selection.iwcv(losses, weights=weights, self_normalize=False) == pytest.approx(
        weighted.mean()
    )


def test_validators_reject_inconsistent_inputs() -> None:
    losses = np.ones(5)
    with pytest.raises(ValueError, match="source_losses: expected one loss per source sample"):
        selection.iwcv(losses, weights=np.ones(4))
    with pytest.raises(ValueError, match="weights=..."):
        selection.dev(losses)
    with pytest.raises(ValueError, match="not both"):
        selection.iwcv(losses, np.ones((5, 2)), np.ones((5, 2)), weights=np.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        selection.iwcv(losses, weights=-np.ones(5))
    with pytest.raises(ValueError, match="same feature dimension"):
        selection.iwcv(losses, np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="clip"):
        selection.importance_weights(np.ones((5, 2)), np.ones((5, 2)), clip=-1.0)
    with pytest.raises(ValueError, match="target_logits"):
        selection.snd(np.ones((1, 3)))
    with pytest.raises(ValueError, match="temperature"):
        selection.snd(np.ones((4, 3)), temperature=0.0)


def test_prediction_entropy_equals_scipy_entropy_of_the_softmax() -> None:
    logits = np.random.default_rng(0).normal(size=(30, 5)) * 3
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    expected = float(np.mean(scipy_entropy(probs, axis=1)))
    assert selection.prediction_entropy(logits) == pytest.approx(expected, rel=1e-10)
    assert selection.prediction_entropy(torch.from_numpy(logits).float()) == pytest.approx(
        expected, rel=1e-5
    )


def test_snd_equals_the_authors_formula_and_does_not_depend_on_chunking() -> None:
    logits = np.random.default_rng(0).normal(size=(37, 4)) * 2
    p = torch.nn.functional.normalize(torch.softmax(torch.from_numpy(logits).float(), 1))
    mat = p @ p.T / 0.05
    mat.masked_fill_(torch.eye(37, dtype=torch.bool), -1 / 0.05)
    q = torch.softmax(mat, 1)
    expected = float(-(q * torch.log(q + 1e-5)).sum(1).mean())
    assert selection.snd(logits) == pytest.approx(expected, rel=1e-5)
    assert selection.snd(logits, chunk_size=5) == pytest.approx(expected, rel=1e-5)


@given(
    losses=arrays(np.float64, (15,), elements=st.floats(0.0, 10.0)),
    weights=arrays(np.float64, (15,), elements=st.floats(0.01, 5.0)),
    scale=st.floats(0.1, 100.0),
)
def test_self_normalised_iwcv_ignores_the_scale_of_the_weights_and_stays_in_the_loss_range(
    losses: np.ndarray, weights: np.ndarray, scale: float
) -> None:
    estimate = selection.iwcv(losses, weights=weights)
    assert selection.iwcv(losses, weights=scale * weights) == pytest.approx(estimate, abs=1e-9)
    assert losses.min() - 1e-9 <= estimate <= losses.max() + 1e-9
