"""Small stand-ins for timm, Hugging Face and torchvision head layouts."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

from torch import nn


class TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(8)
        self.head.fc = nn.Linear(8, 3)
        self.num_classes = 3

    def get_classifier(self) -> nn.Module:
        return self.head.fc


class HFLike(nn.Module):
    def __init__(self, attribute: str = "classifier") -> None:
        super().__init__()
        self.bert = nn.Linear(4, 8)
        setattr(self, attribute, nn.Linear(8, 2))
        self.num_labels = 2
        self.config = SimpleNamespace(num_labels=2)


def vgg_like() -> nn.Module:
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 5))
    return model


def vit_like() -> nn.Module:
    model = nn.Module()
    model.encoder = nn.Linear(4, 8)
    model.heads = nn.Sequential(OrderedDict(head=nn.Linear(8, 5)))
    return model
