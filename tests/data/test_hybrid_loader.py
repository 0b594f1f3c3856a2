"""The hybrid folder path: workers decode and crop (uint8), the device does the rest of the recipe."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from selfsight.augment import ViewRecipe
from selfsight.data.crops import WorkerCrops, sample_seed
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


def test_jpegs_decoded_on_the_device_give_the_workers_crops(photo_folder, tmp_path, one_thread):
    """data.decode=device: workers send a JPEG's bytes and its crop boxes, the device decodes and
    crops (roi_align); the same boxes as the worker path, so the views agree up to the resize filter."""
    plain = ViewRecipe(size=24, flip_p=0.0, jitter_p=0.0, gray_p=0.0, mean=(0, 0, 0), std=(1, 1, 1),
                       local_crops=1, local_size=12, local_blur_p=0.0)
    workers = ViewLoader(ImageFolder(photo_folder, cache_dir=tmp_path), plain, 8, CPU, seed=3, workers=0,
                         device_augment="on")
    device = ViewLoader(ImageFolder(photo_folder, cache_dir=tmp_path), plain, 8, CPU, seed=3, workers=2,
                        device_augment="on", decode="device")
    raw = next(device.raw_batches(1))
    assert len(raw["jpeg_sizes"]) == 8 and raw["boxes"].shape == (8, 3, 4) and raw["views"] == []   # nothing decoded
    assert raw["jpeg"].dim() == 1 and len(raw["jpeg"]) == int(raw["jpeg_sizes"].sum())
    for a, b in zip(workers.epoch(1), device.epoch(1)):
        assert torch.equal(a["label"], b["label"]) and b["skipped"] == 0
        for u, v in zip(a["views"], b["views"]):
            assert u.shape == v.shape
            assert (u - v).abs().mean() < 0.02 and torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1] > 0.97


def test_device_decode_mixes_with_files_the_workers_decode(photo_folder, tmp_path):
    """PNGs, grey JPEGs and truncated JPEGs stay with the workers (decoded, or found broken and
    skipped); the batch keeps its order and a broken file is counted."""
    from PIL import Image
    root = tmp_path / "data"
    shutil.copytree(photo_folder, root)
    src = Image.open(next(root.glob("c0/*.jpg"))).convert("RGB")
    src.save(root / "c0" / "png.png")
    src.convert("L").save(root / "c1" / "grey.jpg")
    whole = (root / "c1" / "grey.jpg").read_bytes()
    (root / "c1" / "cut.jpg").write_bytes((next(root.glob("c0/*.jpg"))).read_bytes()[:2000])    # no end marker
    ds = ImageFolder(root, cache_dir=tmp_path / "cache")
    assert len(ds) == 19 and whole[-2:] == b"\xff\xd9"
    plain = ViewRecipe(size=16, flip_p=0.0, jitter_p=0.0, gray_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    loader = ViewLoader(ds, plain, 19, CPU, workers=0, device_augment="on", decode="device")
    raw = next(loader.raw_batches(0))
    # the png and the grey JPEG are decoded by the workers; so is the cut file's stand-in (the next index) if it is one
    assert len(raw["jpeg_sizes"]) + raw["decoded_index"].numel() == 19 and raw["skipped"] == 1
    assert raw["decoded_index"].numel() >= 2 and len(raw["jpeg_sizes"]) >= 15
    batch = next(loader.epoch(0))
    assert batch["skipped"] == 1 and batch["views"][0].shape == (19, 3, 16, 16)
    reference = next(ViewLoader(ImageFolder(root, cache_dir=tmp_path / "cache"), plain, 19, CPU, workers=0,
                                device_augment="on").epoch(0))
    assert torch.equal(batch["label"], reference["label"])
    at = raw["decoded_index"]                   # the worker-decoded images: exactly the worker path's crops
    assert torch.equal(batch["views"][0][at], reference["views"][0][at])


def test_device_decode_replaces_and_counts_what_no_decoder_reads(photo_folder):
    from selfsight.data.crops import DeviceJPEGDecoder, decode_and_crop
    good = torch.frombuffer(bytearray(next(photo_folder.glob("c0/*.jpg")).read_bytes()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"), dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, 100, 100]], [[10, 10, 50, 50]]])
    views, failed = decode_and_crop([good, bad], boxes, [ViewRecipe(size=8)], DeviceJPEGDecoder(CPU))
    assert failed == 1 and views[0].shape == (2, 3, 8, 8) and torch.isfinite(views[0]).all()
    with pytest.raises(RuntimeError, match="none of the 1 JPEGs"):
        decode_and_crop([bad], boxes[:1], [ViewRecipe(size=8)], DeviceJPEGDecoder(CPU))


def test_device_decode_needs_a_folder_on_the_hybrid_path(fmnist_small, photo_folder, tmp_path):
    recipe = ViewRecipe(size=16, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="data.decode=device.*data.cache=true never decodes"):
        ViewLoader(fmnist_small, recipe, 32, CPU, decode="device")

    class Tensors(torch.utils.data.Dataset):       # a map-style source of decoded images: nothing to decode
        channels = 1

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"image": fmnist_small.images[i], "label": 0, "skipped": 0}
    with pytest.raises(ValueError, match="Tensors, path hybrid"):
        ViewLoader(Tensors(), recipe, 32, CPU, device_augment="on", decode="device")
    folder = ImageFolder(photo_folder, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="path per_sample"):    # a CPU-only run keeps folders per sample
        ViewLoader(folder, ViewRecipe(size=16), 8, CPU, decode="device")
    assert not folder.undecoded_jpegs                           # nothing was switched before the error


def test_prefetched_keeps_order_raises_errors_and_stops_when_closed():
    import threading

    from selfsight.data.paths import prefetched
    made = []

    def source(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise OSError("disk gone")
            made.append(i)
            yield {"image": torch.full((2,), i), "skipped": 0}
    assert [int(b["image"][0]) for b in prefetched(source(7), 2)] == list(range(7))
    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(source(5, fail_at=3)))
    made.clear()
    it = prefetched(source(1000), 2)
    next(it)
    it.close()                                  # the consumer stops early: so does the thread
    assert not any(t.name == "selfsight-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5
