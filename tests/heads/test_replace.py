"""replace_head: sizes, class counts, device/dtype, headless models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import transferkit as tk
from tests.heads._models import HFLike, TimmLike, vgg_like, vit_like


@pytest.mark.parametrize(
    ("factory", "in_features"),
    [(vgg_like, 8), (vit_like, 8), (TimmLike, 8), (HFLike, 8), (tk.models.SmallCNN, 128)],
)
def test_replace_head_infers_in_features(factory: object, in_features: int) -> None:
    model = factory()  # type: ignore[operator]
    name, _ = tk.find_head(model)
    new = tk.replace_head(model, 7)
    assert isinstance(new, nn.Linear) and new.in_features == in_features and new.out_features == 7
    assert model.get_submodule(name) is new


def test_replace_head_updates_class_counts_of_timm_and_hf_models() -> None:
    timm_like = TimmLike()
    tk.replace_head(timm_like, 6)
    assert timm_like.num_classes == 6
    hf_like = HFLike()
    tk.replace_head(hf_like, tk.ClassifierHead(8, 4, hidden=()))
    assert hf_like.num_labels == 4 and hf_like.config.num_labels == 4


def test_replace_head_with_module_device_dtype_and_name() -> None:
    model = tk.models.SmallCNN(num_classes=3).double()
    head = tk.replace_head(model, tk.ClassifierHead(128, 5, hidden=(16,), pool=None))
    assert next(head.parameters()).dtype == torch.float64
    assert model(torch.zeros(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 5)
    neck = tk.replace_head(model, 9, name="neck.1")
    assert isinstance(neck, nn.Linear) and model.neck[1] is neck and neck.in_features == 1024
    with pytest.raises(ValueError, match=r"name: 'nek' is not a module.*'neck'"):
        tk.replace_head(model, 3, name="nek")


def test_replace_head_rejects_mismatched_or_bad_heads() -> None:
    model = tk.models.SmallCNN()
    with pytest.raises(ValueError, match="takes 64 features but 'fc' receives 128"):
        tk.replace_head(model, nn.Linear(64, 3))
    with pytest.raises(TypeError, match="head_or_num_classes"):
        tk.replace_head(model, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_or_num_classes"):
        tk.replace_head(model, 0)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10  # untouched


class HeadlessTimmLike(nn.Module):
    """timm's contract for ``num_classes=0``: an identity classifier, ``num_features``,
    ``head_hidden_size`` (the classifier's input, after a pre-logits layer) and
    ``reset_classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.conv_head = nn.Linear(6, 10)  # pre-logits: 6 -> 10
        self.num_features = 6
        self.head_hidden_size = 10
        self.num_classes = 0
        self.classifier: nn.Module = nn.Identity()
        self.resets = 0

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.resets += 1
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.head_hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.conv_head(self.stem(x).mean((2, 3))))
        return out


def headless_small_cnn() -> nn.Module:
    net = tk.models.SmallCNN(width=4, feature_dim=24)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def headless_vgg_like() -> nn.Module:
    model = vgg_like()
    model.classifier[3] = nn.Identity()
    return model


def headless_vit_like() -> nn.Module:
    model = vit_like()
    model.heads.head = nn.Identity()
    return model


@pytest.mark.parametrize(
    ("factory", "name", "in_features"),
    [
        (headless_small_cnn, "fc", 24),
        (headless_vgg_like, "classifier.3", 8),
        (headless_vit_like, "heads.head", 8),
    ],
)
def test_replace_head_on_headless_models_sizes_head_from_the_layer_before(
    factory: object, name: str, in_features: int
) -> None:
    """torchvision-style ``model.fc = nn.Identity()``: the head used to be unreplaceable
    (or, in a Sequential, the hidden Linear before the identity was replaced)."""
    model = factory()  # type: ignore[operator]
    assert tk.find_head(model)[0] == name
    head = tk.replace_head(model, 3)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (in_features, 3)
    assert model.get_submodule(name) is head


def test_replace_head_on_headless_small_cnn_gives_working_model_in_its_dtype() -> None:
    model = headless_small_cnn().double()
    head = tk.replace_head(model, 5)
    assert head.weight.dtype == torch.float64
    assert model(torch.zeros(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 5)
    with pytest.raises(ValueError, match="takes 7 features but 'fc' receives 24"):
        tk.replace_head(headless_small_cnn(), nn.Linear(7, 2))


def test_replace_head_on_headless_timm_model_uses_reset_classifier() -> None:
    model = HeadlessTimmLike().double()
    head = tk.replace_head(model, 4)
    assert model.resets == 1 and model.classifier is head and model.num_classes == 4
    assert isinstance(head, nn.Linear) and head.in_features == 10  # head_hidden_size
    assert head.weight.dtype == torch.float64
    assert model(torch.zeros(2, 3, 5, 5, dtype=torch.float64)).shape == (2, 4)
    # a given module is checked against the classifier's input size
    custom = tk.replace_head(HeadlessTimmLike(), tk.ClassifierHead(10, 2, hidden=(), pool=None))
    assert isinstance(custom, tk.ClassifierHead)
    with pytest.raises(ValueError, match="receives 10"):
        tk.replace_head(HeadlessTimmLike(), nn.Linear(6, 2))


def test_replace_head_on_headless_model_without_sizes_raises_clearly() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    with pytest.raises(ValueError, match=r"'1' is an identity \(a headless model\)"):
        tk.replace_head(model, 3)


def test_replace_head_on_a_domain_bn_model_warns_about_a_shared_batchnorm_head(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # failed before the fix: the head's BatchNorm1d silently mixed both domains' statistics
    net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10))
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        tk.replace_head(net, 3)  # no BatchNorm in a Linear head
    assert caplog.text == ""
    head = tk.ClassifierHead(128, 5, hidden=(32,), norm="batch", pool=None)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        tk.replace_head(net, head)
    assert "convert_domain_bn" in caplog.text
    tk.convert_domain_bn(net)  # the advice works: the head's layer becomes domain-specific
    assert isinstance(net.fc.hidden[1], tk.DomainSpecificBatchNorm)
    tk.freeze(net, exclude="fc")
    recipe = tk.recipe("dann")
    optimizer = recipe.optimizer(recipe.param_groups(net))
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in net.fc.parameters()}
    net.train()
    source = net.fc.hidden[1].norms["source"].running_mean.clone()
    with tk.bn_domain(net, "target"):
        net(torch.randn(8, 1, 16, 16))
    assert torch.equal(net.fc.hidden[1].norms["source"].running_mean, source)


