"""MLP projection heads."""
from __future__ import annotations

import torch.nn as nn


class ProjectionMLP(nn.Sequential):
    """SimCLR projection head g (methods.md §1-2, ``simclr:tf2/model.py``).

    ``layers`` Linear layers: each hidden one is Linear(no bias) -> BN -> ReLU, the last is
    Linear(no bias) -> BN without beta (``center=False`` in the TF code: BN's shift is
    frozen at 0 here). v1 uses 2 layers, v2 uses 3. ``out_bn=False`` gives the paper's plain
    Linear-ReLU-Linear with biases instead.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, out_bn: bool = True):
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim, bias=not out_bn), nn.BatchNorm1d(hidden_dim) if out_bn else nn.Identity(),
                     nn.ReLU(inplace=True)]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim, bias=not out_bn))
        if out_bn:
            bn = nn.BatchNorm1d(out_dim)
            bn.bias.requires_grad_(False)          # center=False: scale only
            mods.append(bn)
        super().__init__(*mods)
