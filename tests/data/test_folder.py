"""ImageFolder: indexing, labels, skipping broken files, cache, symlinks, DataLoader."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight.data import folder as folder_mod
from selfsight.data.folder import ImageFolder
from selfsight.data.images import IMAGE_EXTENSIONS


def _real_image_files() -> list[Path]:
    """Real JPEGs and PNGs shipped by foolbox (or scikit-image); skip when neither is installed."""
    spec = importlib.util.find_spec("foolbox")  # locate only: importing foolbox is slow
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        files = sorted(d.glob("imagenet_*.jpg"))[:8] + sorted(d.glob("cifar10_*.png"))[:8]
        if files:
            return files
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data"
        names = ("rocket.jpg", "astronaut.png", "chelsea.png", "coffee.png", "camera.png", "coins.png")
        files = [d / n for n in names if (d / n).exists()]
        if files:
            return files
    pytest.skip("no real test images: install foolbox or scikit-image")


@pytest.fixture(scope="module")
def real() -> list[Path]:
    return _real_image_files()


@pytest.fixture(autouse=True)
def _fresh_warning_counter(monkeypatch):
    monkeypatch.setattr(folder_mod, "_warned", {"pid": -1, "n": 0})


def make_tree(root: Path, real: list[Path], layout: dict[str, int]) -> Path:
    """Copy real images to ``root/<relpath>`` (names ending in '/' are folders of n images)."""
    k = 0
    for rel, n in layout.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            src = real[k % len(real)]
            shutil.copyfile(src, d / f"img{k:03d}{src.suffix}")
            k += 1
    return root


def backdate(root: Path, seconds: float = 100) -> None:
    """Push every folder's mtime into the past, as for a data set that is not fresh."""
    t = time.time() - seconds
    for d, _, _ in os.walk(root):
        os.utime(d, (t, t))


def build(root: Path, tmp_path: Path, **kw) -> ImageFolder:
    return ImageFolder(root, cache_dir=tmp_path / "cache", **kw)


def _is_rgb(img) -> bool:
    return isinstance(img, Image.Image) and img.mode == "RGB" and img.size[0] > 0


# ---------------------------------------------------------------- labels
def test_labeled_nested_classes(tmp_path, real):
    root = make_tree(
        tmp_path / "ds",
        real,
        {"cat": 2, "cat/indoor": 2, "cat/indoor/sofa": 1, "dog": 3, "dog/park/x/y": 2, "bird": 2},
    )
    (root / "dog" / "SHOUT.JPG").write_bytes(real[0].read_bytes())
    ds = build(root, tmp_path)
    assert ds.labeled and ds.classes == ["bird", "cat", "dog"]
    assert len(ds) == len(ds.samples) == 13
    for rel, label in ds.samples:
        assert ds.classes[label] == rel.split("/")[0]
        assert (root / rel).is_file()
    assert ("dog/SHOUT.JPG", 2) in list(ds.samples)
    assert ("dog/park/x/y/img008" + real[8 % len(real)].suffix, 2) in list(ds.samples)
    for i in (0, 5, -1):
        item = ds[i]
        assert _is_rgb(item["image"]) and item["skipped"] == 0
        assert item["label"] == ds.samples[i][1]
    assert ds.root == str(root)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_order_is_deterministic_and_samples_behave_like_a_list(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"b": 3, "a": 3, "a/z": 1})
    ds = build(root, tmp_path)
    rels = [r for r, _ in ds.samples]
    assert rels[:4] == sorted(rels[:4]) and all(r.startswith("a/") for r in rels[:4])
    assert ds.samples == list(ds.samples) and ds.samples[-1] == ds.samples[len(ds) - 1]
    assert ds.samples[1:3] == list(ds.samples)[1:3]


def test_unlabeled_when_images_in_root_or_single_subfolder(tmp_path, real):
    root = make_tree(tmp_path / "flat", real, {"": 2, "more": 2})
    ds = build(root, tmp_path)
    assert not ds.labeled and ds.classes == []
    assert [ds[i]["label"] for i in range(len(ds))] == [-1] * 4
    one = build(make_tree(tmp_path / "one", real, {"only": 3}), tmp_path)
    assert not one.labeled and {lab for _, lab in one.samples} == {-1}


