"""Fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022, ``util/pos_embed.py``;
MoCo v3 ViTs): half the channels encode the row, half the column, each as
[sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 1 / 10000^(k / (D/4)), k < D/4."""
from __future__ import annotations

import torch


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """(cls + grid_h·grid_w)×dim float32 table in row-major patch order; the class token's
    row is zeros (MAE)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # D/4

    def axis(pos: torch.Tensor) -> torch.Tensor:                                        # N -> N×D/2
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    table = torch.cat([axis(rows.flatten()), axis(cols.flatten())], 1)                  # N×D
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table.float()
