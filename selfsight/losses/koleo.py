"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search", Eq. 4;
used by DINOv2, Oquab et al. 2023, Sec. 4; ``dinov2:dinov2/loss/koleo_loss.py``).

For n L2-normalised vectors x_i (the student's class tokens of one global crop):

    ρ_i = min_{j ≠ i} ‖x_i − x_j‖          (nearest neighbour in the batch)
    L_koleo = −1/n Σ_i log(ρ_i + ε)

The Kozachenko-Leonenko differential-entropy estimator, up to constants: minimising it spreads the
features uniformly over the sphere. As the official code, the neighbour is the argmax of the
inner products (the nearest point on the sphere), and the distance adds ε to the difference
(``nn.PairwiseDistance(eps=1e-8)``), so duplicate points give a large but finite loss and a
finite gradient (no NaN from the norm of a zero vector).

``scope="process"`` (the official code): each process searches its own batch. ``scope="global"``:
the neighbour is searched among the vectors of every process (gathered with their gradient), so N
processes equal one process with the global batch (used by the distributed tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import fp32_loss, upcast
from selfsight.nn.distributed import gather_with_grad, rank, world_size


@fp32_loss
def koleo_loss(x: torch.Tensor, eps: float = 1e-8, scope: str = "process") -> torch.Tensor:
    """x: n×D (not yet normalised) -> 0-d loss; n ≥ 2 vectors overall."""
    if scope not in ("process", "global"):
        raise ValueError(f"KoLeo scope must be process or global, got {scope!r}")
    x = F.normalize(upcast(x), p=2, dim=-1, eps=eps)                                # n×D
    others, offset = x, 0
    if scope == "global" and world_size() > 1:
        others, offset = gather_with_grad(x), rank() * x.shape[0]                  # (world·n)×D
    if others.shape[0] < 2:
        raise ValueError("the KoLeo loss needs at least 2 vectors (a batch of 1 has no nearest neighbour)")
    with torch.no_grad():
        dots = x @ others.T                                                         # n×(world·n)
        own = torch.arange(x.shape[0], device=x.device)
        dots[own, own + offset] = -2.0                                              # never oneself (dots ≥ -1)
        nearest = dots.argmax(1)                                                    # n
    rho = torch.linalg.vector_norm(x - others[nearest] + eps, dim=-1)              # n, PairwiseDistance(eps)
    return -torch.log(rho + eps).mean()
