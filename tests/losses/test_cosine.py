"""SimSiam's and BYOL's losses against references written from the papers' formulas."""
import pytest
import torch

from selfsight.losses import byol_regression, negative_cosine


def cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def reference_simsiam(p, z):
    """D(p, z) = -(p/||p||)·(z/||z||), averaged over the batch (Chen & He 2021, Eq. 1)."""
    return -sum(cos(p[i], z[i]) for i in range(len(p))) / len(p)


def reference_byol(p, z):
    """||p/||p|| - z/||z|| ||², averaged over the batch (Grill et al. 2020, Eq. 2)."""
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(len(p))) / len(p)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("loss,ref", [(negative_cosine, reference_simsiam), (byol_regression, reference_byol)])
def test_values_and_gradients_match_reference(seed, loss, ref):
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 33, (1,), generator=g))
    p = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    z = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    ours, want = loss(p, z), ref(p, z.detach())
    assert ours.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, p)[0], torch.autograd.grad(want, p)[0])


@pytest.mark.parametrize("loss", [negative_cosine, byol_regression])
def test_stop_gradient_on_the_target(loss):
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_minima():
    x = torch.randn(5, 16)
    assert negative_cosine(x, 3 * x).item() == pytest.approx(-1.0, abs=1e-6)
    assert byol_regression(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
