"""BEiT v2's patch aggregation (heads/aggregation.py, methods/mim.py) on real Fashion-MNIST images:
the second loss equals a reference written out block by block (final class token + early patch
tokens -> extra blocks -> shared norm and head, masked positions only), with and without the
shared relative position bias; only the early blocks, the class token's path and the extra blocks
get its gradient; bad settings are refused with the key named."""
import pytest
import torch

from selfsight.backbones.vit import ViTBackbone
from selfsight.methods import build_method
from selfsight.methods.mim import MIM, MIMParams
from selfsight.resolve import load_config
from selfsight.targets import patchify


def params(layer=1, depth=1) -> MIMParams:
    p = MIMParams(student_input="dense", loss="l2")
    p.target.kind, p.target.norm, p.head.kind = "pixels", "none", "linear"
    p.mask.kind, p.mask.ratio = "block", 0.4
    p.head.aggregation_layer, p.head.aggregation_depth = layer, depth
    return p


def images(fmnist_small, n=6):
    return (fmnist_small.images[:n].float() / 255 - 0.5) / 0.5                  # B×1×28×28


def reference_aggregation_loss(m: MIM, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official forward written out: mask tokens, blocks up to l, the rest, then the branch."""
    s, net, l = m.student, m.student.net, m.params.head.aggregation_layer
    tok = net.patch_embed(x)                                                    # B×h×w×D
    b, h, w, d = tok.shape
    tok = tok.reshape(b, h * w, d)
    tok = torch.where(mask[..., None], s.mask_token.expand(b, h * w, d), tok)
    seq = net._pos_embed(tok.reshape(b, h, w, d))                               # B×(1+N)×D
    bias = s.rel_pos_bias.get_bias() if s.rel_pos_bias is not None else None
    run = (lambda blk, t: blk(t)) if bias is None else (lambda blk, t: blk(t, attn_mask=bias))
    for blk in net.blocks[:l]:
        seq = run(blk, seq)
    early = seq
    for blk in net.blocks[l:]:
        seq = run(blk, seq)
    agg = torch.cat([seq[:, :1], early[:, 1:]], 1)
    for blk in m.aggregation.blocks:
        agg = run(blk, agg)
    pred = m.head.net(net.norm(agg)[:, 1:][mask])                              # M×16
    target = patchify(x, 4)[mask]
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_second_loss_equals_a_block_by_block_reference(fmnist_small, rel_pos_bias):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=3, layer_scale=0.1,
                      rel_pos_bias=rel_pos_bias, pos_embed="none" if rel_pos_bias else "learned")
    if rel_pos_bias:                                     # a non-zero table, so that the bias matters
        torch.nn.init.normal_(vit.rel_pos_bias.relative_position_bias_table, std=0.5)
    m = MIM(params(layer=2, depth=2), vit)
    x = images(fmnist_small)
    mask = m.masker([x], 0)[0].reshape(x.shape[0], -1)
    out = m({"views": [x], "masks": [mask]}, {})
    ref = reference_aggregation_loss(m, x, mask)
    torch.testing.assert_close(out["monitor"]["aggregation_loss"], ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["monitor"]["mim_loss"] + ref, rtol=1e-5, atol=1e-6)
    assert len(m.aggregation.blocks) == 2
    assert float(m.aggregation.blocks[0].ls1.gamma.detach().mean()) == pytest.approx(0.1)    # the backbone's LayerScale


def test_gradient_paths_and_the_branch_is_not_part_of_the_backbone(fmnist_small):
    """The aggregation loss reaches the extra blocks, the early blocks (through the early patch
    tokens) and the later blocks (only through the final class token)."""
    torch.manual_seed(0)
    m = MIM(params(layer=1, depth=1), ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=3))
    x = images(fmnist_small)
    mask = m.masker([x], 0)[0].reshape(x.shape[0], -1)
    _, _, _, _, agg = m.encode(x, mask, aggregate=True)
    loss = m._masked_loss(agg, patchify(x, 4), mask)
    weights = [m.aggregation.blocks[0].attn.qkv.weight, m.student.net.blocks[0].attn.qkv.weight,
               m.student.net.blocks[2].mlp.fc2.weight]
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(k.startswith("aggregation") for k in m.backbone.state_dict())
    assert any(k.startswith("aggregation.blocks.0") for k in m.state_dict())    # checkpointed with the method
    assert not m.student.net.blocks[0]._forward_hooks                          # the capture hooks are removed


def test_the_branch_runs_in_training_and_is_refused_where_it_cannot_work(fmnist_small):
    cfg = load_config(None, ["method.name=beitv2", "backbone.name=vit_tiny", "backbone.depth=4",
                             "backbone.patch_size=4", "views.size=28", "method.target.kind=pixels",
                             "method.target.norm=none", "method.loss=l2", "method.head.aggregation_layer=3"])
    m = build_method(cfg, 1, 28)
    assert m.aggregation is not None and m.aggregation.early_layer == 3
    with pytest.raises(ValueError, match="aggregation_layer must be in 1..3"):
        build_method(load_config(None, ["method.name=beitv2", "backbone.name=vit_tiny", "backbone.depth=4",
                                        "backbone.patch_size=4", "views.size=28", "method.target.kind=pixels",
                                        "method.target.norm=none", "method.loss=l2"]), 1, 28)   # preset: 9 of 12
    p = params()
    p.student_input, p.head.kind, p.mask.kind = "sparse", "decoder", "random"
    with pytest.raises(ValueError, match="student_input=dense"):
        MIM(p, ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, depth=2))


def test_a_run_saved_before_the_branch_existed_loads_without_it(tmp_path):
    """A checkpoint's config is fully resolved: keys added later take their plain default (off),
    not the preset's value, so a BEiT v2 run of a 6-block ViT saved before this key still loads."""
    from selfsight.config import to_dict
    from selfsight.resolve import build_config
    cfg = load_config(None, ["method.name=beitv2", "backbone.name=vit_tiny", "backbone.depth=6", "backbone.patch_size=4",
                             "views.size=28", "method.target.kind=pixels", "method.target.norm=none",
                             "method.loss=l2", "method.head.aggregation_layer=0"])
    saved = to_dict(cfg)
    del saved["method"]["head"]["aggregation_layer"], saved["method"]["head"]["aggregation_depth"]
    assert build_config(saved, resolved=True).method.head.aggregation_layer == 0
    with pytest.raises(ValueError, match="aggregation_layer must be in 1..5"):
        build_method(build_config(saved), 1, 28)                     # the preset's 9 would apply again
