"""A local Hugging Face data set as a data source (``hf:PATH[:split]``, ``data/hf.py``): the same training
as the folder of the same Fashion-MNIST images, bit for bit; undecodable rows skipped and counted;
splits, columns, labels, the imagefolder loader, and the one-line errors (no ``datasets``, no folder)."""
from __future__ import annotations

import builtins
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_knn
from PIL import Image

from selfsight.data import ArrayDataset, build_dataset, num_classes_of
from selfsight.data.folder import ImageFolder
from selfsight.data.hf import NEEDS_DATASETS, HFImages, parse_hf_spec

datasets = pytest.importorskip("datasets")

from test_lists import N_GOOD, train, write_folder  # noqa: E402  (the same images and run as the list test)


@pytest.fixture(scope="module")
def images(tmp_path_factory, fmnist_small) -> Path:
    return write_folder(tmp_path_factory.mktemp("hf") / "images", fmnist_small)


def save(rows: list, labels, path: Path, names=None, split_test: int = 0) -> Path:
    """Rows ``{"bytes", "path"}`` (an Image feature) with ``labels`` (a ClassLabel when ``names``), saved
    with save_to_disk (a DatasetDict with a test split of the first ``split_test`` rows when > 0)."""
    label = datasets.ClassLabel(names=names) if names else datasets.Value("string")
    ds = datasets.Dataset.from_dict({"image": rows, "label": labels},
                                    features=datasets.Features({"image": datasets.Image(), "label": label}))
    if split_test:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select(range(split_test))})
    ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved(images) -> Path:
    """The folder's files, in its order, as the rows of a saved DatasetDict (the truncated PNG included:
    the undecodable row), labels as a ClassLabel of the folder's class names."""
    folder = ImageFolder(images, cache_dir=images.parent / "cache")     # module scope: before the isolated cache
    rows = [{"bytes": (images / rel).read_bytes(), "path": None} for rel, _ in folder.samples]
    return save(rows, [int(y) for y in folder.labels], images.parent / "saved", folder.classes, split_test=64)


def test_a_saved_dataset_trains_exactly_as_the_folder(images, saved, tmp_path, fmnist_small, fmnist_test):
    folder = ImageFolder(images)
    ds = build_dataset(f"hf:{saved}")
    assert isinstance(ds, HFImages) and ds.root == f"hf:{saved}:train" and len(ds) == len(folder) == N_GOOD + 1
    assert ds.classes == folder.classes and np.array_equal(ds.labels, folder.labels) and num_classes_of(ds) == 10
    got = {name: train(spec, tmp_path / name) for name, spec in (("folder", str(images)), ("hf", f"hf:{saved}"))}
    (f_rows, f_state), (h_rows, h_state) = got["folder"], got["hf"]
    assert [r["loss"] for r in h_rows] == [r["loss"] for r in f_rows]      # the same pixels, the same pipeline
    assert all(torch.equal(f_state[k], h_state[k]) for k in f_state)
    assert sum(r["skipped_files"] for r in f_rows) == sum(r["skipped_files"] for r in h_rows) == 1
    bank = ArrayDataset(fmnist_small.images[:N_GOOD].clone(), fmnist_small.labels[:N_GOOD].clone())
    knn = {name: small_knn(tmp_path / name, bank, fmnist_test, n_test=500) for name in got}
    assert knn["hf"] == knn["folder"]


def test_undecodable_rows_are_skipped_and_counted(saved):
    ds = HFImages(f"hf:{saved}")
    bad = [i for i in range(len(ds)) if _fails(ds, i)]
    assert len(bad) == 1                                    # the truncated PNG
    item = ds[bad[0]]                                       # the next row instead, one skipped to get there
    assert item["skipped"] == 1 and item["label"] == ds.labels[bad[0] + 1]
    assert sum(ds[i]["skipped"] for i in range(len(ds))) == 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def _fails(ds, i: int) -> bool:
    try:
        ds.read(i)
        return False
    except Exception:
        return True


