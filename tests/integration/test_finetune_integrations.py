"""Freezing and heads on real architectures: torchvision, timm and Hugging Face (random init).

torchvision/timm tests are marked ``vision`` (run them in ``.venv-vision``); the Hugging Face
tests skip when ``transformers`` is not installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.freezing import FrozenBatchNorm

from ..freezing._helpers import snapshot


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


@pytest.mark.vision
def test_timm_batchnormact_model_keeps_its_output_under_domain_bn() -> None:
    # failed before the fix: with shared affine terms, BatchNormAct2d's scale and shift
    # were applied after its activation, so the converted network computed another function
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    with torch.no_grad():  # a "pretrained" model: affine terms and statistics not at init
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    tk.convert_domain_bn(model)
    torch.testing.assert_close(model(x), expected)
    tk.freeze(model, exclude="classifier", train_bn=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "bn1.weight" in trainable and "conv_stem.weight" not in trainable


# --------------------------------------------------------------- headless heads, train_bn


@pytest.mark.vision
@pytest.mark.parametrize(
    ("name", "kwargs", "head", "in_features"),
    [
        ("resnet18", {}, "fc", 512),
        ("mobilenetv3_small_050", {}, "classifier", 1024),  # head_hidden_size, not 288
        ("convnext_atto", {}, "head.fc", 320),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, "head", 192),
    ],
)
def test_timm_headless_models_get_a_head(
    name: str, kwargs: dict[str, object], head: str, in_features: int
) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    assert tk.find_head(model) == (head, model.get_submodule(head))
    assert isinstance(model.get_submodule(head), nn.Identity)
    new = tk.replace_head(model, 3)
    assert isinstance(new, nn.Linear) and (new.in_features, new.out_features) == (in_features, 3)
    assert model.get_submodule(head) is new and model.num_classes == 3
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.vision
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {"num_classes": 0, "global_pool": ""}),  # pooling disabled too
        ("convnext_atto", {"num_classes": 0, "global_pool": ""}),
        ("vit_tiny_patch16_224", {"num_classes": 0, "global_pool": "", "img_size": 32}),
        ("resnetv2_50x1_bit", {"num_classes": 10}),  # a 1x1-conv head
        ("resnetv2_50x1_bit", {"num_classes": 0}),
        ("deit_tiny_distilled_patch16_224", {"num_classes": 10, "img_size": 32}),  # two heads
        ("deit_tiny_distilled_patch16_224", {"num_classes": 0, "img_size": 32}),
    ],
)
def test_timm_head_layouts_give_logits_after_replace_head(
    name: str, kwargs: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """Used to fail: a Linear on unpooled maps/tokens, a Linear in place of BiT's conv head,
    DeiT's distillation head left at 10 classes, or 'did not give a head with 5 outputs'."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        head = tk.replace_head(model, 5)
    assert ("global_pool=''" in caplog.text) == (kwargs.get("global_pool") == "")
    assert model.num_classes == 5 and tk.find_head(model)[1] is head
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.vision
@pytest.mark.parametrize(
    ("library", "name", "kwargs"),
    [
        ("torchvision", "resnet18", {}),
        ("torchvision", "mobilenet_v3_small", {}),  # classifier.3 inside a Sequential
        ("timm", "convnext_atto", {}),  # head.fc
        ("timm", "deit_tiny_distilled_patch16_224", {"img_size": 32}),  # reset_classifier
        ("timm", "resnet18", {"num_classes": 0}),  # headless
    ],
)
def test_replace_head_keeps_an_eval_model_in_eval_mode_on_its_device_and_dtype(
    library: str, name: str, kwargs: dict[str, object]
) -> None:
    """Failed before the fix: the new head was left in training mode inside a model set to
    eval() (its dropout / BatchNorm would run in training mode at evaluation)."""
    torch.manual_seed(0)
    if library == "timm":
        model = pytest.importorskip("timm").create_model(name, pretrained=False, **kwargs)
    else:
        model = getattr(pytest.importorskip("torchvision.models"), name)(weights=None)
    model = model.double().eval()
    head = tk.replace_head(model, 5)
    assert not any(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert tk.find_head(model)[1] is head
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5) and torch.equal(out, model(x))
    model.train()
    given = tk.ClassifierHead(head.in_features, 4, pool=None).eval()
    new = tk.replace_head(model, given, name=tk.find_head(model)[0])
    assert new.training and all(m.training for m in new.modules())


