"""MLP heads (projectors and predictors) of the joint-embedding methods."""
from __future__ import annotations

import torch.nn as nn

LAST_BN = ("scale", "plain", "affine", "none")


class ProjectionMLP(nn.Sequential):
    """``layers`` Linear layers; each hidden one is Linear -> [BN] -> ReLU.

    ``hidden_bn``: BN after each hidden Linear (SimCLR, MoCo v3, BYOL); off for MoCo v2's
    plain Linear-ReLU-Linear head. ``last_bn`` after the output Linear:

    * ``scale``  BN with its shift frozen at 0: SimCLR's ``center=False`` (``simclr:tf2/model.py``);
    * ``plain``  BN without affine parameters: MoCo v3 projector (``moco-v3:builder._build_mlp``),
      SimSiam projector;
    * ``affine`` ordinary BN;
    * ``none``   no BN (MoCo v2 head, MoCo v3 ResNet predictor, BYOL).

    ``hidden_bias`` / ``last_bias``: biases on the hidden / output Linear layers; default: only
    where no BN follows. MoCo v3 has none anywhere; BYOL has them on the hidden layers only.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, hidden_bn: bool = True,
                 last_bn: str = "scale", hidden_bias: bool | None = None, last_bias: bool | None = None):
        if last_bn not in LAST_BN:
            raise ValueError(f"last_bn must be one of {LAST_BN}, got {last_bn!r}")
        if layers < 1:
            raise ValueError(f"an MLP head needs at least one layer, got {layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(d, hidden_dim, bias=(not hidden_bn) if hidden_bias is None else hidden_bias))
            if hidden_bn:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.ReLU(inplace=True))
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim, bias=(last_bn == "none") if last_bias is None else last_bias))
        if last_bn != "none":
            bn = nn.BatchNorm1d(out_dim, affine=last_bn != "plain")
            if last_bn == "scale":
                bn.bias.requires_grad_(False)          # center=False: scale only
            mods.append(bn)
        super().__init__(*mods)
        self.hidden_bn = hidden_bn

    def leading_layers(self, n: int) -> list[nn.Module]:
        """The modules of the first ``n`` hidden layers (Linear, [BN], ReLU each)."""
        per = 3 if self.hidden_bn else 2
        return list(self.children())[:per * n]
