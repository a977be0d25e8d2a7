"""Feature extraction with real models: torchvision, timm, HF transformers, and real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import transferkit as tk
from transferkit.features import masked_mean


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- torchvision / timm


@pytest.mark.vision
def test_torchvision_resnet_layers_equal_create_feature_extractor() -> None:
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    layers = ["layer2", "layer4", "avgpool"]
    reference = create_feature_extractor(model, return_nodes=layers)
    with torch.no_grad(), tk.FeatureExtractor(model, layers, pool=None) as extractor:
        ours, theirs = extractor(x), reference(x)
    for name in layers:
        torch.testing.assert_close(ours[name], theirs[name])
    feats = tk.extract_features(model, x, layers="layer4", progress=False)
    np.testing.assert_allclose(feats, theirs["avgpool"].flatten(1).numpy(), rtol=1e-5, atol=1e-5)
    assert hook_count(model) == 0


@pytest.mark.vision
def test_timm_feature_info_names_match_features_only_and_forward_intermediates() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    features_only = timm.create_model(
        "resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3)
    ).eval()
    features_only.load_state_dict(model.state_dict(), strict=False)
    names = features_only.feature_info.module_name()  # ['layer1', 'layer2', 'layer3']
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = tk.FeatureExtractor(model, names, pool=None)(x)
        listed = features_only(x)
        intermediates = model.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for name, a, b in zip(names, listed, intermediates, strict=True):
        torch.testing.assert_close(ours[name], a)
        torch.testing.assert_close(ours[name], b)


@pytest.mark.vision
def test_timm_vit_blocks_give_tokens_pooled_as_cls_or_mean() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tk.FeatureExtractor(model, "blocks.3", pool=None)(x)
        (grid,) = model.forward_intermediates(x, indices=[3], intermediates_only=True)
        cls = tk.FeatureExtractor(model, "blocks.3", pool="token")(x)
        mean = tk.FeatureExtractor(model, "blocks.3", pool="avg")(x)
    n, d, h, w = grid.shape
    torch.testing.assert_close(tokens[:, 1:].transpose(1, 2).reshape(n, d, h, w), grid)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(mean, tokens.mean(1))


# --------------------------------------------------------------------------- HF transformers


def tiny_bert() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model: torch.nn.Module = transformers.BertModel(config).eval()
    return model


def test_hf_hooked_layers_equal_output_hidden_states() -> None:
    model = tiny_bert()
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    layers = ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        own_hooks = hook_count(model)  # transformers may add hooks of its own on first use
        ours = tk.FeatureExtractor(model, layers, pool=None)(input_ids=ids, attention_mask=mask)
        pooled = tk.FeatureExtractor(model)(input_ids=ids, attention_mask=mask)
    for name, expected in zip(layers, states, strict=True):
        torch.testing.assert_close(ours[name], expected)
    torch.testing.assert_close(pooled, masked_mean(states[-1], mask))
    assert hook_count(model) == own_hooks


def test_hf_mean_pooling_ignores_padding_in_extract_features() -> None:
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (6, 8), generator=generator)
    lengths = torch.tensor([8, 3, 5, 1, 7, 4])
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.arange(6) % 2
    batch = {"input_ids": ids, "attention_mask": mask}
    feats = tk.extract_features(model, batch, batch_size=4, progress=False)
    padded = {
        "input_ids": torch.cat([ids, torch.zeros(6, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([mask, torch.zeros(6, 5, dtype=torch.long)], 1),
    }
    again = tk.extract_features(model, padded, batch_size=3, progress=False)
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-5)
    rows = [
        dict(input_ids=i, attention_mask=m, labels=y)
        for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)  # type: ignore[arg-type]
    from_loader, got_labels = tk.extract_features(model, loader, progress=False)
    np.testing.assert_allclose(from_loader, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_labels, labels.numpy())


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_pretrained_features_beat_raw_pixels_and_random_init_on_few_shot_digits() -> None:
    task = tk.datasets.digits("noise", seed=0)
    tk.seed_everything(0)
    pretrained = tk.models.SmallCNN(num_classes=10, width=16, feature_dim=64)
    optimizer = torch.optim.Adam(pretrained.parameters(), lr=3e-3)
    loader = tk.datasets.make_loader(task.source_x, task.source_y, batch_size=64, seed=0)
    pretrained.train()
    for _ in range(2):  # a brief pretraining on the source domain
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(pretrained(xb), yb).backward()
            optimizer.step()
    tk.seed_everything(0)
    random_init = tk.models.SmallCNN(num_classes=10, width=16, feature_dim=64)
    x, y = task.few_shot(3, seed=0)

    def score(transform: object) -> float:
        assert callable(transform)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(transform(x), y.numpy())
        return float(clf.score(transform(task.target_test_x), task.target_test_y.numpy()))

    ours = score(lambda d: tk.extract_features(pretrained, d, layers="neck", progress=False))
    random_features = score(
        lambda d: tk.extract_features(random_init, d, layers="neck", progress=False)
    )
    raw = score(lambda d: d.reshape(len(d), -1).numpy())
    assert ours > raw + 0.03 and ours > random_features + 0.03, (ours, raw, random_features)
