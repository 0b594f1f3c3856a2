"""backbone.grad_checkpointing: the same gradients (and BN statistics) as without it on real
images, with far fewer activations kept for backward."""
import copy

import torch
import torch.nn.functional as F
from helpers import normalized

from selfsight.backbones.resnet import ResNetBackbone
from selfsight.backbones.vit import ViTBackbone


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward outside checkpointed segments, while ``fn`` runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def grads_with_and_without(net, x, enable, seed=0):
    results = []
    for on in (False, True):
        m = copy.deepcopy(net)
        enable(m, on)
        torch.manual_seed(seed)                      # same drop-path draws in both runs
        kept, feats = saved_bytes(lambda: m.forward_features(x))
        (feats.cls.square().mean() + feats.patch.mean()).backward()
        results.append((kept, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}, m))
    return results


def test_resnet_stages_checkpointed_same_gradients_and_bn_statistics(fmnist_small):
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", 1, "s2", width=8)
    x = normalized(fmnist_small)[:32]

    def enable(m, on):
        m.grad_checkpointing = on
    (kept0, g0, m0), (kept1, g1, m1) = grads_with_and_without(net, x, enable)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
    for (k, b0), b1 in zip(m0.named_buffers(), m1.buffers()):      # running stats moved once, not twice
        torch.testing.assert_close(b1, b0, msg=k)
    assert kept1 < kept0 / 3, (kept0, kept1)


def test_vit_blocks_checkpointed_same_gradients_and_fewer_saved_activations(fmnist_small):
    torch.manual_seed(0)
    net = ViTBackbone("vit_tiny", img_size=64, patch_size=8, in_chans=1, depth=4, drop_path=0.1)
    x = F.interpolate(normalized(fmnist_small)[:16], size=64, mode="bilinear", align_corners=False)

    def enable(m, on):
        m.net.set_grad_checkpointing(on)
    (kept0, g0, _), (kept1, g1, _) = grads_with_and_without(net, x, enable)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
    assert kept1 < kept0 / 4, (kept0, kept1)        # 4 blocks: only their inputs are kept
