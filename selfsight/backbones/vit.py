"""timm Vision Transformers (Dosovitskiy et al. 2021), built with ``pretrained=False``.

``forward_features(x, mask)`` takes an optional boolean patch mask B×N (True = masked):
``mask_mode="token"`` replaces masked patch embeddings with a learned mask token before
the position embedding is added (BEiT, methods.md §0.1); ``mask_mode="drop"`` removes
them after it (MAE: cost scales with the visible tokens; every sample must keep the same
number of visible patches). ``enable_masking(mode)`` switches a built backbone to a mode
(masked image modeling methods call it on the backbone they are given).

``pos_embed="sincos"`` fixes the position embedding to MAE's 2-D sine-cosine table (class
token row zero, not trained); ``"learned"`` keeps timm's. ``depth`` > 0 overrides the number
of blocks (small ViTs for CPU budgets).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from selfsight.backbones.base import Features
from selfsight.nn.pos_embed import sincos_2d

SIZES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
         "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}


class ViTBackbone(nn.Module):
    def __init__(self, name: str = "vit_small", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 drop_path: float = 0.0, mask_mode: str = "none", pos_embed: str = "learned", depth: int = 0):
        super().__init__()
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"backbone.pos_embed must be learned or sincos, got {pos_embed!r}")
        extra = {"depth": depth} if depth > 0 else {}
        self.net = timm.create_model(SIZES[name], pretrained=False, num_classes=0, img_size=img_size,
                                     patch_size=patch_size, in_chans=in_chans, drop_path_rate=drop_path,
                                     dynamic_img_size=True, **extra)
        self.embed_dim = self.net.embed_dim
        self.patch_size = patch_size
        self.name = name
        self.mask_mode = "none"
        self.mask_token = None
        if pos_embed == "sincos":
            h, w = self.net.patch_embed.grid_size
            table = sincos_2d(self.embed_dim, h, w, cls_token=self.net.pos_embed.shape[1] == h * w + 1)
            self.net.pos_embed.data.copy_(table[None])
            self.net.pos_embed.requires_grad_(False)
        self.enable_masking(mask_mode)

    def enable_masking(self, mode: str) -> None:
        """``token``: masked patches become a learned mask token (trunc-normal 0.02, BEiT);
        ``drop``: masked patches are removed (MAE); ``none``: masks are refused."""
        if mode not in ("none", "token", "drop"):
            raise ValueError(f"mask_mode must be none, token or drop, got {mode!r}")
        self.mask_mode = mode
        if mode == "token" and self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Features:
        n = self.net
        if mask is not None and self.mask_mode == "none":
            raise ValueError("this ViT was built with mask_mode='none'; build it with 'token' or 'drop' to pass a mask")
        x = n.patch_embed(x)                                    # B×h×w×D (dynamic_img_size)
        if x.ndim == 4:
            b, h, w, d = x.shape
        else:
            b, _, d = x.shape
        if mask is not None and self.mask_mode == "token":
            tokens = x.reshape(b, -1, d)
            m = mask.reshape(b, -1, 1).to(tokens.dtype)
            tokens = tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m
            x = tokens.reshape(x.shape)
        x = n._pos_embed(x)                                      # B×(1+N)×D, class token prepended
        if mask is not None and self.mask_mode == "drop":
            keep = ~mask.reshape(b, -1)
            counts = keep.sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError("mask_mode='drop' needs the same number of visible patches in every sample")
            prefix = n.num_prefix_tokens
            patches = x[:, prefix:][keep].reshape(b, int(counts[0]), d)
            x = torch.cat([x[:, :prefix], patches], 1)
        x = n.norm_pre(x)
        x = n.blocks(x)
        x = n.norm(x)
        return Features(x[:, 0], x[:, n.num_prefix_tokens:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls
