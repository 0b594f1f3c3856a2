"""Barlow Twins' and VICReg's losses against references written from the papers' formulas."""
import pytest
import torch

from selfsight.losses import barlow_twins_loss, vicreg_loss


def reference_barlow(z1, z2, lambd):
    """Eq. 1: C_ij = Σ_b z1n_bi z2n_bj / N with per-dimension standardized z (biased std, eps 1e-5,
    as BatchNorm); L = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²."""
    def standardize(z):
        mu = z.mean(0)
        var = ((z - mu) ** 2).mean(0)
        return (z - mu) / torch.sqrt(var + 1e-5)
    a, b = standardize(z1), standardize(z2)
    n, d = a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return total, a, b


def reference_vicreg(z1, z2, lam, mu, nu):
    """Eq. 1-6: s = mean squared distance, v = mean_j max(0, 1 - sqrt(Var(z_j) + ε)) (unbiased var),
    c = Σ_{i≠j} Cov(z)_ij² / d; L = λ s + μ (v(z1) + v(z2))/2 + ν (c(z1) + c(z2))."""
    n, d = z1.shape
    s = sum(((z1[k] - z2[k]) ** 2).sum() for k in range(n)) / (n * d)

    def v(z):
        return sum(torch.relu(1 - torch.sqrt(z[:, j].var() + 1e-4)) for j in range(d)) / d

    def c(z):
        zc = z - z.mean(0)
        return sum((zc[:, i] @ zc[:, j] / (n - 1)) ** 2 for i in range(d) for j in range(d) if i != j) / d
    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


@pytest.mark.parametrize("seed", range(6))
def test_barlow_twins_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    bn = torch.nn.BatchNorm1d(d, affine=False).double()                # the method's affine-free BN
    ours = barlow_twins_loss(bn(z1), bn(z2), 0.0051)
    ref, _, _ = reference_barlow(z1, z2, 0.0051)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_vicreg_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * [0.3, 2.0][seed % 2]).requires_grad_()
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    coeffs = [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)][seed % 2]
    ours = vicreg_loss(z1, z2, *coeffs)
    ref = reference_vicreg(z1, z2, *coeffs)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        torch.testing.assert_close(a, b)


def test_minima():
    torch.manual_seed(0)
    z = torch.randn(4096, 4, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)                                   # decorrelated enough, unit variance
    assert barlow_twins_loss(torch.nn.functional.batch_norm(z, None, None, training=True),
                             torch.nn.functional.batch_norm(z, None, None, training=True)).item() < 0.01
    assert vicreg_loss(z, z).item() < 0.05
