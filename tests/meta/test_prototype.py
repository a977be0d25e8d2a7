"""prototype_init: a nearest-prototype linear layer, on heads and real few-shot data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid
from torch import nn

import transferkit as tk
from transferkit.meta import prototype_init


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_init_linear_layer_is_a_nearest_prototype_classifier(metric: str) -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 6)) * 2
    labels = np.repeat(np.arange(4), 5)
    support = means[labels] + rng.normal(size=(20, 6))
    queries = rng.normal(size=(200, 6)) * 2
    layer = nn.Linear(6, 4)
    prototype_init(
        layer, torch.tensor(support, dtype=torch.float32), torch.tensor(labels), metric=metric
    )  # type: ignore[arg-type]
    predicted = layer(torch.tensor(queries, dtype=torch.float32)).argmax(1).numpy()
    if metric == "euclidean":
        expected = NearestCentroid().fit(support, labels).predict(queries)
    else:
        centroids = np.stack([support[labels == c].mean(0) for c in range(4)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        normed = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        expected = (normed @ centroids.T).argmax(1)
    assert (predicted == expected).mean() >= 0.99


def test_prototype_init_on_a_classifier_head_uses_its_hidden_features() -> None:
    torch.manual_seed(0)
    head = tk.ClassifierHead(16, 3, hidden=(32,), dropout=0.5)
    head.train()
    x = torch.randn(30, 16)
    y = torch.arange(30) % 3
    prototype_init(head, x, y, metric="euclidean")
    assert head.training  # mode restored
    head.eval()
    with torch.no_grad():
        hidden = head.hidden(head.pool(x)).numpy()
        predicted = head(x).argmax(1).numpy()
    expected = NearestCentroid().fit(hidden, y.numpy()).predict(hidden)
    np.testing.assert_array_equal(predicted, expected)


def test_prototype_init_gives_a_useful_few_shot_head_on_digits() -> None:
    task = tk.datasets.digits("noise", size=8, seed=0).flat()
    shots_x, shots_y = task.few_shot(3, seed=0)
    torch.manual_seed(0)
    head = tk.ClassifierHead(64, 10, hidden=(), dropout=0.0)
    random_acc = float((head(task.target_test_x).argmax(1) == task.target_test_y).float().mean())
    prototype_init(head, shots_x, shots_y)
    proto_acc = float((head(task.target_test_x).argmax(1) == task.target_test_y).float().mean())
    assert proto_acc > 0.7 > 0.3 > random_acc


def test_prototype_init_rejects_missing_classes_and_modules_without_linear() -> None:
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        prototype_init(nn.Linear(4, 3), x, torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="head: expected an nn.Linear"):
        prototype_init(nn.ReLU(), x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: expected class indices"):
        prototype_init(nn.Linear(4, 2), x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="metric"):
        prototype_init(nn.Linear(4, 2), x, torch.arange(6) % 2, metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        prototype_init(nn.Linear(4, 2), x, torch.arange(6) % 2, scale=0.0)


def test_prototype_init_names_features_when_the_head_cannot_take_them() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"features: head Linear cannot take features of shape"):
        prototype_init(nn.Linear(3, 2), torch.randn(4, 5), labels)
    head = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"features: head Sequential cannot take"):
        prototype_init(head, torch.randn(4, 4), labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_prototype_init_takes_features_in_another_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    features, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = prototype_init(nn.Linear(3, 3), features.to(dtype).float(), labels)
    got = prototype_init(nn.Linear(3, 3), features.to(dtype), labels)
    torch.testing.assert_close(got.weight, expected.weight)
    torch.testing.assert_close(got.bias, expected.bias)
