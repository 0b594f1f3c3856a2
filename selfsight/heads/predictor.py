"""I-JEPA's predictor (Assran et al. 2023, §3 "Prediction"; ijepa ``src/models/vision_transformer.py``
``VisionTransformerPredictor``): a narrow ViT that reads the context encoder's tokens and, for each
target block, mask tokens at the block's positions, and predicts the target encoder's tokens there.

    context tokens B×Kc×D -> Linear D->d, + sin-cos position of each context patch
    per target block m: mask token + sin-cos position of each target patch       (B·M)×Kt×d
    [context ; mask tokens] -> depth blocks -> LayerNorm -> the Kt mask-token outputs -> Linear d->D

The context is repeated once per target block (the official ``repeat_interleave_batch``), so each
block is predicted from the context alone, never from another block's mask tokens. Weights: truncated
normal (std 0.02) for Linear layers and the mask token, LayerNorm 1/0, and the official rescaling of
each block's output projections by 1/sqrt(2·layer) (``fix_init_weight``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from selfsight.nn.attention import attention_kernels, use_sdpa
from selfsight.nn.device import to_device
from selfsight.nn.pos_embed import sincos_2d


class JEPAPredictor(nn.Module):
    def __init__(self, embed_dim: int, dim: int = 384, depth: int = 6, heads: int = 12):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        use_sdpa(self.blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        self.dim = dim
        self._pos: dict = {}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for layer, blk in enumerate(self.blocks, 1):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))

    def pos_embed(self, grid: tuple, device) -> torch.Tensor:
        key = (tuple(grid), str(device))
        if key not in self._pos:                                       # fixed, never trained
            self._pos[key] = to_device(sincos_2d(self.dim, grid[0], grid[1]), device)
        return self._pos[key]                                          # N×d

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                grid: tuple) -> torch.Tensor:
        """context B×Kc×D (the tokens at ``context_idx`` B×Kc), target_idx B×M×Kt -> B×M×Kt×D."""
        b, m, kt = target_idx.shape
        pos = self.pos_embed(grid, context.device)
        x = self.embed(context)
        x = x + pos[context_idx].to(x.dtype)                            # B×Kc×d
        x = x.repeat_interleave(m, 0)                                   # (B·M)×Kc×d, block m of image i at i·M+m
        queries = self.mask_token.to(x.dtype) + pos[target_idx.reshape(b * m, kt)].to(x.dtype)   # (B·M)×Kt×d
        z = torch.cat([x, queries], 1)
        with attention_kernels(z):
            for blk in self.blocks:
                z = blk(z)
        out = self.proj(self.norm(z[:, -kt:]))                          # (B·M)×Kt×D
        return out.reshape(b, m, kt, -1)
