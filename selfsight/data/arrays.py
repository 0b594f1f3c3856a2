"""In-memory image arrays (Fashion-MNIST, CIFAR, STL-10): uint8 tensors, batched indexing."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Images held as one uint8 tensor ``N×C×H×W`` with int64 labels (-1 = unlabeled).

    Items are dicts like the folder source's (``image`` is a uint8 ``C×H×W`` tensor).
    ``__getitems__`` lets a DataLoader fetch a whole batch with one indexing operation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, name: str = "",
                 classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"ArrayDataset wants uint8 N×C×H×W images, got {images.dtype} {tuple(images.shape)}")
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.name = name
        self.classes = classes or []

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "skipped": 0}

    def __getitems__(self, idx: list[int]) -> dict:
        index = torch.as_tensor(idx, dtype=torch.long)
        return {"image": self.images[index], "label": self.labels[index], "skipped": 0}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST format), gzipped or not: magic (dtype, ndim), dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of uint8 data")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)
