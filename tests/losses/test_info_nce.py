"""MoCo's losses against independent references written from the papers' formulas:
InfoNCE with a queue (He et al. 2019, Eq. 1) and MoCo v3's contrastive loss (Chen, Xie, He 2021,
Alg. 1), values and gradients, on many random inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from selfsight.losses import info_nce_queue, moco_v3_loss


def reference_info_nce(q, k, queue, tau):
    """L_q = -log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_j exp(q·n_j/τ)), averaged over the queries."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(torch.dot(q[i], k[i]) / tau)
        neg = sum(torch.exp(torch.dot(q[i], n) / tau) for n in queue)
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def reference_moco_v3(q, k, tau):
    """2τ · mean_i -log exp(cos(q_i, k_i)/τ) / Σ_j exp(cos(q_i, k_j)/τ)."""
    total = 0.0
    for i in range(q.shape[0]):
        sims = [torch.dot(q[i], k[j]) / (q[i].norm() * k[j].norm()) / tau for j in range(k.shape[0])]
        total = total - torch.log(torch.exp(sims[i]) / sum(torch.exp(s) for s in sims))
    return 2 * tau * total / q.shape[0]


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("seed", range(10))
def test_info_nce_with_queue_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, size = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 7), (2, 17), (1, 20)))
    tau = [0.07, 0.1, 0.2, 0.5, 1.0][seed % 5]
    q = unit(torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
    k = unit(torch.randn(n, d, generator=g, dtype=torch.float64))
    queue = unit(torch.randn(size, d, generator=g, dtype=torch.float64))
    ours = info_nce_queue(q, k, queue, tau)
    ref = reference_info_nce(q, k, queue, tau)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0])
    # reduced precision inputs are computed in fp32
    low = info_nce_queue(q.detach().bfloat16(), k.bfloat16(), queue.float(), tau)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=0.05)


def test_info_nce_does_not_backpropagate_into_keys_or_queue():
    q = unit(torch.randn(4, 8)).requires_grad_()
    k = unit(torch.randn(4, 8)).requires_grad_()
    queue = unit(torch.randn(16, 8)).requires_grad_()
    info_nce_queue(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_info_nce_known_values():
    # a perfect positive against orthogonal negatives: -log(e^{1/τ} / (e^{1/τ} + K))
    q = torch.eye(4)[:1]
    queue = torch.eye(4)[1:]
    tau = 0.5
    want = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert info_nce_queue(q, q, queue, tau).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_moco_v3_loss_matches_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (2, 17)))
    tau = [0.2, 1.0, 0.1, 0.5][seed % 4]
    q = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()     # not normalized: the loss does it
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    ours = moco_v3_loss(q, k, tau)
    ref = reference_moco_v3(q, k, tau)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0])


def test_moco_v3_loss_keys_carry_no_gradient():
    q = torch.randn(5, 8, requires_grad=True)
    k = torch.randn(5, 8, requires_grad=True)
    moco_v3_loss(q, k, 1.0).backward()
    assert k.grad is None and q.grad is not None
    # orthogonal keys, each query equal to its own key, low τ: the loss reaches its minimum 0
    e = F.normalize(torch.eye(5), dim=1)
    assert moco_v3_loss(e, e, 0.05).item() < 1e-6
