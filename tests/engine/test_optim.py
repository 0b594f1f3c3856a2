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


def test_lars_matches_the_formula_over_steps_and_a_skipped_step_moves_nothing():
    """LARS (You et al. 2017, FAIR flavour) against a per-parameter reference written from the
    formula: dp = g + wd·p, dp *= eta·||p||/||dp|| (both norms > 0), mu = m·mu + dp, p -= lr·mu; groups
    without ``lars``: plain momentum. Three steps (momentum carries over), then one step whose
    gradients are NaN under ``found_inf``: parameters and momentum stay as they were."""
    from selfsight.engine.optim import LARS, param_groups
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    with torch.no_grad():
        net[2].weight.zero_()                       # ||p|| = 0: trust 1
    opt = LARS(param_groups(net), lr=0.3, weight_decay=0.05, momentum=0.9, trust_coefficient=1e-3)
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    mu = {n: torch.zeros_like(p) for n, p in ref.items()}
    lars = {n for n, p in net.named_parameters() if p.ndim > 1}
    x = torch.randn(16, 6)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        for n, p in net.named_parameters():
            dp = p.grad.clone()
            if n in lars:
                dp = dp + 0.05 * ref[n]
                pn, dn = ref[n].norm(), dp.norm()
                dp = dp * (1e-3 * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu[n] = 0.9 * mu[n] + dp
            ref[n] = ref[n] - 0.3 * mu[n]
        opt.step()
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n])
            torch.testing.assert_close(opt.state[p]["mu"], mu[n])
    before = [(p.detach().clone(), opt.state[p]["mu"].clone()) for p in net.parameters()]
    for p in net.parameters():
        p.grad.fill_(float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for p, (p0, mu0) in zip(net.parameters(), before):
        assert torch.equal(p.detach(), p0) and torch.equal(opt.state[p]["mu"], mu0)
    opt.found_inf = torch.tensor(0.0)               # the masked path, taken: the plain update
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for (n, p), (p0, mu0) in zip(net.named_parameters(), before):
        dp = grads[n]
        if n in lars:
            dp = dp + 0.05 * p0
            pn, dn = p0.norm(), dp.norm()
            dp = dp * (1e-3 * pn / dn if pn > 0 and dn > 0 else 1.0)
        torch.testing.assert_close(p.detach(), p0 - 0.3 * (0.9 * mu0 + dp))


@pytest.mark.parametrize("method, recipe, decays_all", [
    ("simsiam", None, True), ("mocov2", None, True), ("mocov1", None, True), ("simclr", None, False),
    ("byol", None, False), ("simsiam", "simsiam_cifar10", True), ("mocov2", "mocov2_cifar10", True),
    ("simsiam", "simsiam_fashion_mnist", False), ("mocov2", "mocov2_fashion_mnist", False)])
def test_weight_decay_reaches_norms_and_biases_where_the_official_code_puts_it(method, recipe, decays_all):
    """SimSiam's and MoCo v1/v2's official SGD take model.parameters() whole (decay on BN and biases);
    SimCLR's and BYOL's LARS exclude them. The tuned Fashion-MNIST recipes keep what they were measured with."""
    from selfsight.engine.optim import param_groups
    from selfsight.resolve import load_config
    cfg = load_config([recipe] if recipe else None, overrides=[f"method.name={method}"])
    assert cfg.optim.decay_all is decays_all
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    bn_group = next(g for g in param_groups(net, cfg.optim.decay_all) if any(p is net[1].weight for p in g["params"]))
    assert (bn_group.get("weight_decay") != 0.0) is decays_all


@pytest.mark.parametrize("clip_mode", ["global", "per_param"])
def test_the_update_after_backward_never_makes_the_host_wait(clip_mode):
    """Finiteness check, clipping and a LARS step skipped or taken on the device: no blocking upload
    and no read back (``meta`` device, conftest.HostWaits)."""
    from helpers import HostWaits

    from selfsight.engine.optim import LARS, gradients_finite, param_groups, step_unless_nonfinite
    nn = torch.nn
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to("meta")
    opt = LARS(param_groups(net), lr=0.1, weight_decay=1e-4)
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    with HostWaits() as waits:
        ok = gradients_finite(net.parameters())
        clip_gradients(net.parameters(), 1.0, clip_mode)
        step_unless_nonfinite(opt, ok)
    assert waits.found == []
