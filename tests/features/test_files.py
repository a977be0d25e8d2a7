"""The cache folder's own file names: nothing outside it is touched (features/_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import transferkit as tk
from tests.features._helpers import cache_once, images, point_header_at, small_cnn


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder", "dotdot-inside", "dot"])
@pytest.mark.parametrize("model", ["same", "changed"])
def test_a_header_naming_a_file_outside_the_cache_is_refused_and_never_touched(
    tmp_path: Path, kind: str, model: str
) -> None:
    folder = tmp_path / "cache"
    net, x, _ = cache_once(folder)
    victim = tmp_path / "victim.npy"  # what an attacker or a bug points the header at
    np.save(victim, np.arange(5.0))
    before = victim.read_bytes()
    (folder / "sub").mkdir()
    name = {
        "parent": "../victim.npy",
        "absolute": str(victim),
        "subfolder": "sub/features_0.npy",
        "dotdot-inside": "features_0.npy/../../victim.npy",
        "dot": ".",
    }[kind]
    point_header_at(folder, name)
    if model == "changed":  # a changed model makes the cache delete the old files
        with torch.no_grad():
            net.fc.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"cache: .*plain file name.*Refusing to touch it"):
        tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    assert victim.read_bytes() == before
    assert (folder / "features_0.npy").exists()  # nothing deleted either


@pytest.mark.parametrize("state", ["complete", "interrupted", "changed-model"])
def test_a_symbolic_link_in_the_cache_is_never_followed(tmp_path: Path, state: str) -> None:
    folder = tmp_path / "cache"
    net, x, _ = cache_once(folder)
    victim = tmp_path / "victim.npy"  # a valid copy, so following the link would "work"
    (folder / "features_0.npy").rename(victim)
    (folder / "features_0.npy").symlink_to(victim)
    if state == "interrupted":  # a resume would write through the link
        header = json.loads((folder / "header.json").read_text())
        header["complete"], header["chunks"] = False, header["chunks"][:1]
        (folder / "header.json").write_text(json.dumps(header))
    if state == "changed-model":
        with torch.no_grad():
            net.fc.weight.add_(1.0)
    before = victim.read_bytes()
    with pytest.raises(ValueError, match=r"symbolic link.*never follows links"):
        tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    assert victim.read_bytes() == before and (folder / "features_0.npy").is_symlink()


def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path: Path) -> None:
    ours = [".features_0.npy.4242.tmp", ".header.json.17.tmp", ".labels.npy.99.tmp"]
    ours += [".features_0.npy.4242.3.tmp", ".header.json.17.0.tmp"]  # the atomic writer's
    others = ["notes.tmp", ".other.1.tmp", "features_0.npy.bak", ".features_0.npy.x.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    cache_once(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".lock", "features_0.npy", "header.json", *others])


@pytest.mark.parametrize("found", ["labels.npy", "features_0.npy", "header.json"])
def test_a_folder_holding_other_files_of_those_names_is_left_alone(
    tmp_path: Path, found: str
) -> None:
    mine = tmp_path / found
    if found == "header.json":
        mine.write_text('{"project": "mine"}')
    else:
        np.save(mine, np.arange(5))
    before = mine.read_bytes()
    data = TensorDataset(images(10), torch.arange(10))
    with pytest.raises(ValueError, match="is not part of a transferkit feature cache"):
        tk.extract_features(small_cnn(), data, layers="neck", cache=tmp_path, progress=False)
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", found])
