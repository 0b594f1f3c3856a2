"""Token bookkeeping for masked image modeling without host reads."""
from __future__ import annotations

import torch


def visible_index(keep: torch.Tensor, visible: int) -> torch.Tensor:
    """B×visible positions of the kept patches of ``keep`` (B×N bool), in ascending order, as
    ``keep.nonzero()`` gives them, but without a host read: a stable descending sort puts the kept
    positions first. ``visible`` must be the number kept in every row (the caller knows it: MAE's
    fixed mask ratio, or the shape of the tokens an encoder returned)."""
    return torch.argsort(keep.to(torch.uint8), dim=1, descending=True, stable=True)[:, :visible]
