"""Tar shards: made by `selfsight shards make`, streamed by workers, every image once per epoch."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import tiny_overrides
from selfsight.augment import ViewRecipe
from selfsight.data import ArrayDataset, build_dataset
from selfsight.data.loader import ViewLoader
from selfsight.data.shards import ShardDataset, expand_shards, is_shard_spec, split_key, write_shards

CPU = torch.device("cpu")
RECIPE = ViewRecipe(size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def numbered(fmnist_small, tmp_path_factory) -> Path:
    """320 real Fashion-MNIST images in 8 shards of 40, each labeled with its own index (to count sightings)."""
    out = tmp_path_factory.mktemp("numbered")
    write_shards(ArrayDataset(fmnist_small.images[:320].clone(), torch.arange(320)), str(out), 40)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # small tensors: a second thread only adds contention on a busy CPU
    yield
    torch.set_num_threads(threads)


def _labels(loader: ViewLoader, epoch: int, start: int = 0) -> list[int]:
    return [y for b in loader.epoch(epoch, start) for y in b["label"].tolist()]


def test_cli_makes_shards_from_a_folder_and_pretrain_runs_on_them(tmp_path, fmnist_small):
    folder = tmp_path / "images"
    for i in range(300):
        d = folder / f"class{int(fmnist_small.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(d / f"{i:04d}.png")
    out = tmp_path / "shards"
    made = subprocess.run([sys.executable, "-m", "selfsight", "shards", "make", str(folder), str(out),
                           "--shard-size", "64"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout.splitlines()[-1])["images"] == 300
    meta = json.loads((out / "shards.json").read_text())
    assert meta["__len__"] == 300 and len(meta["shards"]) == 5 and len(meta["classes"]) == 10
    spec = str(out / "shard-{000000..000004}.tar")
    run = subprocess.run([sys.executable, "-m", "selfsight", "pretrain", "--method", "simclr", "--data", spec,
                          "--steps", "3", "--out", str(tmp_path / "run"),
                          *tiny_overrides(**{"views.size": 16, "data.workers": 2, "train.log_every": 1,
                                             "train.threads": 1})],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1])["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)


def test_every_image_once_per_epoch_across_two_workers_reproducibly(numbered):
    loader = ViewLoader(build_dataset(str(numbered)), RECIPE, 32, CPU, seed=5, workers=2, device_augment="on")
    assert loader.mode == "hybrid" and loader.steps_per_epoch == 10
    first = _labels(loader, 0)
    assert sorted(first) == list(range(320))                   # every image once
    again = ViewLoader(build_dataset(str(numbered / "shard-*.tar")), RECIPE, 32, CPU, seed=5, workers=2, device_augment="on")
    assert _labels(again, 0) == first                          # same seed, same order
    second = _labels(loader, 1)
    assert sorted(second) == list(range(320)) and second != first   # reshuffled per epoch


def test_shuffle_buffer_sets_how_far_samples_move_within_shards(numbered):
    def labels(buffer):
        data = build_dataset(str(numbered), shuffle_buffer=buffer)
        assert data.shuffle_buffer == buffer
        return _labels(ViewLoader(data, RECIPE, 32, CPU, seed=3, workers=0, device_augment="on"), 0)
    in_order = labels(0)
    assert sorted(in_order) == list(range(320))
    blocks = [in_order[i:i + 40] for i in range(0, 320, 40)]          # shards permuted, each read in file order
    assert all(b == list(range(b[0], b[0] + 40)) and b[0] % 40 == 0 for b in blocks)
    assert [b[0] for b in blocks] != list(range(0, 320, 40))
    mixed = labels(16)
    assert sorted(mixed) == list(range(320)) and mixed != in_order
    # a sample moves at most a buffer's length ahead of its read position
    read_at = {y: i for i, y in enumerate(y for b in blocks for y in b)}
    assert all(i >= read_at[y] - 16 for i, y in enumerate(mixed))


def test_two_ranks_split_the_shards_and_resume_mid_epoch_exactly(numbered):
    ranks = [ViewLoader(ShardDataset(str(numbered)), RECIPE, 32, CPU, rank=r, world=2, seed=1, workers=0, device_augment="on")
             for r in (0, 1)]
    seen = [_labels(loader, 0) for loader in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(320)) and not set(seen[0]) & set(seen[1])
    full = ViewLoader(ShardDataset(str(numbered)), RECIPE, 32, CPU, seed=2, workers=0, device_augment="on")
    batches, state = [], None
    for step, b in enumerate(full.epoch(0)):
        if step == 3:                       # after 4 steps, as a checkpoint after step 4 would hold it
            state = full.state_dict()
        batches.append(b)
    resumed = ViewLoader(ShardDataset(str(numbered)), RECIPE, 32, CPU, seed=2, workers=0, device_augment="on")
    resumed.load_state_dict(state)
    tail = list(resumed.epoch(0, start=4))                     # re-reads the 4 batches before, then goes on
    assert len(tail) == len(batches) - 4
    for a, b in zip(batches[4:], tail):
        assert torch.equal(a["label"], b["label"]) and all(torch.equal(u, v) for u, v in zip(a["views"], b["views"]))


def test_broken_members_are_skipped_and_counted(numbered, tmp_path):
    for p in sorted(numbered.glob("*.tar")):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    with tarfile.open(tmp_path / "shard-000003.tar", "a") as tf:     # a sample whose image is garbage
        for name, data in (("broken.png", b"\x00garbage" * 20), ("broken.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "shards.json").unlink(missing_ok=True)
    ds = ShardDataset(str(tmp_path / "shard-{000000..000007}.tar"))
    assert len(ds) == 321                                      # counted from the tar headers (cached)
    loader = ViewLoader(ds, RECIPE, 32, CPU, workers=2, device_augment="on")
    batches = list(loader.epoch(0))
    assert sum(b["skipped"] for b in batches) == 1
    assert sorted(y for b in batches for y in b["label"].tolist()) == list(range(320))


def test_specs_and_keys(numbered, tmp_path):
    assert is_shard_spec(str(numbered)) and is_shard_spec(str(numbered / "shard-{000000..000007}.tar"))
    assert not is_shard_spec(str(tmp_path))
    images = tmp_path / "images"                  # an image folder with its downloaded archive beside it
    (images / "cat").mkdir(parents=True)
    (images / "archive.tar").write_bytes(b"")
    assert not is_shard_spec(str(images))
    assert len(expand_shards(str(numbered / "shard-{000002..000004}.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_shards(str(numbered / "shard-{000000..000009}.tar"))
    assert split_key("a/b/n01.seg.PNG") == ("a/b/n01", "seg.png") and split_key("x.cls") == ("x", "cls")
