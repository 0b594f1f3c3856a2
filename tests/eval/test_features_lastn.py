"""``--features lastN[+mean]`` (DINO's linear-probe features: the class tokens of the last N blocks, each
after the final norm, plus optionally the mean patch token of the last block) against a manual loop
over the timm blocks; ResNets refuse it clearly."""
import subprocess
import sys

import pytest
import torch
from helpers import normalized, tiny_overrides

from selfsight.backbones.features import backbone_features
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import parse_features


def reference_tokens(vit: ViTBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output tokens, each through the final norm, by hand from the timm modules."""
    net = vit.net
    t = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    bias = vit.rel_pos_bias.get_bias() if vit.rel_pos_bias is not None else None
    out = []
    for blk in net.blocks:
        t = blk(t) if bias is None else blk(t, attn_mask=bias)
        out.append(net.norm(t))
    return out


@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_last_n_matches_a_manual_loop_over_the_blocks(fmnist_small, rel_pos_bias):
    torch.manual_seed(0)
    vit = ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, depth=6, rel_pos_bias=rel_pos_bias).eval()
    if rel_pos_bias:                                      # zero-initialised: give it values so that it matters
        torch.nn.init.normal_(vit.rel_pos_bias.relative_position_bias_table, std=0.5)
    x = normalized(fmnist_small)[:8]
    with torch.no_grad():
        ref = reference_tokens(vit, x)
        d = vit.embed_dim
        last4 = backbone_features(vit, "last4")(x)
        assert last4.shape == (8, 4 * d)
        torch.testing.assert_close(last4, torch.cat([t[:, 0] for t in ref[-4:]], 1), rtol=1e-5, atol=1e-5)
        with_mean = backbone_features(vit, "last2+mean")(x)
        torch.testing.assert_close(with_mean, torch.cat([ref[-2][:, 0], ref[-1][:, 0], ref[-1][:, 1:].mean(1)], 1),
                                   rtol=1e-5, atol=1e-5)
        # last1 is the class token; all six blocks; the last layer equals forward_features
        torch.testing.assert_close(backbone_features(vit, "last1")(x), backbone_features(vit, "cls")(x))
        torch.testing.assert_close(backbone_features(vit, "last6")(x), torch.cat([t[:, 0] for t in ref], 1),
                                   rtol=1e-5, atol=1e-5)
        f = vit.forward_features(x)
        torch.testing.assert_close(torch.cat([f.cls[:, None], f.patch], 1), ref[-1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="last 7 blocks"):
            vit.get_intermediate_layers(x, 7)


def test_parse_features_and_resnets_refuse_last_n():
    from selfsight.backbones.resnet import ResNetBackbone
    assert parse_features("cls") == ("cls", 1, False)
    assert parse_features("last4") == ("last", 4, False) and parse_features("last12+mean") == ("last", 12, True)
    for bad in ("last0", "last", "lastx", "cls+last4", "mean+cls"):
        with pytest.raises(ValueError, match="lastN"):
            parse_features(bad)
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        backbone_features(ResNetBackbone("resnet10", in_chans=1, width=8), "last4")


def test_cli_features_option(tmp_path, fmnist_small):
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    run = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 1})), run, dataset=fmnist_small)
    base = [sys.executable, "-m", "selfsight", "eval", "knn", str(run), "--train", "fashion-mnist:test",
            "--test", "fashion-mnist:test", "--features"]
    p = subprocess.run(base + ["bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "lastN" in p.stderr
    p = subprocess.run(base + ["last4"], capture_output=True, text=True)       # a ResNet run: one clear line
    assert p.returncode == 2 and "needs a ViT backbone" in p.stderr and "Traceback" not in p.stderr
