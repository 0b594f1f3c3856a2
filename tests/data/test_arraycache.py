"""data.cache: a folder decoded once into a memory-mapped uint8 array, trusted only when complete."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from PIL import Image

import selfsight.data.folder as folder_mod
from selfsight.data import arraycache
from selfsight.data.arraycache import build_cache, cached_folder, open_cache
from selfsight.data.folder import ImageFolder
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config


@pytest.fixture
def folder(tmp_path, fmnist_small) -> Path:
    root = tmp_path / "images"
    for i in range(96):
        d = root / f"c{int(fmnist_small.labels[i]) % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(fmnist_small.images[i, 0].numpy()).resize((40, 32))   # not square, not 28 px
        img.save(d / f"{i:03d}.png")
    (root / "c0" / "broken.png").write_bytes(b"\x00not a png" * 8)
    return root


def test_built_once_then_memory_mapped_without_decoding(folder, tmp_path, monkeypatch):
    ds = ImageFolder(folder, cache_dir=tmp_path / "c")
    built = cached_folder(ds, 24, 3, cache_dir=str(tmp_path / "c"), workers=0, progress=False)
    assert built.images.shape == (96, 3, 24, 24) and built.skipped == 1
    assert built.classes == ds.classes and sorted(set(built.labels.tolist())) == [0, 1, 2]
    # pixel for pixel: the centre square of each image at 24 px
    i = 5
    want = torch.from_numpy(np.array(arraycache.square(ds.read(i).convert("RGB"), 24))).permute(2, 0, 1)
    k = i - sum(1 for j in range(i) if ds.samples[j][0].endswith("broken.png"))
    assert torch.equal(built.images[k], want)
    assert os.path.getsize(built.cache_file) == 96 * 3 * 24 * 24

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")
    monkeypatch.setattr(folder_mod, "load_image", no_decoding)
    again = cached_folder(ImageFolder(folder, cache_dir=tmp_path / "c"), 24, 3, cache_dir=str(tmp_path / "c"))
    assert torch.equal(again.images, built.images) and torch.equal(again.labels, built.labels)
    maps = Path("/proc/self/maps")
    if maps.exists():                                   # backed by the file, not read into memory
        assert again.cache_file in maps.read_text()
    assert open_cache(ds, 32, 3, str(tmp_path / "c")) is None      # another size is another cache


def test_a_killed_or_partial_build_is_never_trusted(folder, tmp_path, monkeypatch):
    ds = ImageFolder(folder, cache_dir=tmp_path / "c")
    calls = {"n": 0}
    real = arraycache._Squares.__getitem__

    def dies(self, i):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt                     # the run is stopped in the middle of the build
        return real(self, i)
    monkeypatch.setattr(arraycache._Squares, "__getitem__", dies)
    with pytest.raises(KeyboardInterrupt):
        build_cache(ds, 24, 3, str(tmp_path / "c"), workers=0, progress=False)
    assert list((tmp_path / "c" / "arrays").iterdir()) == []          # no half file left behind
    monkeypatch.setattr(arraycache._Squares, "__getitem__", real)
    good = build_cache(ds, 24, 3, str(tmp_path / "c"), workers=0, progress=False)
    # a truncated array (a kill between the two renames of an older build, a disk error) is refused
    with open(good.cache_file, "r+b") as f:
        f.truncate(1000)
    assert open_cache(ds, 24, 3, str(tmp_path / "c")) is None


def test_a_changed_folder_gets_a_new_cache_and_training_uses_the_batched_path(folder, tmp_path, fmnist_small):
    over = tiny_overrides(**{"data.train": str(folder), "data.cache": "true", "data.workers": 0, "train.steps": 2,
                             "views.size": 16, "train.log_every": 1, "train.threads": 1})
    assert pretrain(load_config(overrides=over), tmp_path / "run1")["steps"] == 2
    arrays = tmp_path / "selfsight-cache" / "arrays"
    assert len(list(arrays.glob("*.u8"))) == 1
    Image.fromarray(fmnist_small.images[200, 0].numpy()).save(folder / "c1" / "new.png")
    os.utime(folder / "c1", (0, 0))                     # the index notices the changed class folder
    assert pretrain(load_config(overrides=over), tmp_path / "run2")["steps"] == 2
    assert len(list(arrays.glob("*.u8"))) == 2
    meta = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert len(meta) == 2
    # the broken file the cache left out is counted once, in the session's first row
    assert [row["skipped_files"] for row in meta] == [1, 0]
