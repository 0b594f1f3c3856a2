"""KoLeo (losses/koleo.py) against the estimator written from Sablayrolles et al. 2019, Eq. 4:
−1/n Σ_i log(min_{j≠i} ‖x_i/‖x_i‖ − x_j/‖x_j‖‖), by an explicit double loop in float64."""
import math

import pytest
import torch

from selfsight.losses.koleo import koleo_loss


def reference(x: torch.Tensor) -> torch.Tensor:
    u = x / x.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(u)):
        nearest = min(math.sqrt(sum((a - b) ** 2 for a, b in zip(u[i].tolist(), u[j].tolist())))
                      for j in range(len(u)) if j != i)
        total += -math.log(nearest)
    return torch.tensor(total / len(u), dtype=torch.float64)


def test_value_and_gradient_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = koleo_loss(x, eps=0.0)
    assert loss.item() == pytest.approx(reference(x.detach()).item(), rel=1e-12)
    # gradient: the autograd of the formula with the same neighbours, written with cdist
    loss.backward()
    y = x.detach().clone().requires_grad_(True)
    u = y / y.norm(dim=1, keepdim=True)
    d = torch.cdist(u, u) + torch.diag(torch.full((12,), math.inf, dtype=torch.float64))
    (-d.min(1).values.log().mean()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


def test_spreading_lowers_it_and_the_scale_of_a_vector_does_not_matter():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    tight = x * 0.01 + torch.ones(8, dtype=torch.float64)          # all near one direction
    assert koleo_loss(tight) > koleo_loss(x) + 1.0
    scaled = x * torch.rand(16, 1, generator=g, dtype=torch.float64).add(0.1) * 10
    torch.testing.assert_close(koleo_loss(scaled), koleo_loss(x))


def test_duplicates_and_ties_give_no_nan():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]], requires_grad=True)
    loss = koleo_loss(x)                         # two identical points; the others tie at equal distances
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() > 3                       # −log(ε) for the duplicated pair dominates
    zero = torch.zeros(4, 3, requires_grad=True)                    # degenerate: every vector is 0
    koleo_loss(zero).backward()
    assert torch.isfinite(zero.grad).all()


def test_a_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2 vectors"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="process or global"):
        koleo_loss(torch.randn(3, 4), scope="batch")


def test_bf16_input_is_computed_in_fp32():
    x = torch.randn(8, 16)
    assert koleo_loss(x.bfloat16()).dtype == torch.float32
    assert koleo_loss(x.bfloat16()).item() == pytest.approx(koleo_loss(x).item(), rel=0.05)
