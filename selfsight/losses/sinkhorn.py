"""Sinkhorn-Knopp centering of a teacher's outputs (SwAV, Caron et al. 2020, Sec. 3.1 and Alg. 1;
DINOv2, Oquab et al. 2023, Sec. 4, "replaces the teacher's softmax-centering"; official
``dinov2:dinov2/loss/dino_clstoken_loss.py:sinkhorn_knopp_teacher``).

With Q = exp(logits / τ_t)ᵀ (K prototypes × n samples, all processes together):

    Q ← Q / ΣQ
    repeat T times (3):  Q ← Q / (K · row sums)      each prototype holds 1/K of the mass
                         Q ← Q / (n · column sums)   each sample holds 1/n
    P = n · Qᵀ                                          each row of P is a distribution (sums to 1)

After the loop every row of P sums to 1 exactly, and every column (prototype) sums to about n/K:
the assignment is spread evenly over the prototypes across the whole batch. The row sums of Q
(per prototype) and the total are all-reduced, so N processes equal one process with the global
batch. Unlike the official code, the logits are shifted by their global maximum first (the
result is unchanged: Q is normalised by its sum), so that exp cannot overflow at τ_t = 0.04.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from selfsight.losses.common import upcast
from selfsight.nn.distributed import world_size


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """n×K raw teacher outputs (n may differ between processes, and be 0 on some) -> n×K
    probabilities, detached; every process must call it (collectives). ``rows`` (n bool): only those
    take part (DINOv2's masked patches among padding rows); the others come back as zeros."""
    if iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, got {iterations}")
    logits = upcast(logits.detach())
    n_k = logits.shape[1]
    keep = logits.new_ones(logits.shape[0]) if rows is None else rows.to(logits.dtype)       # n
    count = _all_reduce(keep.sum())                                                         # samples, all processes
    taking = logits.masked_fill(keep[:, None] == 0, -torch.inf)                            # padding never sets the max
    top = taking.max() if logits.numel() else torch.tensor(-torch.inf, device=logits.device, dtype=logits.dtype)
    top = _all_reduce(top.clone(), dist.ReduceOp.MAX if world_size() > 1 else None)
    q = torch.exp((logits - top.clamp_min(-1e30)) / temperature).T * keep                  # K×n
    tiny = torch.finfo(q.dtype).tiny
    q = q / _all_reduce(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q = q / _all_reduce(q.sum(1, keepdim=True)).clamp_min(tiny) / n_k                 # rows: 1/K each
        q = q / q.sum(0, keepdim=True).clamp_min(tiny) / count.clamp_min(1)               # columns: 1/n each
    return (q * count).T                                                                   # n×K, rows sum to 1
