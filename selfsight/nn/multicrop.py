"""Multi-crop batches (SwAV, DINO, iBOT): crops of equal resolution run through a network together."""
from __future__ import annotations

import torch


def group_by_resolution(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of equal shape concatenated: one forward per resolution (DINO's
    ``MultiCropWrapper``), in the order of ``views``."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape == v.shape:
            groups[-1].append(v)
        else:
            groups.append([v])
    return [torch.cat(g) for g in groups]