def test_forced_labels(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    assert {lab for _, lab in build(root, tmp_path, labeled=False).samples} == {-1}
    one = build(make_tree(tmp_path / "one", real, {"only": 2}), tmp_path, labeled=True)
    assert one.classes == ["only"] and {lab for _, lab in one.samples} == {0}
    mixed = make_tree(tmp_path / "mixed", real, {"": 1, "cat": 1, "dog": 1})
    with pytest.raises(ValueError, match="directly in"):
        build(mixed, tmp_path, labeled=True)


# ---------------------------------------------------------------- skipping
def _add_broken(root: Path, real: list[Path]) -> None:
    jpg = real[0].read_bytes()
    (root / "cat" / "empty.jpg").touch()  # zero_byte (index time)
    (root / "cat" / "notes.txt").write_text("hello")  # non_image (index time)
    (root / "dog" / "labels.csv").write_text("a,b")  # non_image (index time)
    (root / "dog" / ".DS_Store").write_bytes(b"\0" * 10)  # hidden (index time)
    (root / ".git").mkdir()
    (root / ".git" / "x.jpg").write_bytes(jpg)  # hidden folder: never entered
    (root / "cat" / "half.jpg").write_bytes(jpg[: len(jpg) // 2])  # truncated (load time)
    (root / "dog" / "noise.png").write_bytes(os.urandom(3000))  # garbage (load time)
    (root / "dog" / "text.jpg").write_text("not an image")  # garbage (load time)


def test_broken_files_are_skipped_and_counted(tmp_path, real, caplog):
    root = make_tree(tmp_path / "ds", real, {"cat": 3, "dog": 3})
    _add_broken(root, real)
    with caplog.at_level(logging.INFO, logger="selfsight.data"):
        ds = build(root, tmp_path)
    s = ds.summary()
    assert s["images"] == len(ds) == 9  # 6 good + 3 broken only visible at load time
    assert s["classes"] == 2 and s["root"] == str(root)
    counts = s["skipped_at_index"]
    assert (counts["zero_byte"], counts["non_image"], counts["hidden"]) == (1, 2, 2)
    assert set(s["first_skipped"]) <= {"cat/empty.jpg", "cat/notes.txt", "dog/labels.csv", "dog/.DS_Store", ".git"}
    assert len(s["first_skipped"]) == 5
    assert s["other_extensions"] == {".txt": 1, ".csv": 1}
    json.dumps(s)
    assert any("9 images" in r.getMessage() and "zero_byte=1" in r.getMessage() for r in caplog.records)

    caplog.clear()
    rels = [r for r, _ in ds.samples]
    total_skipped = 0
    for i, rel in enumerate(rels):
        item = ds[i]
        assert _is_rgb(item["image"])
        total_skipped += item["skipped"]
        if rel in ("cat/half.jpg", "dog/noise.png", "dog/text.jpg"):
            assert item["skipped"] >= 1
            assert item["label"] == ds.samples[(i + item["skipped"]) % len(ds)][1]
        else:
            assert item["skipped"] == 0
    assert total_skipped >= 3 and ds.summary()["broken_at_load"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3
    assert all(any(name in w for w in warned) for name in ("half.jpg", "noise.png", "text.jpg"))


def test_known_bad_files_are_not_retried(tmp_path, real, monkeypatch):
    root = make_tree(tmp_path / "ds", real, {"": 2})
    (root / "bad.png").write_bytes(b"garbage" * 100)
    ds = build(root, tmp_path)
    bad = [r for r, _ in ds.samples].index("bad.png")
    calls = []
    original = folder_mod.load_image
    monkeypatch.setattr(folder_mod, "load_image", lambda p: calls.append(p) or original(p))
    for _ in range(3):
        assert ds[bad]["skipped"] == 1
    assert sum("bad.png" in str(p) for p in calls) == 1


def test_warnings_are_limited_and_all_bad_raises(tmp_path, real, caplog, monkeypatch):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(8):
        (root / f"x{i}.png").write_bytes(b"not a png" * 10)
    ds = build(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        with pytest.raises(RuntimeError, match="no readable image"):
            ds[0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5
    # a readable image beyond MAX_TRIES broken ones is not reached
    (root / "z_good.jpg").write_bytes(real[0].read_bytes())
    monkeypatch.setattr(folder_mod, "MAX_TRIES", 3)
    ds = build(root, tmp_path, refresh=True)
    with pytest.raises(RuntimeError):
        ds[0]
    assert ds[len(ds) - 1]["skipped"] == 0


# ---------------------------------------------------------------- clear errors
def test_empty_missing_and_no_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images in .*empty.*empty"):
        build(tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        build(tmp_path / "missing", tmp_path)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        build(tmp_path / "file.jpg", tmp_path)
    txt = tmp_path / "txt"
    (txt / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.csv"):
        (txt / name).write_text("x")
    (txt / "zero.png").touch()
    with pytest.raises(ValueError) as info:
        build(txt, tmp_path)
    msg = str(info.value)
    assert str(txt) in msg and "3 files with other extensions (.txt, .csv)" in msg
    assert "1 zero-byte" in msg and ".jpg" in msg and "supported" in msg


# ---------------------------------------------------------------- cache
def test_cache_is_reused_without_scanning(tmp_path, real, monkeypatch):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "cat/deep": 1, "dog": 2})
    (root / "dog" / "zero.jpg").touch()
    backdate(root)
    first = build(root, tmp_path)
    assert not first.from_cache
    files = list((tmp_path / "cache" / "index").iterdir())
    assert len(files) == 1 and files[0].suffix == ".idx"

    def no_scan(*a, **k):
        raise AssertionError("os.scandir called although the index is cached")

    monkeypatch.setattr(os, "scandir", no_scan)
    second = build(root, tmp_path)
    assert second.from_cache
    assert second.samples == list(first.samples) and second.classes == first.classes
    assert second.summary()["skipped_at_index"] == first.summary()["skipped_at_index"]
    assert second.summary()["first_skipped"] == ["dog/zero.jpg"]
    assert _is_rgb(second[0]["image"])
    with pytest.raises(AssertionError):
        build(root, tmp_path, refresh=True)


def test_cache_invalidated_by_top_level_changes(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    backdate(root)
    assert len(build(root, tmp_path)) == 4
    (root / "cat" / "new.jpg").write_bytes(real[0].read_bytes())  # new file in a class folder
    ds = build(root, tmp_path)
    assert not ds.from_cache and len(ds) == 5
    backdate(root)
    build(root, tmp_path)
    assert build(root, tmp_path).from_cache
    make_tree(root, real, {"fox": 2})  # new class folder changes root's mtime
    ds = build(root, tmp_path)
    assert not ds.from_cache and ds.classes == ["cat", "dog", "fox"]
    backdate(root)
    build(root, tmp_path)
    ds = build(root, tmp_path, refresh=True)
    assert not ds.from_cache and len(ds) == 7


def test_freshly_modified_folder_is_not_trusted(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    build(root, tmp_path)  # folders modified just now: same mtime tick could hide a change
    assert not build(root, tmp_path).from_cache


def test_unwritable_or_corrupt_cache(tmp_path, real, caplog):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        ds = ImageFolder(root, cache_dir=blocker)
    assert len(ds) == 4 and "without cache" in caplog.text
    backdate(root)
    build(root, tmp_path)
    (cache_file,) = (tmp_path / "cache" / "index").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        ds = build(root, tmp_path)
    assert len(ds) == 4 and not ds.from_cache and "corrupt" in caplog.text


def test_default_cache_dir_from_env(tmp_path, real, monkeypatch):
    root = make_tree(tmp_path / "ds", real, {"": 2})
    monkeypatch.setenv("SELFSIGHT_CACHE", str(tmp_path / "envcache"))
    ImageFolder(root)
    assert len(list((tmp_path / "envcache" / "index").glob("*.idx"))) == 1


# ---------------------------------------------------------------- symlinks
def _build_in_thread(root: Path, tmp_path: Path, **kw) -> ImageFolder:
    box: list = []
    t = threading.Thread(target=lambda: box.append(build(root, tmp_path, **kw)), daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "indexing hangs on a symlink loop"
    assert box, "indexing failed"
    return box[0]


def test_symlink_loops_never_hang(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    os.symlink("..", root / "cat" / "up")  # loop to root
    os.symlink(".", root / "dog" / "self")  # loop to itself
    os.symlink("b_link", root / "dog" / "a_link.jpg")  # dangling chain
    os.symlink("a_link.jpg", root / "dog" / "b_link")
    plain = _build_in_thread(root, tmp_path)
    assert len(plain) == 4 and plain.summary()["skipped_at_index"]["symlinked_dir"] == 2
    assert plain.summary()["skipped_at_index"]["broken_link"] == 2
    followed = _build_in_thread(root, tmp_path, follow_symlinks=True)
    assert len(followed) == 4 and followed.summary()["skipped_at_index"]["loop"] == 2


def test_symlinks_outside_root(tmp_path, real):
    root = make_tree(tmp_path / "ds", real, {"cat": 2, "dog": 2})
    outside = make_tree(tmp_path / "outside", real, {"": 1, "more": 2})
    (outside_file,) = outside.glob("img*")
    os.symlink(outside_file, root / "cat" / ("out" + outside_file.suffix))
    os.symlink(outside / "more", root / "dog" / "more")
    os.symlink(root / "cat" / sorted(os.listdir(root / "cat"))[0], root / "dog" / "inside.jpg")
    ds = build(root, tmp_path)
    rels = [r for r, _ in ds.samples]
    counts = ds.summary()["skipped_at_index"]
    assert counts["outside_root"] == 1 and counts["symlinked_dir"] == 1
    assert "dog/inside.jpg" in rels and len(ds) == 5
    assert not any(r.startswith("cat/out") or r.startswith("dog/more") for r in rels)
    followed = build(root, tmp_path, follow_symlinks=True)
    rels = [r for r, _ in followed.samples]
    assert len(followed) == 8 and sum(r.startswith("dog/more/") for r in rels) == 2
    assert all(_is_rgb(followed[i]["image"]) for i in range(len(followed)))


# ---------------------------------------------------------------- workers
def test_pickle_and_dataloader_with_workers(tmp_path, real):
    from torchvision.transforms import v2

    root = make_tree(tmp_path / "ds", real, {"cat": 4, "dog/a": 3, "dog/b": 3})
    (root / "dog" / "a" / "broken.jpg").write_bytes(real[0].read_bytes()[:500])
    transform = v2.Compose([v2.Resize((16, 16)), v2.PILToTensor()])
    ds = build(root, tmp_path, transform=transform)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == list(ds.samples) and clone[0]["image"].shape == (3, 16, 16)

    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    images, labels, skipped = [], [], []
    for batch in loader:
        images.append(batch["image"])
        labels += batch["label"].tolist()
        skipped += batch["skipped"].tolist()
    assert torch.cat(images).shape == (11, 3, 16, 16) and torch.cat(images).dtype == torch.uint8
    assert sorted(set(labels)) == [0, 1] and labels.count(0) == 4
    assert sum(skipped) == 1
    assert np.array_equal(labels, [lab if r != "dog/a/broken.jpg" else 1 for r, lab in ds.samples])


def test_extensions_are_case_insensitive(tmp_path, real):
    root = tmp_path / "ext"
    root.mkdir()
    data = real[0].read_bytes()
    for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)):
        (root / f"f{i}{ext.upper()}").write_bytes(data)
        (root / f"g{i}{ext}").write_bytes(data)
    (root / "noext").write_bytes(data)
    ds = build(root, tmp_path)
    assert len(ds) == 2 * len(IMAGE_EXTENSIONS)
    assert ds.summary()["other_extensions"] == {"(none)": 1}
