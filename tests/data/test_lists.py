"""A CSV or text list of files as a data source (``data/lists.py``): the same training as the folder
of the same Fashion-MNIST images, bit for bit; missing and broken files skipped and counted; the
parsing rules (header, formats, relative paths, labels) and the errors."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import small_knn, tiny_overrides
from PIL import Image

from selfsight.data import ArrayDataset, build_dataset, num_classes_of
from selfsight.data.folder import ImageFolder
from selfsight.data.lists import ListImages, class_ids, is_list_spec, read_list

N_GOOD = 447              # + 1 truncated file = 448 = 14 batches of 32: every index is drawn in the epoch


def write_folder(root: Path, dataset, n: int = N_GOOD) -> Path:
    """``n`` real Fashion-MNIST PNGs in class folders ``c<label>/``, plus a truncated PNG (last in ``c3/``)."""
    for i in range(n):
        d = root / f"c{int(dataset.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[i, 0].numpy()).save(d / f"{i:04d}.png")
    whole = next(iter(sorted((root / "c3").iterdir()))).read_bytes()
    (root / "c3" / "0999.png").write_bytes(whole[:60])
    return root


def train(spec: str, out: Path) -> tuple[list[dict], dict]:
    """One deterministic epoch of tiny SimCLR on ``spec`` (no workers): the metrics rows and the weights."""
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    over = tiny_overrides(**{"method.name": "simclr", "data.train": spec, "train.epochs": 1,
                             "train.deterministic": "true", "train.threads": 1, "data.workers": 0,
                             "train.checkpoint_every": 0, "train.log_every": 1})
    pretrain(load_config(None, over), out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, torch.load(out / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, fmnist_small) -> Path:
    return write_folder(tmp_path_factory.mktemp("lists") / "images", fmnist_small)


def write_rows(path: Path, rows: list, header=("path", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def test_a_csv_list_trains_exactly_as_the_folder_and_counts_what_it_skips(images, tmp_path, fmnist_small, fmnist_test,
                                                                       caplog):
    folder = ImageFolder(images)
    assert len(folder) == N_GOOD + 1
    rows = [(f"images/{rel}", folder.classes[y]) for rel, y in folder.samples]
    rows.insert(100, ("images/c1/typo.png", "c1"))                        # a path that does not exist
    listed = write_rows(images.parent / "list.csv", rows)
    with caplog.at_level(logging.INFO, logger="selfsight.data"):
        ds = build_dataset(str(listed))
    assert isinstance(ds, ListImages) and len(ds) == len(folder) and ds.classes == folder.classes
    assert np.array_equal(ds.labels, folder.labels) and ds.summary()["skipped_at_index"]["missing"] == 1
    assert "1 listed path skipped (missing: 1), e.g. images/c1/typo.png" in caplog.text

    got = {}
    for name, spec in (("folder", str(images)), ("list", str(listed))):
        got[name] = train(spec, tmp_path / name)
    (f_rows, f_state), (l_rows, l_state) = got["folder"], got["list"]
    assert [r["loss"] for r in l_rows] == [r["loss"] for r in f_rows]       # the same pipeline, bit for bit
    assert f_state.keys() == l_state.keys() and all(torch.equal(f_state[k], l_state[k]) for k in f_state)
    # the truncated file: skipped once in the epoch, counted in skipped_files (the typo was skipped while indexing)
    assert sum(r["skipped_files"] for r in f_rows) == sum(r["skipped_files"] for r in l_rows) == 1
    bank = ArrayDataset(fmnist_small.images[:N_GOOD].clone(), fmnist_small.labels[:N_GOOD].clone())
    knn = {name: small_knn(tmp_path / name, bank, fmnist_test, n_test=500) for name in got}
    assert knn["list"] == knn["folder"]


def test_relative_paths_follow_the_list_and_absolute_paths_are_allowed(images, tmp_path, monkeypatch):
    sub = tmp_path / "lists" / "deeper"
    sub.mkdir(parents=True)
    a, b = sorted((images / "c0").iterdir())[:2]
    listed = write_rows(sub / "mixed.csv", [(str(a), "x"), (os.path.relpath(b, sub), "y")], header=None)
    monkeypatch.chdir(images)                       # the working directory plays no part
    ds = ListImages(listed)
    assert len(ds) == 2 and ds.classes == ["x", "y"] and [ds[i]["label"] for i in range(2)] == [0, 1]
    assert np.array_equal(np.asarray(ds[1]["image"]), np.asarray(Image.open(b).convert("RGB")))
    assert ds.root == str(sub) and ds.samples[1][0].startswith("..")


def test_header_detection_and_columns(images, tmp_path):
    img = sorted((images / "c0").iterdir())[0]
    plain = write_rows(tmp_path / "plain.csv", [(str(img), "cat")], header=None)
    assert read_list(str(plain)).header is None and read_list(str(plain)).labels == ["cat"]
    named = write_rows(tmp_path / "named.csv", [("1", str(img), "cat")], header=("id", "file", "label"))
    rows = read_list(str(named))
    assert rows.header == ["id", "file", "label"] and rows.paths == [str(img)] and rows.labels == ["cat"]
    other = write_rows(tmp_path / "other.csv", [(str(img), "dog", "cat")], header=("image", "kind", "class"))
    assert read_list(str(other)).labels == [None]                        # no "label" column: unlabeled
    assert read_list(str(other), label_column="class").labels == ["cat"]
    assert ListImages(other, image_column="image", label_column="kind").classes == ["dog"]
    with pytest.raises(ValueError, match="'klass' is not a column of .*other.csv.*columns: image, kind, class"):
        read_list(str(other), label_column="klass")
    with pytest.raises(ValueError, match="no header row"):
        read_list(str(plain), label_column="label")
    # a first row naming an existing file without an image extension is data, not a header
    raw = tmp_path / "raw_image"
    raw.write_bytes(img.read_bytes())
    assert read_list(str(write_rows(tmp_path / "raw.csv", [("raw_image", "a")], header=None))).paths == ["raw_image"]


def test_text_and_tsv_formats(images, tmp_path):
    imgs = sorted((images / "c0").iterdir())[:3]
    spaced = tmp_path / "with space"
    spaced.mkdir()
    shutil.copy(imgs[0], spaced / "a b.png")
    (tmp_path / "plain.txt").write_text(f"# a comment\n\nwith space/a b.png\n{imgs[1]}\n")
    (tmp_path / "imagenet.txt").write_text(f"with space/a b.png 3\n{imgs[1]}   10\n{imgs[2]}\t2\n")
    (tmp_path / "tabs.tsv").write_text(f"path\tlabel\n{imgs[0]}\tcoat\n{imgs[1]}\tbag\n")
    (tmp_path / "commas.txt").write_text(f"{imgs[0]},coat\n{imgs[1]},bag\n")
    plain = read_list(str(tmp_path / "plain.txt"))
    assert plain.paths == ["with space/a b.png", str(imgs[1])] and plain.labels == [None, None]
    assert plain.lines == [3, 4]
    assert not ListImages(tmp_path / "plain.txt").labeled
    assert read_list(str(tmp_path / "imagenet.txt")).paths[0] == "with space/a b.png"
    ds = ListImages(tmp_path / "imagenet.txt")
    assert ds.classes == ["2", "3", "10"] and list(ds.labels) == [1, 2, 0]    # integers sort as numbers
    assert ListImages(tmp_path / "tabs.tsv").classes == ["bag", "coat"]
    assert read_list(str(tmp_path / "commas.txt")).labels == ["coat", "bag"]
    assert is_list_spec(str(tmp_path / "x.CSV")) and not is_list_spec(str(tmp_path))


def test_labels_map_like_class_folders():
    ids, classes = class_ids(["dog", "cat", None, "dog"])
    assert classes == ["cat", "dog"] and ids.tolist() == [1, 0, -1, 1]
    ids, classes = class_ids(["10", "2", "03", "3"])
    assert classes == ["2", "3", "10"] and ids.tolist() == [2, 0, 1, 1]


def test_labels_classes_and_evaluation_pairs(images, tmp_path):
    from selfsight.eval.labels import has_labels, labeled_pair
    folder = ImageFolder(images)
    rows = [(f"images/{rel}", folder.classes[y]) for rel, y in folder.samples]
    train_list = write_rows(images.parent / "train.csv", rows[::2])
    test_list = write_rows(images.parent / "test.csv", [r for r in rows[1::2] if r[1] in ("c2", "c5")])
    train_set, test_set, info = labeled_pair(str(train_list), str(test_list))
    assert has_labels(train_set) and num_classes_of(train_set) == 10 and info["classes"] == ["c2", "c5"]
    assert {test_set[i]["label"] for i in range(len(test_set))} == {2, 5}      # matched to the training classes
    part = write_rows(images.parent / "part.csv", [rows[0], (rows[1][0], "")])
    with pytest.raises(ValueError, match=r"part.csv:3: no label, while other rows have one"):
        ListImages(part)


def test_lists_that_name_nothing_readable_are_one_clear_error(images, tmp_path):
    with pytest.raises(FileNotFoundError, match="image list .*nope.csv does not exist"):
        build_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="names no image"):
        build_dataset(str(write_rows(tmp_path / "empty.csv", [])))
    with pytest.raises(ValueError, match=r"missing.csv names no readable image: all 2 paths were skipped \(2 missing"):
        build_dataset(str(write_rows(tmp_path / "missing.csv", [("a.png", "x"), ("b.png", "y")])))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"broken.csv names no readable image: all 1 listed files failed to decode"):
        build_dataset(str(write_rows(tmp_path / "broken.csv", [("junk.png", "x"), ("empty.png", "x")])))
    ds = ListImages(write_rows(tmp_path / "dirs.csv", [("junk.png",), (".",), ("empty.png",)], header=None))
    assert ds.summary()["skipped_at_index"] == {"missing": 0, "not_a_file": 1, "zero_byte": 1}


def test_a_list_is_a_folder_for_everything_that_takes_one(images, tmp_path):
    """The list source is an ImageFolder with an explicit index: it carries every attribute a folder
    has (caught here if ImageFolder gains one), pickles for workers, and builds the array cache."""
    from selfsight.data.arraycache import cached_folder
    folder = ImageFolder(images)
    rows = [(f"images/{rel}", folder.classes[y]) for rel, y in folder.samples]
    ds = ListImages(write_rows(images.parent / "all.csv", rows))
    assert set(vars(folder)) <= set(vars(ds))
    import pickle
    again = pickle.loads(pickle.dumps(ds.prepared(channels=1)))
    assert again[5]["image"].mode == "L" and again.labels.tolist() == folder.labels.tolist()
    cache = cached_folder(ds, 28, channels=1, workers=0, progress=False)
    assert len(cache) == N_GOOD and cache.skipped == 1
