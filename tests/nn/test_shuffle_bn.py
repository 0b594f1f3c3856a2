"""Shuffle-BN and SplitBatchNorm (MoCo, He et al. 2019 §3.3) on real Fashion-MNIST images."""
import pytest
import torch
import torch.nn as nn

from selfsight.backbones.resnet import ResNetBackbone
from selfsight.nn.shuffle_bn import SplitBatchNorm, convert_split_bn, shuffled_forward
from selfsight.nn.sync_bn import convert_sync_batchnorm


def images(fmnist_small, n=16):
    return fmnist_small.images[:n].float().div(255).sub(0.5).div(0.5)


def encoder(splits=1):
    torch.manual_seed(0)
    net = ResNetBackbone("resnet10", in_chans=1, small_stem="s2", width=8)
    return convert_split_bn(net, splits) if splits > 1 else net


def test_shuffled_forward_permutes_then_restores_the_order(fmnist_small):
    x = images(fmnist_small)
    net = encoder().eval()                    # eval BN: each output depends on its own sample only
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    torch.manual_seed(3)
    out = shuffled_forward(net, x)
    plain = net(x)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)          # sample by sample
    fed = seen[0]
    assert not torch.equal(fed, x), "the encoder saw the batch in its original order"
    order = [int(((x - row).abs().sum((1, 2, 3)) == 0).nonzero()) for row in fed]
    assert sorted(order) == list(range(len(x)))                          # a permutation of the batch


def test_split_bn_equals_separate_batch_norms_per_chunk(fmnist_small):
    torch.manual_seed(1)
    x = torch.randn(12, 6, 5, 5)
    split = SplitBatchNorm(6, num_splits=3)
    refs = [nn.BatchNorm2d(6) for _ in range(3)]
    with torch.no_grad():
        split.weight.uniform_(0.5, 1.5)
        split.bias.uniform_(-1, 1)
        for r in refs:
            r.weight.copy_(split.weight)
            r.bias.copy_(split.bias)
    out = split(x)
    want = torch.cat([r(c) for r, c in zip(refs, x.chunk(3))])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(split.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    with pytest.raises(ValueError, match="bn_splits"):
        split(torch.randn(10, 6, 5, 5))
    split.eval()
    torch.testing.assert_close(split(x), nn.functional.batch_norm(x, split.running_mean, split.running_var,
                                                                  split.weight, split.bias, False))


def test_split_bn_in_training_differs_from_whole_batch_bn_and_keeps_weights(fmnist_small):
    x = images(fmnist_small)
    whole, split = encoder(), encoder(4)
    assert sum(isinstance(m, SplitBatchNorm) for m in split.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in whole.modules()) > 5
    split.load_state_dict(whole.state_dict())          # same keys: checkpoints are interchangeable
    assert not torch.allclose(split(x), whole(x), atol=1e-3)
    split.load_state_dict(whole.state_dict())          # the running statistics moved differently
    torch.testing.assert_close(split.eval()(x), whole.eval()(x))


def test_sync_bn_conversion_leaves_shuffle_bn_models_alone():
    net = encoder(2)
    assert convert_sync_batchnorm(net, "cpu") is net
