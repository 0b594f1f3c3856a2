"""Built-in data sets: Fashion-MNIST (offline-first) and the scenes made from it (``data/scenes.py``),
and torchvision's CIFAR-10/100, STL-10."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torchvision

from selfsight.data.arrays import ArrayDataset, read_idx

log = logging.getLogger("selfsight.data")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
# split name -> (torchvision class name, constructor kwargs for that split)
SPLITS = {
    "cifar10": {"train": {"train": True}, "test": {"train": False}},
    "cifar100": {"train": {"train": True}, "test": {"train": False}},
    "stl10": {"train": {"split": "train"}, "test": {"split": "test"}, "unlabeled": {"split": "unlabeled"},
              "train+unlabeled": {"split": "train+unlabeled"}},
    "fashion-mnist": {"train": {"train": True}, "test": {"train": False}},
    "fashion-mnist-scenes": {"train": {}, "test": {}},     # data/scenes.py: made from Fashion-MNIST
}


def data_root(root: str = "") -> Path:
    return Path(root or os.environ.get("SELFSIGHT_DATA") or Path.home() / ".cache" / "selfsight" / "data")


def _find_idx(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    for sub in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        for ext in (".gz", ""):
            imgs = sub / f"{prefix}-images-idx3-ubyte{ext}"
            labels = sub / f"{prefix}-labels-idx1-ubyte{ext}"
            if imgs.exists() and labels.exists():
                return imgs, labels
    return None


def fashion_mnist(split: str = "train", root: str = "", download: bool = True) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 gray images, 10 classes.

    Looked up in ``$SELFSIGHT_DATA`` (or ``root``), then in the Debian package's folder
    (``apt-get install dataset-fashion-mnist``), then downloaded by torchvision.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    tried = []
    user = Path(root) if root else (Path(os.environ["SELFSIGHT_DATA"]) if os.environ.get("SELFSIGHT_DATA") else None)
    for folder in ([user] if user else []) + [DEBIAN_FASHION_MNIST]:
        found = _find_idx(folder, prefix)
        tried.append(str(folder))
        if found:
            images, labels = (read_idx(p) for p in found)
            return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                                name=f"fashion-mnist:{split}", classes=FASHION_CLASSES)
    target = data_root(root)
    if download:
        try:
            torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
            found = _find_idx(target, prefix)
            if found:
                return fashion_mnist(split, str(target), download=False)
        except Exception as e:  # no network, no space, ...
            tried.append(f"torchvision download into {target} ({type(e).__name__}: {e})")
    else:
        tried.append("torchvision download (disabled)")
    raise FileNotFoundError(
        "Fashion-MNIST not found. Looked in: $SELFSIGHT_DATA=" + (str(user) if user else "<unset>")
        + f"; the Debian package folder {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)"
        + "; " + "; ".join(t for t in tried if "download" in t))


def torchvision_set(name: str, split: str, root: str = "", download: bool = False) -> ArrayDataset:
    """CIFAR-10/100 (32x32 RGB) and STL-10 (96x96 RGB) from torchvision, held in memory."""
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]
    target = data_root(root)
    try:
        ds = cls(str(target), download=download, **SPLITS[name][split])
    except RuntimeError as e:
        raise FileNotFoundError(f"{name} not found in {target} ({e}); pass data.download=true "
                                f"(or --download) to fetch it, or set $SELFSIGHT_DATA") from None
    if name == "stl10":
        images = torch.from_numpy(ds.data)                         # N×3×96×96
        labels = torch.from_numpy(ds.labels.astype(np.int64))      # -1 for the unlabeled split
    else:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)     # N×32×32×3 -> N×3×32×32
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return ArrayDataset(images.contiguous(), labels, name=f"{name}:{split}", classes=list(ds.classes))
