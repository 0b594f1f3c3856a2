"""Gradient clipping: global norm (torch's clip_grad_norm_) and DINO's per-parameter rule."""
import pytest
import torch

from selfsight.engine.optim import clip_gradients


def params_with_grads(scales):
    ps = []
    for i, s in enumerate(scales):
        p = torch.nn.Parameter(torch.zeros(3 + i))
        p.grad = torch.randn(3 + i, generator=torch.Generator().manual_seed(i)) * s
        ps.append(p)
    return ps


def test_per_parameter_clipping_scales_each_tensor_on_its_own():
    ps = params_with_grads([0.01, 10.0, 100.0])
    before = [p.grad.clone() for p in ps]
    clip_gradients(ps, 3.0, "per_param")
    for p, g in zip(ps, before):
        n = g.norm().item()
        expect = g * min(1.0, 3.0 / (n + 1e-6))                     # official utils.clip_gradients
        torch.testing.assert_close(p.grad, expect)
    assert ps[0].grad.norm() < 0.1 and ps[2].grad.norm().item() == pytest.approx(3.0, rel=1e-5)


def test_global_clipping_scales_all_tensors_together():
    ps = params_with_grads([1.0, 10.0])
    before = [p.grad.clone() for p in ps]
    total = torch.sqrt(sum(g.norm() ** 2 for g in before))
    clip_gradients(ps, 1.0, "global")
    for p, g in zip(ps, before):
        torch.testing.assert_close(p.grad, g / (total + 1e-6), rtol=1e-5, atol=1e-7)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="clip_mode"):
        clip_gradients(params_with_grads([1.0]), 1.0, "layerwise")
