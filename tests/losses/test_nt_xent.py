"""NT-Xent against an independent reference written from SimCLR's Eq. 1 (Chen et al. 2020a)."""
import math

import pytest
import torch

from selfsight.losses import nt_xent


def reference_nt_xent(z1, z2, tau):
    """l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ) over the 2N views; L = mean over all 2N anchors."""
    z = torch.cat([z1, z2], 0)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = [torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / tau for k in range(2 * n)]
        denom = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        total = total - torch.log(torch.exp(sims[j]) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("seed", range(12))
def test_values_and_gradients_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=g))
    d = int(torch.randint(2, 17, (1,), generator=g))
    tau = [0.05, 0.1, 0.2, 0.5, 1.0][seed % 5]
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    ours = nt_xent(z1.float(), z2.float(), tau, reduction="mean2n")
    ref = reference_nt_xent(z1, z2, tau)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    ga = torch.autograd.grad(nt_xent(z1, z2, tau, reduction="mean2n"), (z1, z2))
    gb = torch.autograd.grad(reference_nt_xent(z1, z2, tau), (z1, z2))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_sum_reduction_is_twice_the_mean_form():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert nt_xent(z1, z2, 0.1).item() == pytest.approx(2 * nt_xent(z1, z2, 0.1, reduction="mean2n").item(), rel=1e-6)


def test_identical_views_far_from_others_give_low_loss_and_random_ones_near_log_2n_minus_1():
    z = torch.eye(8) * 10
    assert nt_xent(z, z, 0.1, reduction="mean2n").item() < 1e-3
    rnd = nt_xent(torch.randn(512, 256), torch.randn(512, 256), 10.0, reduction="mean2n").item()
    assert rnd == pytest.approx(math.log(2 * 512 - 1), rel=0.01)


def test_bad_reduction_is_an_error():
    with pytest.raises(ValueError, match="reduction"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), reduction="avg")
