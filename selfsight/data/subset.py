"""Some images of a data source, drawn or listed, as a source of their own."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsight.data.arrays import ArrayDataset


class Subset(Dataset):
    """Images ``index`` of a map-style source; ``prepared`` reaches the source itself (folders)."""

    def __init__(self, base, index: list[int]):
        self.base, self.index = base, list(index)
        self.labeled, self.classes = getattr(base, "labeled", True), list(getattr(base, "classes", []) or [])
        self.channels = getattr(base, "channels", 3)

    def prepared(self, **kwargs) -> "Subset":
        return Subset(self.base.prepared(**kwargs), self.index)

    def image_sizes(self, n: int = 64) -> list[tuple[int, int]]:
        """The source's image sizes (``data.native_size``)."""
        return self.base.image_sizes(n) if hasattr(self.base, "image_sizes") else []

    @property
    def labels(self) -> np.ndarray | None:
        base = getattr(self.base, "labels", None)
        return None if base is None else np.asarray(base)[np.asarray(self.index)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.index[i]]


def subset(dataset, index: torch.Tensor | list[int]):
    """The images ``index`` of ``dataset``: an in-memory set copies them, any other is wrapped."""
    if isinstance(dataset, ArrayDataset):
        idx = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(dataset.images[idx].clone(), dataset.labels[idx].clone(), dataset.name, dataset.classes)
    return Subset(dataset, torch.as_tensor(index).tolist())


def draw(dataset, n: int | None, seed: int, sort: bool = False):
    """``n`` images drawn without replacement with ``seed`` (all of them when n is None, <= 0 or >= the
    size); ``sort``: in the source's order."""
    if not n or n <= 0 or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return subset(dataset, idx.sort().values if sort else idx)
