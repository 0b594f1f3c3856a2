"""Redundancy-reduction losses (no negatives, no momentum encoder).

* ``barlow_twins_loss`` (Zbontar et al. 2021, Eq. 1; ``facebookresearch/barlowtwins:main.py``):
  C = BN(z1)^T BN(z2) / N over the GLOBAL batch (affine-free BN, global statistics under DDP),
  L = sum_i (1 - C_ii)^2 + λ sum_{i≠j} C_ij^2, λ = 0.0051.
* ``vicreg_loss`` (Bardes et al. 2022, Eq. 1-6; ``facebookresearch/vicreg:main_vicreg.py``):
  L = λ·MSE(z1, z2) + μ·[v(z1) + v(z2)]/2 + ν·[c(z1) + c(z2)], with the variance hinge
  v(z) = mean_j relu(1 - sqrt(Var z_j + 1e-4)) and the covariance term
  c(z) = sum_{i≠j} Cov(z)_ij^2 / D; λ = μ = 25, ν = 1. The invariance term uses the local
  batch, variance and covariance the global one (gathered with gradient), as the official code.

Across processes both equal one process holding the global batch: the cross-correlation is summed
over ranks with gradient, and the gathers carry gradients back to every rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import fp32_loss, upcast
from selfsight.nn.distributed import all_reduce_sum_with_grad, gather_with_grad, world_size


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The D(D-1) off-diagonal entries of a D×D matrix, by a view (as the official code): a boolean
    mask would find them with ``nonzero``, a read back from the device in every step."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


@fp32_loss
def barlow_twins_loss(z1n: torch.Tensor, z2n: torch.Tensor, lambd: float = 0.0051) -> torch.Tensor:
    """z1n, z2n: N×D projections already batch-normalized over the global batch (affine-free BN)."""
    z1n, z2n = upcast(z1n), upcast(z2n)
    n_global = z1n.shape[0] * world_size()
    c = all_reduce_sum_with_grad(z1n.T @ z2n / n_global)                 # D×D cross-correlation
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@fp32_loss
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> torch.Tensor:
    """z1, z2: N×D expander outputs of the two views (local batch)."""
    z1, z2 = upcast(z1), upcast(z2)
    repr_loss = F.mse_loss(z1, z2)
    x, y = gather_with_grad(z1), gather_with_grad(z2)                    # (W·N)×D
    n, d = x.shape
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