@pytest.mark.parametrize("training", [False, True])
def test_new_head_takes_the_training_mode_of_the_old_one(training: bool) -> None:
    # failed before the fix: a fresh head stayed in training mode inside a model set to
    # eval(), so its dropout made "evaluation" logits random
    torch.manual_seed(0)
    model = tk.models.SmallCNN(num_classes=3).train(training)
    head = tk.replace_head(model, tk.ClassifierHead(128, 5, hidden=(16,), pool=None))
    assert head.training is training and all(m.training is training for m in head.modules())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) is not training  # dropout 0.5 only in training
    # a given head in eval mode joins a model being trained: it trains too
    model = tk.models.SmallCNN(num_classes=3).train()
    head = tk.replace_head(model, tk.ClassifierHead(128, 5, pool=None).eval())
    assert head.training
    # the timm path (reset_classifier) too
    timm_like = HeadlessTimmLike().eval()
    assert not tk.replace_head(timm_like, 4).training


class AliasedHead(nn.Module):
    """The classifier registered twice: ``self.fc`` is ``self.classifier[-1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(8, 3))
        self.fc = self.classifier[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.body(x))
        return out


@pytest.mark.parametrize("new", [3, 5, "module"])
def test_a_head_registered_under_two_names_is_replaced_under_both(
    new: object, caplog: pytest.LogCaptureFixture
) -> None:
    # failed before the fix: only model.fc was replaced and forward() kept using the old
    # head through model.classifier[1] (same class count: no error, an untrained copy)
    torch.manual_seed(0)
    model = AliasedHead()
    old = model.fc
    given = nn.Linear(8, 4) if new == "module" else new
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        head = tk.replace_head(model, given)  # type: ignore[arg-type]
    assert "registered under 2 names ['classifier.1', 'fc']" in caplog.text
    assert model.fc is head and model.classifier[1] is head
    assert all(m is not old for m in model.modules())
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), head(torch.relu(model.body(x))))
    # an identity shared with another layer is left there (it stands in for that layer too)
    shared = nn.Identity()
    net = nn.Module()
    net.body = nn.Linear(4, 8)
    net.neck = shared
    net.fc = shared
    tk.replace_head(net, 2)
    assert isinstance(net.fc, nn.Linear) and net.neck is shared


class WithAuxiliaryHead(nn.Module):
    """Inception's layout: ``AuxLogits.fc`` (used in training) defined before ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.AuxLogits = nn.Module()
        self.AuxLogits.conv = nn.Linear(8, 6)
        self.AuxLogits.fc = nn.Linear(6, 10)
        self.fc = nn.Linear(8, 10)


def test_auxiliary_classifiers_left_at_the_old_class_count_are_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # before: replace_head(inception, 5) silently left AuxLogits.fc with 1000 outputs, and
    # an auxiliary loss on 5 classes trained it as a 1000-way classifier
    model = WithAuxiliaryHead()
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        head = tk.replace_head(model, 5)
    assert model.fc is head and "['AuxLogits.fc'] still give 10 outputs, not 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        tk.replace_head(model, 5, name="AuxLogits.fc")
        tk.replace_head(model, 5)  # same class count: nothing to say
    assert caplog.text == ""
    assert model.AuxLogits.fc.out_features == 5 and model.AuxLogits.fc.in_features == 6


def test_lazy_heads_are_sized_by_their_first_input_not_as_zero() -> None:
    # failed before the fix: an nn.LazyLinear head that had not run yet reported
    # in_features = 0, so replace_head(model, 5) built Linear(0, 5) (shape error in forward)
    # and a given nn.LazyLinear(5) was refused as taking "0 features"
    x = torch.randn(2, 4, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(3)).double().eval()
    head = tk.replace_head(model, 5)
    assert isinstance(head, nn.LazyLinear) and not head.training
    assert model(x).shape == (2, 5) and (head.in_features, head.weight.dtype) == (8, torch.float64)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    head = tk.replace_head(model, nn.LazyLinear(5))
    assert model(x).shape == (2, 5) and head.in_features == 8 and model[2] is head
    # a sized head is still checked
    with pytest.raises(ValueError, match="takes 7 features but '2' receives 8"):
        tk.replace_head(model, nn.Linear(7, 2))
