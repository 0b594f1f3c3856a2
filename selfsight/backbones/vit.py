"""timm Vision Transformers (Dosovitskiy et al. 2021), built with ``pretrained=False``.

``forward_features(x, mask)`` takes an optional boolean patch mask B×N (True = masked):
``mask_mode="token"`` replaces masked patch embeddings with a learned mask token before
the position embedding is added (BEiT, methods.md §0.1); ``mask_mode="drop"`` removes
them after it (MAE: cost scales with the visible tokens; every sample must keep the same
number of visible patches). ``enable_masking(mode)`` switches a built backbone to a mode
(masked image modeling methods call it on the backbone they are given).

``pos_embed="sincos"`` fixes the position embedding to MAE's 2-D sine-cosine table (class
token row zero, not trained); ``"learned"`` keeps timm's. ``depth`` > 0 overrides the number
of blocks (small ViTs for CPU budgets). ``layer_scale`` > 0 turns on LayerScale with that
initial value (timm ``init_values``; BEiT uses 0.1; DINOv2 1e-5). ``registers`` > 0 adds that many
register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"; timm ``reg_tokens``):
extra learned tokens after the class token that every block attends to and nothing reads out;
they are never patch tokens (``Features.patch`` and every dense output skip ``num_prefix_tokens``).
``rel_pos_bias=True`` adds BEiT's shared
relative position bias (Bao et al. 2022, §2.2; ``beit/modeling_pretrain.py``: one table of
(2h−1)(2w−1)+3 entries per head, class-token rows included, zero-initialised, added to the
attention logits of every block); ``pos_embed="none"`` then drops the absolute embedding (BEiT's
``use_abs_pos_emb=False``).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.layers.pos_embed_rel import RelPosBias

from selfsight.backbones.base import Features
from selfsight.nn.attention import attention_kernels, use_sdpa
from selfsight.nn.checkpointing import checkpointed
from selfsight.nn.pos_embed import sincos_2d
from selfsight.nn.tokens import visible_index

SIZES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
         "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}


class ViTBackbone(nn.Module):
    """``name``: one of ``SIZES`` built here, or any name when ``net`` is an existing timm
    ``VisionTransformer`` (``timm:NAME`` backbones, registers and other poolings included)."""

    def __init__(self, name: str = "vit_small", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 drop_path: float = 0.0, mask_mode: str = "none", pos_embed: str = "learned", depth: int = 0,
                 layer_scale: float = 0.0, rel_pos_bias: bool = False, grad_checkpointing: bool = False,
                 registers: int = 0, net: nn.Module | None = None, class_token: bool = True):
        super().__init__()
        if pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"backbone.pos_embed must be learned, sincos or none, got {pos_embed!r}")
        if net is None:
            extra = {"depth": depth} if depth > 0 else {}
            if layer_scale > 0:                 # LayerScale (Touvron et al. 2021, CaiT Eq. 4; BEiT init 0.1)
                extra["init_values"] = layer_scale
            if registers > 0:                   # register tokens (Darcet et al. 2024), after the class token
                extra["reg_tokens"] = registers
            if not class_token:                 # the image feature: the mean of the final-normed patch tokens
                extra.update(class_token=False, global_pool="avg", fc_norm=False)
            net = timm.create_model(SIZES[name], pretrained=False, num_classes=0, img_size=img_size,
                                    patch_size=patch_size, in_chans=in_chans, drop_path_rate=drop_path,
                                    dynamic_img_size=True, **extra)
        self.net = net
        self.embed_dim = self.net.embed_dim
        self.patch_size = int(self.net.patch_embed.patch_size[0])
        self.name = name
        self.mask_mode = "none"
        self.mask_token = None
        if pos_embed == "sincos":
            h, w = self.net.patch_embed.grid_size
            prefix = self.net.pos_embed.shape[1] - h * w          # class and register tokens with a row
            table = sincos_2d(self.embed_dim, h, w)
            self.net.pos_embed.data.copy_(torch.cat([table.new_zeros(prefix, self.embed_dim), table])[None])
            self.net.pos_embed.requires_grad_(False)
        elif pos_embed == "none":                      # BEiT with a relative position bias: no absolute one
            self.net.pos_embed.data.zero_()
            self.net.pos_embed.requires_grad_(False)
        self.rel_pos_bias = None
        if rel_pos_bias:     # BEiT's shared relative position bias (one table for all blocks), zero-initialised
            self.rel_pos_bias = RelPosBias(tuple(self.net.patch_embed.grid_size), self.net.blocks[0].attn.num_heads,
                                           prefix_tokens=self.net.num_prefix_tokens)
            nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
        self.enable_masking(mask_mode)
        self.net.set_grad_checkpointing(grad_checkpointing)     # honoured block by block in forward_features
        use_sdpa(self.net)

    def enable_masking(self, mode: str) -> None:
        """``token``: masked patches become a learned mask token (trunc-normal 0.02, BEiT);
        ``drop``: masked patches are removed (MAE); ``none``: masks are refused."""
        if mode not in ("none", "token", "drop"):
            raise ValueError(f"mask_mode must be none, token or drop, got {mode!r}")
        self.mask_mode = mode
        if mode == "token" and self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None, visible: int | None = None) -> torch.Tensor:
        """Patch embedding, mask token or dropped patches, position embedding, class token:
        the tokens B×(1+N)×D (drop: B×(1+visible)×D) that enter the first block.

        ``visible``: the number of unmasked patches per sample when the caller knows it (MAE's
        fixed ratio): the visible tokens are then gathered without reading anything back from the
        device. Without it, the count is read from the mask (one host read) and checked."""
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
            if visible is None:
                counts = keep.sum(1)
                if not bool((counts == counts[0]).all()):
                    raise ValueError("mask_mode='drop' needs the same number of visible patches in every sample")
                visible = int(counts[0])
            prefix = n.num_prefix_tokens
            patches = x[:, prefix:].gather(1, visible_index(keep, visible)[..., None].expand(-1, -1, d))
            x = torch.cat([x[:, :prefix], patches], 1)
        return n.norm_pre(x)

    def _attn_bias(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.rel_pos_bias is None:
            return None
        if x.shape[1] != self.rel_pos_bias.bias_shape[0]:
            raise ValueError("backbone.rel_pos_bias needs every patch of the grid it was built for (dense "
                             f"input at the build size): got {x.shape[1]} tokens, built for "
                             f"{self.rel_pos_bias.bias_shape[0]}")
        return self.rel_pos_bias.get_bias().to(x.dtype)         # 1×heads×(1+N)×(1+N), added to QKᵀ/√d

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         visible: int | None = None) -> Features:
        n = self.net
        x = self._embed(x, mask, visible)
        bias = self._attn_bias(x)
        if n.grad_checkpointing and torch.is_grad_enabled():
            for blk in n.blocks:        # each block recomputed in backward, under the same kernel choice
                x = checkpointed(blk, _block, blk, x, bias)
        else:
            with attention_kernels(x):
                if bias is None:
                    x = n.blocks(x)
                else:
                    for blk in n.blocks:
                        x = blk(x, attn_mask=bias)
        x = n.norm(x)
        return Features(self._pool(x), x[:, n.num_prefix_tokens:])

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The image feature of the final tokens: the class token, or the model's own pooling
        (average over the patches, attention pooling) for timm ViTs without one. Register tokens
        are never patch tokens (``num_prefix_tokens`` counts them)."""
        n = self.net
        if getattr(n, "global_pool", "token") == "token" and getattr(n, "cls_token", None) is not None:
            return x[:, 0]
        return n.forward_head(x, pre_logits=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The tokens B×(1+N)×D after each of the last ``n`` blocks, each passed through the final
        norm (DINO ``get_intermediate_layers``, used by its ``eval_linear.py``); the last entry
        equals ``forward_features``'s tokens."""
        net = self.net
        depth = len(net.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"asked for the last {n} blocks of a ViT with {depth}")
        x = self._embed(x)
        out = []
        with attention_kernels(x):
            bias = self._attn_bias(x)
            for i, blk in enumerate(net.blocks):
                x = blk(x) if bias is None else blk(x, attn_mask=bias)
                if i >= depth - n:
                    out.append(net.norm(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls


def _block(blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One transformer block with its attention-kernel choice (also when recomputed in backward)."""
    with attention_kernels(x):
        return blk(x) if bias is None else blk(x, attn_mask=bias)