@pytest.mark.vision
@pytest.mark.parametrize(
    ("name", "auxiliary"),
    [("googlenet", ["aux1.fc2", "aux2.fc2"]), ("inception_v3", ["AuxLogits.fc"])],
)
def test_torchvision_auxiliary_classifiers_are_named_and_replaceable(
    name: str, auxiliary: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    models = pytest.importorskip("torchvision.models")
    model = getattr(models, name)(weights=None, aux_logits=True, init_weights=False)
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        tk.replace_head(model, 5)
    assert f"{auxiliary} still give 1000 outputs, not 5" in caplog.text
    for aux in auxiliary:
        tk.replace_head(model, 5, name=aux)
    model.train()
    size = 299 if name == "inception_v3" else 64
    outputs = model(torch.randn(2, 3, size, size))
    assert all(out.shape == (2, 5) for out in outputs)


@pytest.mark.vision
def test_crossvit_branch_heads_are_reset_together() -> None:
    # failed before the fix: get_classifier() is an nn.ModuleList of one head per branch;
    # replace_head(model, 5) put one Linear in its place and forward() broke
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=10).eval()
    head = tk.replace_head(model, 5)
    assert model.head[0] is head and model.num_classes == 5
    assert [(h.out_features, h.training) for h in model.head] == [(5, False), (5, False)]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 240, 240)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"2 classifiers \['head.0', 'head.1'\]"):
        tk.replace_head(model, nn.Linear(96, 5))


@pytest.mark.vision
def test_a_module_for_one_of_deits_two_heads_needs_a_name() -> None:
    # failed before the fix: replace_head(deit, module) replaced "head" only, and every
    # prediction stayed the average of the new head and the old distillation head
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, img_size=32
    ).eval()
    with pytest.raises(ValueError, match=r"2 classifiers \['head', 'head_dist'\]"):
        tk.replace_head(model, tk.ClassifierHead(192, 5, hidden=(), pool=None))
    first = tk.replace_head(model, nn.Linear(192, 5), name="head")
    second = tk.replace_head(model, nn.Linear(192, 5), name="head_dist")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x), (first(tokens[:, 0]) + second(tokens[:, 1])) / 2)


