"""The DINO head (Caron et al. 2021; official ``DINOHead``): layers, L2-normalized bottleneck,
weight-normalized last layer through the parametrization API with its norm frozen at 1."""
import torch
import torch.nn as nn

from selfsight.engine.optim import param_groups
from selfsight.heads.dino import DINOHead


def test_layers_bottleneck_and_weight_normed_last_layer():
    torch.manual_seed(0)
    h = DINOHead(32, out_dim=50, hidden_dim=64, bottleneck_dim=16, layers=3)
    assert [type(m).__name__ for m in h.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [type(m).__name__ for m in DINOHead(32, 50, 64, 16, 2, use_bn=True).mlp] == \
        ["Linear", "BatchNorm1d", "GELU", "Linear"]
    x = torch.randn(7, 32)
    z = h.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(7))
    g = h.last_layer.parametrizations.weight.original0
    v = h.last_layer.parametrizations.weight.original1
    assert g.shape == (50, 1) and not g.requires_grad and bool((g == 1).all())
    w = h.last_layer.weight                                                  # g · v / ||v|| per row
    torch.testing.assert_close(w, v / v.norm(dim=1, keepdim=True))
    torch.testing.assert_close(h(x), z @ w.T)
    assert h(x).abs().max() <= 1 + 1e-6                                      # cosines


def test_frozen_norm_stays_out_of_the_optimizer_and_a_free_norm_learns():
    frozen, free = DINOHead(8, 20, 16, 4, 2, norm_last_layer=True), DINOHead(8, 20, 16, 4, 2, norm_last_layer=False)
    ids = {id(p) for g in param_groups(frozen) for p in g["params"]}
    assert id(frozen.last_layer.parametrizations.weight.original0) not in ids
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    free(torch.randn(4, 8)).sum().backward()
    assert free.last_layer.parametrizations.weight.original0.grad is not None
    assert all(m.bias is not None for m in frozen.mlp if isinstance(m, nn.Linear))