def test_splits_single_datasets_and_the_spec(saved, tmp_path):
    assert HFImages(f"hf:{saved}:test").root == f"hf:{saved}:test" and len(HFImages(f"hf:{saved}:test")) == 64
    with pytest.raises(ValueError, match=r"has splits train, test, not 'val'"):
        build_dataset(f"hf:{saved}:val")
    img = io.BytesIO()
    Image.new("L", (9, 7), 128).save(img, format="PNG")
    one = save([{"bytes": img.getvalue(), "path": None}] * 3, ["b", "a", "b"], tmp_path / "one")
    ds = build_dataset(f"hf:{one}")
    assert len(ds) == 3 and ds.classes == ["a", "b"] and ds.labels.tolist() == [1, 0, 1]   # names -> sorted ids
    assert ds.image_sizes() == [(9, 7)] * 3 and ds[0]["image"].size == (9, 7) and ds[0]["image"].mode == "RGB"
    with pytest.raises(ValueError, match="one data set without splits: leave out :train"):
        build_dataset(f"hf:{one}:train")
    with pytest.raises(ValueError, match=f"is a Hugging Face data set written by save_to_disk: pass it as hf:{one}"):
        build_dataset(str(one))
    assert parse_hf_spec("hf:/data/x") == ("/data/x", "") and parse_hf_spec("hf:/data/x:test") == ("/data/x", "test")
    assert parse_hf_spec("hf:rel/x:validation") == ("rel/x", "validation")
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_hf_spec(f"hf:{odd}") == (str(odd), "")                     # an existing path with a colon
    assert parse_hf_spec("hf:/data/x:y/z") == ("/data/x:y/z", "")


def test_columns_labels_and_paths(images, tmp_path):
    files = [Path(shutil.copy(f, tmp_path)) for f in sorted((images / "c0").iterdir())[:3]]
    src = tmp_path / "paths"                                # paths as strings, integer labels in another column
    datasets.Dataset.from_dict({"file": [str(f) for f in files], "kind": [7, 10, 7]}).save_to_disk(str(src))
    with pytest.raises(ValueError, match=r"has no Image column \(columns: file, kind\).*data.image_column=NAME"):
        build_dataset(f"hf:{src}")
    got = build_dataset(f"hf:{src}", image_column="file", label_column="kind")
    assert got.classes == ["7", "10"] and got.labels.tolist() == [0, 1, 0]          # integers sort as numbers
    assert np.array_equal(np.asarray(got[1]["image"]), np.asarray(Image.open(files[1]).convert("RGB")))
    assert not build_dataset(f"hf:{src}", image_column="file").labeled              # no "label" column
    with pytest.raises(ValueError, match=r"data.label_column='klass' is not a column .*\(columns: file, kind\)"):
        build_dataset(f"hf:{src}", image_column="file", label_column="klass")
    with pytest.raises(ValueError, match=r"data.image_column='kind' .* holds Value\('int64'\)"):
        build_dataset(f"hf:{src}", image_column="kind")
    files[0].unlink()                                       # a row whose image file is gone: skipped, counted
    ds = HFImages(f"hf:{src}", image_column="file")
    assert ds[0]["skipped"] == 1 and ds.first_readable() == 1
    assert pickle.loads(pickle.dumps(ds.prepared(channels=1)))[1]["image"].mode == "L"   # for DataLoader workers
    # a ClassLabel with unlabeled rows (-1): the data is unlabeled
    rows = [{"bytes": files[1].read_bytes(), "path": None}] * 2
    partial = HFImages(f"hf:{save(rows, [0, -1], tmp_path / 'partial', names=['x', 'y'])}")
    assert not partial.labeled and partial.classes == [] and partial.labels.tolist() == [-1, -1]


def test_an_imagefolder_is_read_with_the_imagefolder_loader(tmp_path, monkeypatch, fmnist_small):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))   # its arrow cache
    root = tmp_path / "imagefolder"
    for split, start in (("train", 0), ("test", 20)):
        for i in range(start, start + 12):
            d = root / split / ("shirt" if i % 2 else "boot")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fmnist_small.images[i, 0].numpy()).save(d / f"{i}.png")
    (root / "train" / "boot" / "broken.png").write_bytes(b"not a png")
    train_set = build_dataset(f"hf:{root}")
    test_set = build_dataset(f"hf:{root}:test")
    assert len(train_set) == 13 and len(test_set) == 12 and train_set.classes == ["boot", "shirt"]
    assert sum(train_set[i]["skipped"] for i in range(len(train_set))) >= 1
    from selfsight.eval.labels import labeled_pair
    _, _, info = labeled_pair(train_set, test_set)
    assert info["classes"] == ["boot", "shirt"] and info["matched_by"] == "name"


def test_one_line_errors_without_datasets_or_without_a_folder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"^hf:/no/such/place: no such folder \(hf: reads local data only"):
        build_dataset("hf:/no/such/place")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here")
    with pytest.raises(ValueError, match="notes is neither a folder written by save_to_disk .* nor a folder of images"):
        build_dataset(f"hf:{tmp_path / 'notes'}")
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(empty))
    with pytest.raises(ValueError, match="empty: cannot load it with datasets: "):     # datasets fails on 0 rows
        build_dataset(f"hf:{empty}")
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(ImportError) as e:
        build_dataset(f"hf:{tmp_path / 'x'}")
    assert str(e.value) == NEEDS_DATASETS == "hf: data needs the datasets package: pip install 'selfsight[hf]'"
