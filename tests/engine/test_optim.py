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


def test_adamw_is_fused_on_the_cpu_and_matches_the_reference_update():
    from selfsight.config import OptimConfig
    from selfsight.engine.optim import build_optimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    ref = torch.nn.Linear(6, 4)
    ref.load_state_dict(model.state_dict())
    cfg = OptimConfig(name="adamw", betas=(0.9, 0.95), weight_decay=0.05, decay_all=True)
    opt = build_optimizer(model, cfg, "cpu")
    assert opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)   # per-tensor loop
    for group in opt.param_groups:
        group["lr"] = 1e-2
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
