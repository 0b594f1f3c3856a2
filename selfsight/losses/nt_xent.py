"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020a, Eq. 1).

Follows the TF original (``simclr:tf2/objective.py``, methods.md §1): for anchors of view 1,
the candidates are all view-2 embeddings of the global batch (positive at the anchor's own
global index) and all view-1 embeddings except the anchor itself (self-similarity masked);
symmetrically for view 2. Each direction is a mean over anchors; the loss is their SUM
(so its value is 2x the "mean over 2N" form; pass ``reduction="mean2n"`` for that form).
Negatives are gathered across processes WITH gradient (pitfall 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import fp32_loss, upcast
from selfsight.nn.distributed import gather_with_grad, rank

LARGE = 1e9


@fp32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, reduction: str = "sum") -> torch.Tensor:
    """z1, z2: B×D projections of two views (local batch). Returns a scalar."""
    z1 = F.normalize(upcast(z1), dim=1)                                    # bf16/fp16 -> fp32, fp64 stays
    z2 = F.normalize(upcast(z2), dim=1)
    z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)            # (world·B)×D
    b = z1.shape[0]
    pos = torch.arange(b, device=z1.device) + rank() * b                  # global index of each anchor
    self_mask = F.one_hot(pos, z1_all.shape[0]).to(z1.dtype) * LARGE       # B×(world·B)
    logits_ab = z1 @ z2_all.T / temperature
    logits_aa = z1 @ z1_all.T / temperature - self_mask
    logits_ba = z2 @ z1_all.T / temperature
    logits_bb = z2 @ z2_all.T / temperature - self_mask
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), pos)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), pos)
    if reduction == "sum":
        return loss_a + loss_b
    if reduction == "mean2n":
        return (loss_a + loss_b) / 2
    raise ValueError(f"reduction must be 'sum' or 'mean2n', got {reduction!r}")
