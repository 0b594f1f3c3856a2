"""MIM heads: predict a target vector (or vocabulary logits) per patch from the student's
patch tokens (methods.md §14, "MIM head" H of the unified view).

* ``linear``: one Linear (BEiT's lm_head, MaskFeat, MaskDistill).
* ``mlp``: Linear -> GELU -> Linear.
* ``decoder``: MAE's decoder (He et al. 2022, ``models_mae.py``): Linear(D -> d) -> the mask
  token inserted at the masked positions (sparse input: visible tokens scattered back to their
  places) -> class token prepended -> + fixed 2-D sin-cos position embedding -> ``depth``
  Transformer blocks (d wide, ``heads`` heads, MLP ratio 4) -> LayerNorm -> Linear(d -> out),
  class token dropped.

``forward(cls, patch, mask, grid)``: cls B×D, patch B×N×D (dense) or B×Nv×D (sparse: only the
visible tokens, in row-major order), mask B×N bool (True = masked), grid (h, w) with h·w = N.
Every head returns B×N×out, a prediction for every position; the loss weighs them by ``mask``
(``losses.mim.mim_loss``), so that no step reads the mask back to select positions.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from selfsight.nn.attention import attention_kernels, use_sdpa
from selfsight.nn.device import to_device
from selfsight.nn.pos_embed import sincos_2d
from selfsight.nn.tokens import visible_index

HEADS = ("linear", "mlp", "decoder")


class TokenHead(nn.Module):
    """Linear (``hidden_dim`` 0) or Linear-GELU-Linear applied to every token: B×N×D -> B×N×out.
    The loss weighs the positions by the mask (as SimMIM). Selecting the masked tokens first
    (``patch[mask]``, as BEiT's code) would find them with a read back from the device in every
    step; predicting all tokens costs the head (1 - ratio)/ratio times more, a few % of a ViT's
    FLOPs even for BEiT's 8192-way head."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0):
        super().__init__()
        self.net = nn.Linear(in_dim, out_dim) if hidden_dim <= 0 else nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, cls: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, grid: tuple) -> torch.Tensor:
        if patch.shape[1] != mask.shape[1]:
            raise ValueError("a linear or MLP head needs the dense student input (mask tokens, "
                             "student_input: dense); the sparse encoder needs head.kind: decoder")
        return self.net(patch)                                                         # B×N×out


class MAEDecoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dim: int = 512, depth: int = 8, heads: int = 16):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        use_sdpa(self.blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.dim = dim
        self._pos: dict = {}
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():                                       # MAE: xavier Linear, unit LayerNorm
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed(self, grid: tuple, device) -> torch.Tensor:
        key = (tuple(grid), str(device))
        if key not in self._pos:                                       # fixed, never trained
            self._pos[key] = to_device(sincos_2d(self.dim, grid[0], grid[1], cls_token=True), device)[None]
        return self._pos[key]                                          # 1×(1+N)×d

    def forward(self, cls: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, grid: tuple) -> torch.Tensor:
        b, n = mask.shape
        x = self.embed(patch)                                          # B×Nv×d or B×N×d
        if x.shape[1] != n:                                            # sparse: scatter the visible tokens back
            index = visible_index(~mask, x.shape[1])[..., None].expand(-1, -1, self.dim)    # B×Nv×d
            x = self.mask_token.to(x.dtype).expand(b, n, -1).scatter(1, index, x)
        else:                                                          # dense: masked positions -> mask token
            m = mask[..., None].to(x.dtype)
            x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        x = torch.cat([self.embed(cls)[:, None], x], 1) + self.pos_embed(grid, x.device).to(x.dtype)
        with attention_kernels(x):
            for blk in self.blocks:
                x = blk(x)
        return self.pred(self.norm(x))[:, 1:]                          # B×N×out


def build_mim_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 2048, decoder_dim: int = 512,
                   decoder_depth: int = 8, decoder_heads: int = 16) -> nn.Module:
    if kind == "linear":
        return TokenHead(in_dim, out_dim)
    if kind == "mlp":
        return TokenHead(in_dim, out_dim, hidden_dim)
    if kind == "decoder":
        return MAEDecoder(in_dim, out_dim, decoder_dim, decoder_depth, decoder_heads)
    raise ValueError(f"method.head.kind must be one of {', '.join(HEADS)}, got {kind!r}")
