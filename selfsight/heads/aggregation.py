"""BEiT v2's patch aggregation (Peng et al. 2022a, "BEiT v2", §2.3 and Fig. 3; methods.md §12.2;
``beit2/modeling_pretrain.py:VisionTransformerForMaskedImageModelingCLS``).

Vanilla MIM trains the class token only weakly. BEiT v2 makes it summarise the image: the
final-layer class token is concatenated with the patch tokens of an EARLY layer l (9 of 12 for
ViT-B), the sequence goes through ``depth`` (2) fresh Transformer blocks, and the MIM head
(shared with the main branch, after the backbone's final norm) predicts the masked tokens again
from this branch's patch outputs:

    S_agg = Blocks_agg([h^L_cls ; h^l_1 .. h^l_N])          (pre-norm states, B×(1+N)×D)
    L = CE(head(norm(h^L)_M), ids_M) + CE(head(norm(S_agg)_M), ids_M)

The only way the aggregation branch sees the image beyond layer l is the final class token, so
the loss pushes global information into it. The extra blocks are thrown away after pretraining
(they are part of the method, not of the backbone that is evaluated and exported).

Blocks are timm's ``Block`` with the backbone's width, heads, MLP ratio and LayerScale; they use
the backbone's shared relative position bias when it has one. Initialisation as the official
code: trunc-normal(0.02) linears, zero biases, then the output projections (``attn.proj``,
``mlp.fc2``) divided by sqrt(2·(l + i + 1)) for extra block i.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from selfsight.nn.attention import attention_kernels, use_sdpa


class PatchAggregation(nn.Module):
    def __init__(self, backbone: nn.Module, early_layer: int, depth: int = 2):
        super().__init__()
        blocks = backbone.net.blocks
        if not 1 <= early_layer < len(blocks):
            raise ValueError(f"method.head.aggregation_layer must be in 1..{len(blocks) - 1} (the backbone has "
                             f"{len(blocks)} blocks; BEiT v2 uses 9 of 12), got {early_layer}")
        if depth < 1:
            raise ValueError(f"method.head.aggregation_depth must be >= 1, got {depth}")
        ref, dim = blocks[0], backbone.embed_dim
        gamma = getattr(ref.ls1, "gamma", None)         # LayerScale's value at construction = its init value
        init_values = float(gamma.detach().mean()) if gamma is not None else None
        self.early_layer = early_layer
        self.blocks = nn.ModuleList(
            Block(dim, ref.attn.num_heads, mlp_ratio=ref.mlp.fc1.out_features / dim, qkv_bias=True,
                  init_values=init_values, norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        use_sdpa(self.blocks)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
                    w.div_(math.sqrt(2.0 * (early_layer + i + 1)))

    def capture(self, backbone: nn.Module) -> tuple[dict, list]:
        """Forward hooks that keep the pre-norm outputs of block ``early_layer`` and of the last
        block during the next backbone forward; returns (states, handles) — remove the handles."""
        states: dict = {}
        blocks = backbone.net.blocks
        handles = [blocks[self.early_layer - 1].register_forward_hook(lambda m, a, out: states.__setitem__("early", out)),
                   blocks[-1].register_forward_hook(lambda m, a, out: states.__setitem__("last", out))]
        return states, handles

    def forward(self, states: dict, prefix: int = 1, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """states: {"early": B×(p+N)×D, "last": B×(p+N)×D} (p = ``prefix`` tokens) -> B×(1+N)×D
        pre-norm outputs of the aggregation branch (class token first)."""
        x = torch.cat([states["last"][:, :1], states["early"][:, prefix:]], 1)
        with attention_kernels(x):
            for blk in self.blocks:
                x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
        return x
