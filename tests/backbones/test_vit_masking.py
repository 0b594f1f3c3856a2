"""ViT student inputs for masked image modeling: the sparse (MAE) encoder against a dense
reference that attends only to the visible tokens; mask tokens; the fixed sin-cos embedding."""
import math

import numpy as np
import pytest
import torch

from selfsight.backbones.vit import ViTBackbone
from selfsight.masking import MaskGenerator
from selfsight.nn.pos_embed import sincos_2d


def images(fmnist_small, n=4):
    return (fmnist_small.images[:n].float() / 255 - 0.5) / 0.5                 # real images, B×1×28×28


def dense_reference(vit: ViTBackbone, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """All tokens through the blocks with attention written out by hand, keys restricted to
    the class token and the visible patches (``bias``: H×L×L added to every block's attention
    logits); returns every position's output."""
    n = vit.net
    t = n._pos_embed(n.patch_embed(x))                                        # B×(1+N)×D
    b, length, d = t.shape
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), ~mask], 1)          # B×(1+N)
    for blk in n.blocks:
        a = blk.attn
        h = blk.norm1(t)
        qkv = a.qkv(h).reshape(b, length, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                        # B×H×L×d
        logits = q @ k.transpose(-2, -1) / math.sqrt(d // a.num_heads)
        if bias is not None:
            logits = logits + bias
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, length, d)
        t = t + a.proj(att)
        t = t + blk.mlp(blk.norm2(t))
    return n.norm(t)


def test_sparse_encoder_equals_dense_reference_on_visible_tokens(fmnist_small):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, mask_mode="drop", depth=3).eval()
    x = images(fmnist_small)
    mask = MaskGenerator("random", 0.75)(4, 7, 7, seed=3)                     # 37 of 49 masked per image
    with torch.no_grad():
        sparse = vit.forward_features(x, mask)
        ref = dense_reference(vit, x, mask)
    assert sparse.patch.shape == (4, 12, 192)
    torch.testing.assert_close(sparse.cls, ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.patch, ref[:, 1:][~mask].reshape(4, 12, 192), rtol=1e-4, atol=1e-4)
    # given the visible count (MIM passes MaskGenerator.visible: no host read), the same tokens
    assert MaskGenerator("random", 0.75).visible(49) == 12
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x, mask, visible=12).patch, sparse.patch)
    # a different mask changes the result (the reference is not trivially equal)
    other = MaskGenerator("random", 0.75)(4, 7, 7, seed=4)
    with torch.no_grad():
        assert not torch.allclose(vit.forward_features(x, other).cls, sparse.cls, atol=1e-3)


def test_visible_count_is_known_only_when_every_mask_has_it():
    assert MaskGenerator("random", 0.6).visible(196) == int(196 * 0.4)
    assert MaskGenerator("random", 0.6, ratio_range=(0.1, 0.5)).visible(196) is None
    assert MaskGenerator("random", 0.6, unmasked_share=0.5).visible(196) is None
    assert MaskGenerator("block", 0.4).visible(196) is None
    for batch, n in ((3, 49), (8, 196)):         # the count it states is the count every mask has
        m = MaskGenerator("random", 0.75)(batch, 7 if n == 49 else 14, 7 if n == 49 else 14, seed=1)
        assert ((~m).sum(1) == MaskGenerator("random", 0.75).visible(n)).all()


def test_sparse_input_needs_equal_visible_counts(fmnist_small):
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, mask_mode="drop", depth=1)
    mask = MaskGenerator("block", 0.4)(4, 7, 7, seed=0)
    if (mask.sum(1) == mask.sum(1)[0]).all():
        mask[0, (~mask[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="same number of visible patches"):
        vit.forward_features(images(fmnist_small), mask)


def test_mask_tokens_replace_masked_patches_before_the_position_embedding(fmnist_small):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=1)
    assert vit.mask_token is None
    vit.enable_masking("token")
    assert vit.mask_token is not None and vit.mask_token.requires_grad
    x = images(fmnist_small, 2)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, 10:20] = True
    seen = {}
    vit.net.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", i[0].detach()))
    vit.forward_features(x, mask)
    expect = vit.mask_token[0, 0] + vit.net.pos_embed[0, 1:][mask[0]]
    torch.testing.assert_close(seen["tokens"][0, 1:][mask[0]], expect.detach().expand(10, -1))
    x2 = x.clone()
    x2[:, :, 8:12, 8:24] = 5.0                                                # pixels of masked patches 16..19 change
    with torch.no_grad():
        vit.eval()
        a, b = vit.forward_features(x, mask), vit.forward_features(x2, mask)
    patches_changed = torch.zeros(49, dtype=torch.bool)
    patches_changed[16:20] = True
    assert not (patches_changed & ~mask[0]).any()
    torch.testing.assert_close(a.cls, b.cls)                                   # masked content is invisible


def test_sincos_table_matches_maes_formula_and_stays_fixed():
    d, h, w = 16, 3, 5
    # MAE util/pos_embed.py, written out: half the channels for each axis, [sin, cos] of pos·ω
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d // 4))
    ref = []
    for r in range(h):
        for c in range(w):
            ref.append(np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]))
    table = sincos_2d(d, h, w, cls_token=True)
    np.testing.assert_allclose(table[1:].numpy(), np.array(ref), rtol=1e-6, atol=1e-6)
    assert (table[0] == 0).all()
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=1, pos_embed="sincos")
    assert not vit.net.pos_embed.requires_grad
    torch.testing.assert_close(vit.net.pos_embed[0], sincos_2d(192, 7, 7, cls_token=True))
    with pytest.raises(ValueError, match="pos_embed"):
        ViTBackbone("vit_tiny", img_size=28, patch_size=4, pos_embed="rope")


def beit_relative_index(h: int, w: int) -> torch.Tensor:
    """BEiT's relative position index (beit/modeling_pretrain.py), written out: patches i, j at
    (y, x) get (dy + h - 1)·(2w - 1) + (dx + w - 1); then class->patch, patch->class and
    class->class take the last three entries. (1+hw)×(1+hw) long."""
    r = (2 * h - 1) * (2 * w - 1)
    idx = torch.empty(1 + h * w, 1 + h * w, dtype=torch.long)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            idx[1 + i, 1 + j] = (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
    idx[0, 1:], idx[1:, 0], idx[0, 0] = r, r + 1, r + 2
    return idx


def test_shared_relative_position_bias_is_beits_and_added_to_every_block(fmnist_small):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2, rel_pos_bias=True,
                      pos_embed="none").eval()
    table = vit.rel_pos_bias.relative_position_bias_table
    assert table.shape == (13 * 13 + 3, 3) and not table.any()                # zero-initialised, 3 heads
    assert not vit.net.pos_embed.any() and not vit.net.pos_embed.requires_grad
    with torch.no_grad():
        table.normal_()                                                        # a trained-looking table
    x = images(fmnist_small)
    bias = table[beit_relative_index(7, 7)].permute(2, 0, 1)                   # H×L×L
    with torch.no_grad():
        out = vit.forward_features(x)
        ref = dense_reference(vit, x, torch.zeros(4, 49, dtype=torch.bool), bias)
    torch.testing.assert_close(out.cls, ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.patch, ref[:, 1:], rtol=1e-4, atol=1e-4)
    vit.train()
    vit.forward_features(x).cls.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0               # one table, trained
    vit.enable_masking("drop")
    with pytest.raises(ValueError, match="rel_pos_bias"):
        vit.forward_features(x, MaskGenerator("random", 0.75)(4, 7, 7, seed=0))
