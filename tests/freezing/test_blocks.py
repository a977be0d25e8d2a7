"""How models are cut into blocks: trainable_summary and the blocks of param_groups."""

from __future__ import annotations

from torch import nn

import transferkit as tk
from tests.freezing._helpers import make_net


def test_trainable_summary_counts_match_parameters() -> None:
    net = make_net()
    tk.freeze(net, exclude="fc", bn="eval")
    table = tk.trainable_summary(net)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.fc.parameters())
    last_rows = table.splitlines()[-2:]
    assert last_rows[0].split()[1:] == [f"{total:,}", f"{trainable:,}"]
    assert last_rows[1] == f"trainable share: {100 * trainable / total:.1f}%"
    bn_row = next(line for line in table.splitlines() if line.startswith("features.1 "))
    assert bn_row.split()[-1] == "eval"
    tk.unfreeze(net)
    tk.freeze(net, include="features.5", bn="frozen")
    assert "frozen" in tk.trainable_summary(net)


def test_param_groups_splits_repeated_blocks_of_a_transformer_like_model() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Embedding(5, 8)
            self.encoder = Encoder()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = Backbone()
            self.classifier = nn.Linear(8, 2)

    groups = tk.param_groups(Model(), 1.0, layer_decay=0.5, no_decay=())
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("bert.embeddings", 0.5**4),
        ("bert.encoder.layer.0", 0.5**3),
        ("bert.encoder.layer.1", 0.5**2),
        ("bert.encoder.layer.2", 0.5),
        ("classifier", 1.0),
    ]
