"""Every ViT attention in the package runs F.scaled_dot_product_attention (timm's fused path),
even when timm was told otherwise (TIMM_FUSED_ATTN=0): backbone blocks with and without BEiT's
relative position bias, MAE's decoder, BEiT v2's aggregation blocks."""
import pytest
import torch
import torch.nn.functional as F

from selfsight.backbones.vit import ViTBackbone
from selfsight.heads.aggregation import PatchAggregation
from selfsight.heads.mim import MAEDecoder


@pytest.fixture
def sdpa_calls(monkeypatch):
    import timm.layers.config
    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)      # as TIMM_FUSED_ATTN=0 would
    calls, real = [], F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_vit_blocks_use_sdpa(sdpa_calls, rel_pos_bias):
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=3, rel_pos_bias=rel_pos_bias)
    vit.forward_features(torch.randn(2, 1, 28, 28))
    assert len(sdpa_calls) == 3 and sdpa_calls[0][-2] == 17             # B×heads×(1+16)×d per block
    vit.get_intermediate_layers(torch.randn(2, 1, 28, 28), 2)
    assert len(sdpa_calls) == 6


def test_mae_decoder_and_aggregation_blocks_use_sdpa(sdpa_calls):
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=3, mask_mode="drop")
    dec = MAEDecoder(vit.embed_dim, 49, dim=32, depth=2, heads=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True
    f = vit.forward_features(torch.randn(2, 1, 28, 28), mask)
    dec(f.cls, f.patch, mask, (4, 4))
    assert len(sdpa_calls) == 3 + 2 and sdpa_calls[0][-2] == 5 and sdpa_calls[-1][-2] == 17
    agg = PatchAggregation(vit, early_layer=1, depth=2)
    assert all(blk.attn.fused_attn for blk in agg.blocks)