@pytest.mark.vision
@pytest.mark.parametrize(
    ("factory", "head", "in_features"),
    [
        (lambda m: m.resnet18(weights=None), "fc", 512),
        (lambda m: m.mobilenet_v3_small(weights=None), "classifier.3", 1024),
        (
            lambda m: m.VisionTransformer(
                image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
            ),
            "heads.head",
            32,
        ),
    ],
)
def test_torchvision_identity_heads_are_replaced_in_place(
    factory: Callable[[object], nn.Module], head: str, in_features: int
) -> None:
    models = pytest.importorskip("torchvision.models")
    model = factory(models)
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    assert tk.find_head(model)[0] == head
    new = tk.replace_head(model, 5)
    assert isinstance(new, nn.Linear) and new.in_features == in_features
    assert model.get_submodule(head) is new
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.vision
def test_timm_train_bn_keeps_batchnormact_affine_training() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    tk.freeze(model, exclude="classifier*", bn="train", train_bn=True)
    bn_params = {
        f"{n}.{leaf}"
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for leaf, _ in m.named_parameters(recurse=False)
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert bn_params and trainable == bn_params | {"classifier.weight", "classifier.bias"}
    before = snapshot(model)
    optimizer = torch.optim.AdamW(tk.param_groups(model, 1e-2))
    train(model, optimizer, image_batch(3), cross_entropy, steps=2)
    after = snapshot(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    params_moved = {k[len("param:") :] for k in moved if k.startswith("param:")}
    assert params_moved <= trainable and params_moved & bn_params
    assert any("running_mean" in k for k in moved)  # bn="train": statistics adapt


@pytest.mark.vision
def test_linear_classifier_head_equals_timm_classifier_head() -> None:
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    theirs = layers.ClassifierHead(16, 4, pool_type="avg", drop_rate=0.0)
    ours = tk.ClassifierHead(16, 4, hidden=(), dropout=0.0)
    ours.fc.load_state_dict(theirs.fc.state_dict())
    x = torch.randn(3, 16, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


# --------------------------------------------------------------------------- one-cycle end to end


def torch_one_cycle_lr(peak: float, step: int, total: int) -> float:
    """torch's OneCycleLR defaults written out: cos, pct_start=0.3, div 25, final div 1e4."""
    start, end = peak / 25.0, peak / 25.0 / 1e4
    warm_end = 0.3 * total - 1

    def cos(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= warm_end:
        return cos(start, peak, step / warm_end)
    return cos(peak, end, (step - warm_end) / (total - 1 - warm_end))


def resnet18_headless(source: str) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        model: nn.Module = timm.create_model("resnet18", pretrained=False, num_classes=0)
    else:
        models = pytest.importorskip("torchvision.models")
        model = models.resnet18(weights=None)
        model.fc = nn.Identity()  # type: ignore[assignment]
    tk.replace_head(model, 3)
    return model


@pytest.mark.vision
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_resnet_gradual_unfreezing_under_one_cycle_end_to_end(source: str) -> None:
    """Head first, then layer4, layer3, the rest, under torch's OneCycleLR with layer-wise
    decay: loss finite, every group's lr on the one-cycle curve of its own peak at every
    step, frozen stages bit-identical (parameters and BatchNorm statistics) until their
    stage comes, and moving after."""
    model = resnet18_headless(source)
    tk.freeze(model, exclude="fc")
    optimizer = torch.optim.AdamW(tk.param_groups(model, 1e-3, weight_decay=0.02))
    total = 10
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total
    )
    stages: list[str | list[str]] = ["layer4", "layer3", ["layer2", "layer1", "conv1", "bn1"]]
    schedule = tk.GradualUnfreezing(
        model, stages, optimizer, every=2, layer_decay=0.5, scheduler=scheduler
    )
    prefixes = [("layer4.",), ("layer3.",), ("layer2.", "layer1.", "conv1.", "bn1.")]
    initial = snapshot(model)
    batch = image_batch(3)
    model.train()
    for step in range(total - 1):
        for group in optimizer.param_groups:
            expected = torch_one_cycle_lr(group["max_lr"], step, total)
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (step, group["name"])
        x, y = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        current = snapshot(model)
        for stage, stage_prefixes in enumerate(prefixes[schedule.stage :], schedule.stage):
            for key, value in current.items():
                if key.split(":", 1)[1].startswith(stage_prefixes):
                    assert torch.equal(value, initial[key]), (step, stage, key)
        scheduler.step()
        schedule.step()
    assert schedule.done and all(p.requires_grad for p in model.parameters())
    final = snapshot(model)
    for stage_prefixes in prefixes[:2]:
        assert any(
            not torch.equal(final[k], initial[k])
            for k in final
            if k.startswith("param:") and k[len("param:") :].startswith(stage_prefixes)
        )
    peaks = {g["name"]: g["max_lr"] for g in optimizer.param_groups}
    assert peaks["fc"] == pytest.approx(1e-3)
    assert peaks["stage 0: layer4.1"] == pytest.approx(1e-3 * 0.5)
    assert peaks["stage 0: layer4.0"] == pytest.approx(1e-3 * 0.5**2)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.0 if "no_decay" in group["name"] else 0.02)


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
