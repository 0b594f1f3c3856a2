"""The hybrid folder path: workers decode and crop (uint8), the device does the rest of the recipe."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from selfsight.augment import ViewRecipe
from selfsight.augment.crops import WorkerCrops, sample_seed
from selfsight.data.folder import ImageFolder
from selfsight.data.loader import ViewLoader

CPU = torch.device("cpu")


def _photos() -> list[Path]:
    """Real photos: foolbox's ImageNet JPEGs (224 px), else scikit-image's."""
    spec = importlib.util.find_spec("foolbox")
    if spec is not None and spec.submodule_search_locations:
        files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("imagenet_*.jpg"))
        if files:
            return files[:16]
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        files = [d / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg") if (d / n).exists()]
        if files:
            return files
    pytest.skip("no real photos: install foolbox or scikit-image")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    files = _photos()
    for k in range(16):
        src = files[k % len(files)]
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        shutil.copyfile(src, root / f"c{k % 2}" / f"{k:02d}{src.suffix}")
    return root


def _views(loader: ViewLoader, epochs: int) -> torch.Tensor:
    return torch.cat([torch.cat(b["views"]) for e in range(epochs) for b in loader.epoch(e)])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # small tensors: a second thread only adds contention on a busy CPU
    yield
    torch.set_num_threads(threads)


def test_hybrid_and_per_sample_views_agree_in_distribution(photo_folder, tmp_path, one_thread):
    recipe = ViewRecipe(size=32, crop_scale=(0.2, 1.0))
    ds = ImageFolder(photo_folder, cache_dir=tmp_path)
    hybrid = ViewLoader(ds, recipe, 16, CPU, workers=0, device_augment="on")
    torch.manual_seed(0)
    per = ViewLoader(ImageFolder(photo_folder, cache_dir=tmp_path), recipe, 16, CPU, workers=0, device_augment="off")
    assert (hybrid.mode, per.mode) == ("hybrid", "per_sample")
    a, b = _views(hybrid, 20), _views(per, 20)                   # 640 views each of 16 real photos
    assert a.shape == b.shape == (640, 3, 32, 32)
    # normalized units (1 = 0.23 of the pixel range); torchvision's uint8 jitter truncates after each
    # op, so the per-sample path is ~2/255 darker: measured gap 0.01-0.13 over 5 seeds (noise +-0.03)
    for c in range(3):
        assert a[:, c].mean().item() == pytest.approx(b[:, c].mean().item(), abs=0.16), c
        assert a[:, c].std().item() == pytest.approx(b[:, c].std().item(), rel=0.05), c
    # per-view spread of brightness (the jitter and the crop) also matches
    assert a.mean((1, 2, 3)).std().item() == pytest.approx(b.mean((1, 2, 3)).std().item(), rel=0.15)
    # and the test can tell: a recipe without colour jitter is far off
    flat = _views(ViewLoader(ds, ViewRecipe(size=32, crop_scale=(0.2, 1.0), jitter_p=0.0), 16, CPU, workers=0, device_augment="on"), 4)
    assert abs(flat.mean((1, 2, 3)).std().item() - b.mean((1, 2, 3)).std().item()) > 0.15 * b.mean((1, 2, 3)).std().item()


def test_the_device_keeps_the_workers_crop_and_crops_depend_only_on_the_sample(photo_folder, tmp_path, one_thread):
    plain = ViewRecipe(size=24, flip_p=0.0, jitter_p=0.0, gray_p=0.0, mean=(0, 0, 0), std=(1, 1, 1),
                       local_crops=1, local_size=12, local_blur_p=0.0)
    ds = ImageFolder(photo_folder, cache_dir=tmp_path)
    loader = ViewLoader(ds, plain, 8, CPU, seed=3, workers=0, device_augment="on")
    crops = WorkerCrops(plain)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3 * 1_000_003 + 1)).tolist()
    batches = list(loader.epoch(1))
    assert [tuple(v.shape[1:]) for v in batches[0]["views"]] == [(3, 24, 24)] * 2 + [(3, 12, 12)]
    for step, batch in enumerate(batches):
        for j, i in enumerate(perm[step * 8:(step + 1) * 8]):
            want = crops(ds[i]["image"], sample_seed(3, 1, i))
            for v, w in zip(batch["views"], want):
                assert torch.equal(v[j], w.float() / 255)          # exactly the worker's crop, nothing re-cropped
    # two workers (other processes, other RNG streams) give the same crops as none
    two = list(ViewLoader(ImageFolder(photo_folder, cache_dir=tmp_path), plain, 8, CPU, seed=3, workers=2, device_augment="on").epoch(1))
    assert all(torch.equal(u, v) for a, b in zip(two, batches) for u, v in zip(a["views"], b["views"]))
    # a crop is a real random-resized crop: views of one image differ, but each is a piece of it
    first = batches[0]["views"]
    assert not torch.equal(first[0], first[1])


def test_gray_sources_and_device_augment_choices(fmnist_small):
    class Tensors(torch.utils.data.Dataset):       # any map-style source of uint8 C×H×W tensors
        channels = 1

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"image": fmnist_small.images[i], "label": int(fmnist_small.labels[i]), "skipped": 0}
    recipe = ViewRecipe(size=20, mean=(0.5,), std=(0.5,))
    # auto: hybrid on an accelerator, per sample in workers on a CPU-only run
    assert ViewLoader(Tensors(), recipe, 32, CPU, workers=0).mode == "per_sample"
    for mode in ("on",):
        loader = ViewLoader(Tensors(), recipe, 32, CPU, workers=0, device_augment=mode)
        batch = next(loader.epoch(0))
        assert loader.mode == "hybrid" and batch["views"][0].shape == (32, 1, 20, 20)
        assert batch["views"][0].min() >= -1 and batch["views"][0].max() <= 1 and batch["views"][0].std() > 0.2
    assert ViewLoader(fmnist_small, recipe, 32, CPU, device_augment="on").mode == "batched"
    assert ViewLoader(fmnist_small, recipe, 32, CPU, device_augment="off").mode == "per_sample"


def test_broken_files_are_skipped_and_counted_on_the_hybrid_path(photo_folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(photo_folder, root)
    for k in (0, 3):                                           # two broken files, not neighbours in the index
        (root / "c0" / f"{k:02d}x.jpg").write_bytes(b"\x00not a jpeg" * 10)
    ds = ImageFolder(root, cache_dir=tmp_path / "cache")
    assert len(ds) == 18
    loader = ViewLoader(ds, ViewRecipe(size=16), 9, CPU, workers=0, device_augment="on")
    batches = list(loader.epoch(0))
    assert sum(b["skipped"] for b in batches) == 2
    assert all(torch.isfinite(v).all() for b in batches for v in b["views"])


def test_workers_outlive_the_epoch(fmnist_small):
    """One DataLoader for the run: epoch 1 is served by the same worker processes as epoch 0, and
    each epoch still visits its own permutation."""
    import os

    class Pids(torch.utils.data.Dataset):
        channels = 1

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"image": fmnist_small.images[i], "label": os.getpid() * 100 + i % 100, "skipped": 0}
    loader = ViewLoader(Pids(), ViewRecipe(size=16, mean=(0.5,), std=(0.5,)), 16, CPU, workers=2,
                        device_augment="on")
    epochs = [[b["label"] for b in loader.epoch(e)] for e in range(2)]
    pids = [{int(p) for p in torch.cat(labels) // 100} for labels in epochs]
    assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]
    order = [torch.cat(labels) % 100 for labels in epochs]
    assert not torch.equal(order[0], order[1])
