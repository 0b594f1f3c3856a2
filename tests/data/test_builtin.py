"""Fashion-MNIST lookup order ($SELFSIGHT_DATA, Debian folder, torchvision download) and errors."""
import gzip

import numpy as np
import pytest
import torch

import selfsight.data.builtin as builtin
from selfsight.data import build_dataset, held_out_split
from selfsight.data.arrays import ArrayDataset, read_idx


def write_idx(folder, prefix, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes())


def test_debian_package_is_found_and_decoded(fmnist, fmnist_test):
    assert len(fmnist) == 60000 and len(fmnist_test) == 10000
    assert fmnist.images.shape == (60000, 1, 28, 28) and fmnist.images.dtype == torch.uint8
    assert torch.bincount(fmnist.labels).tolist() == [6000] * 10
    assert held_out_split("fashion-mnist") == "fashion-mnist:test"


def test_selfsight_data_comes_first(tmp_path, monkeypatch, fmnist):
    imgs = fmnist.images[:50, 0].numpy()
    write_idx(tmp_path / "fashion-mnist", "train", imgs, np.arange(50, dtype=np.uint8) % 10)
    monkeypatch.setenv("SELFSIGHT_DATA", str(tmp_path))
    ds = build_dataset("fashion-mnist")
    assert len(ds) == 50 and torch.equal(ds.images[:, 0], fmnist.images[:50, 0])


def test_one_error_names_all_three_places(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSIGHT_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    import torchvision

    def offline(*a, **k):
        raise RuntimeError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("fashion-mnist")
    msg = str(e.value)
    assert "SELFSIGHT_DATA" in msg and "no-debian" in msg and "dataset-fashion-mnist" in msg
    assert "download" in msg and "network unreachable" in msg


def test_bad_names_splits_and_files(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        build_dataset("cifar10:validation")
    with pytest.raises(FileNotFoundError, match="neither a built-in set"):
        build_dataset(str(tmp_path / "nope"))
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 3, 3))


def test_batched_indexing(fmnist_small):
    batch = fmnist_small.__getitems__([3, 1, 2])
    assert batch["image"].shape == (3, 1, 28, 28) and batch["label"].tolist() == fmnist_small.labels[[3, 1, 2]].tolist()
