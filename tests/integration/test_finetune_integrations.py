"""Freezing and heads on real architectures: torchvision, timm and Hugging Face (random init).

torchvision/timm tests are marked ``vision`` (run them in ``.venv-vision``); the Hugging Face
tests skip when ``transformers`` is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.freezing import FrozenBatchNorm


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], tuple[object, torch.Tensor]],
    loss_fn: Callable[[nn.Module, object, torch.Tensor], torch.Tensor],
    steps: int,
) -> None:
    model.train()
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        loss_fn(model, x, y).backward()
        optimizer.step()


def image_batch(classes: int, size: int = 32) -> Callable[[int], tuple[object, torch.Tensor]]:
    def make(step: int) -> tuple[object, torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        return torch.randn(4, 3, size, size, generator=gen), torch.randint(0, classes, (4,))

    return make


def cross_entropy(model: nn.Module, x: object, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def check_frozen_backbone_never_moves(
    model: nn.Module,
    head_prefix: str,
    batch: Callable[[int], tuple[object, torch.Tensor]],
    loss_fn: Callable[[nn.Module, object, torch.Tensor], torch.Tensor] = cross_entropy,
    bn: str = "eval",
) -> None:
    tk.freeze(model, exclude=f"{head_prefix}*", bn=bn)  # type: ignore[arg-type]
    before = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    train(model, optimizer, batch, loss_fn, steps=3)
    after = snapshot(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "the head did not train"
    assert all(k.startswith(f"param:{head_prefix}") for k in moved), sorted(moved)[:5]


# --------------------------------------------------------------------------- torchvision


@pytest.mark.vision
def test_torchvision_resnet18_freeze_heads_groups() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=10)
    assert tk.find_head(model)[0] == "fc"
    head = tk.replace_head(model, 4)
    assert isinstance(head, nn.Linear) and head.in_features == 512
    check_frozen_backbone_never_moves(model, "fc", image_batch(4))
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    tk.unfreeze(model, include="layer4")
    groups = tk.param_groups(model, 1.0, layer_decay=0.5, weight_decay=1e-4)
    assert [g["name"] for g in groups] == [
        "layer4.0",
        "layer4.0 (no_decay)",
        "layer4.1",
        "layer4.1 (no_decay)",
        "fc",
        "fc (no_decay)",
    ]
    assert [g["lr"] for g in groups][::2] == [0.25, 0.5, 1.0]
    assert "layer4.0" in tk.trainable_summary(model)


@pytest.mark.vision
def test_torchvision_resnet18_frozen_bn_and_gradual_unfreezing() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=3)
    check_frozen_backbone_never_moves(model, "fc", image_batch(3), bn="frozen")
    assert sum(isinstance(m, FrozenBatchNorm) for m in model.modules()) == 20
    tk.unfreeze(model)
    assert not any(isinstance(m, FrozenBatchNorm) for m in model.modules())
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.01, momentum=0.9)
    stages = ["layer4", "layer3", "layer2", ["layer1", "conv1", "bn1"]]
    schedule = tk.GradualUnfreezing(model, stages, optimizer, bn="frozen")
    for _ in range(4):
        schedule.step()
    assert all(p.requires_grad for p in model.parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    train(model, optimizer, image_batch(3), cross_entropy, steps=1)


@pytest.mark.vision
@pytest.mark.parametrize(
    ("factory", "expected", "in_features"),
    [
        (lambda m: m.mobilenet_v3_small(weights=None), "classifier.3", 1024),
        (
            lambda m: m.VisionTransformer(
                image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
            ),
            "heads.head",
            32,
        ),
    ],
)
def test_torchvision_find_and_replace_head(
    factory: Callable[[object], nn.Module], expected: str, in_features: int
) -> None:
    models = pytest.importorskip("torchvision.models")
    model = factory(models)
    assert tk.find_head(model)[0] == expected
    head = tk.replace_head(model, 5)
    assert head.in_features == in_features
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# --------------------------------------------------------------------------- timm


@pytest.mark.vision
@pytest.mark.parametrize(
    ("name", "kwargs", "head"),
    [
        ("resnet18", {}, "fc"),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, "head"),
        ("convnext_atto", {}, "head.fc"),
    ],
)
def test_timm_models_freeze_and_replace_head(
    name: str, kwargs: dict[str, object], head: str
) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    assert tk.find_head(model)[0] == head
    tk.replace_head(model, 3)
    assert model.num_classes == 3
    check_frozen_backbone_never_moves(model, head, image_batch(3))
    assert all(g["name"].startswith(head) for g in tk.param_groups(model, 1.0))
    tk.unfreeze(model)
    groups = tk.param_groups(model, 1.0, layer_decay=0.8)
    assert groups[-1]["name"].startswith(head) and groups[-1]["lr"] == 1.0
    assert min(g["lr"] for g in groups) < 0.8**3


@pytest.mark.vision
def test_timm_vit_layer_decay_per_block() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=32, patch_size=8, depth=3
    )
    groups = tk.param_groups(model, 1.0, layer_decay=0.5)
    decayed = [(g["name"], g["lr"]) for g in groups if "no_decay" not in g["name"]]
    assert decayed == [
        ("patch_embed", 0.5**5),
        ("blocks.0", 0.5**4),
        ("blocks.1", 0.5**3),
        ("blocks.2", 0.5**2),
        ("head", 1.0),
    ]
    no_decay = {g["name"]: g["lr"] for g in groups if "no_decay" in g["name"]}
    assert no_decay["(root) (no_decay)"] == 0.5**6  # cls_token / pos_embed: lowest
    assert no_decay["norm (no_decay)"] == 0.5
    frozen = tk.freeze(model, until="blocks.1")
    assert frozen[:2] == ["cls_token", "pos_embed"] and "blocks.2.norm1.weight" not in frozen


@pytest.mark.vision
def test_timm_batchnormact_frozen_policy_keeps_statistics(caplog: pytest.LogCaptureFixture) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    with caplog.at_level(logging.WARNING, logger="transferkit.freezing"):
        check_frozen_backbone_never_moves(model, "classifier", image_batch(3), bn="frozen")
    assert "BatchNorm subclass" in caplog.text


# --------------------------------------------------------------------------- Hugging Face


def tiny_bert_config(transformers: object, **extra: object) -> object:
    return transformers.BertConfig(  # type: ignore[attr-defined]
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **extra,
    )


def token_batch(classes: int) -> Callable[[int], tuple[object, torch.Tensor]]:
    def make(step: int) -> tuple[object, torch.Tensor]:
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 64, (4, 10), generator=gen)
        return {"input_ids": ids}, torch.randint(0, classes, (4,), generator=gen)

    return make


def hf_loss(model: nn.Module, x: object, y: torch.Tensor) -> torch.Tensor:
    out = model(**x, labels=y)  # type: ignore[operator]
    loss: torch.Tensor = out.loss
    return loss


def test_hf_bert_classifier_freeze_replace_and_layer_decay() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(transformers, num_labels=3))
    assert tk.find_head(model)[0] == "classifier"
    tk.replace_head(model, 5)
    assert model.num_labels == 5 and model.config.num_labels == 5
    check_frozen_backbone_never_moves(model, "classifier", token_batch(5), hf_loss)
    tk.unfreeze(model)
    groups = tk.param_groups(model, 1.0, layer_decay=0.5, weight_decay=0.01)
    names = [g["name"] for g in groups if "no_decay" not in g["name"]]
    assert names == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.pooler",
        "classifier",
    ]
    lookup = dict(model.named_parameters())
    for group in groups:
        ids = {id(p) for p in group["params"]}
        names_in = [n for n, p in lookup.items() if id(p) in ids]
        if group["weight_decay"] == 0.0:
            assert all(n.endswith("bias") or "LayerNorm" in n for n in names_in)


def test_hf_roberta_style_head_replaced_by_token_pooling_head() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=2,
    )
    model = transformers.RobertaForSequenceClassification(config)
    name, old = tk.find_head(model)
    assert name == "classifier" and type(old).__name__ == "RobertaClassificationHead"
    tk.replace_head(model, tk.ClassifierHead(16, 4, hidden=(8,), pool="token"))
    assert model.num_labels == 4
    ids = torch.randint(3, 64, (3, 7))
    assert model(input_ids=ids).logits.shape == (3, 4)


def test_hf_gpt2_score_head_found() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=2
    )
    model = transformers.GPT2ForSequenceClassification(config)
    assert tk.find_head(model)[0] == "score"
    head = tk.replace_head(model, 3)
    assert head.in_features == 16 and model.config.num_labels == 3
