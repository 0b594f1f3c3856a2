"""InfoNCE losses of the MoCo family.

* ``info_nce_queue`` (MoCo v1/v2, He et al. 2019 Eq. 1; ``moco@132aea9:moco/builder.py``):
  for each query q with its key k+ and the K queued keys n_j,
  L = -log exp(q·k+/T) / (exp(q·k+/T) + sum_j exp(q·n_j/T)), the positive at logit index 0.
* ``moco_v3_loss`` (Chen, Xie, He 2021, Alg. 1; ``moco-v3:moco/builder.py:contrastive_loss``):
  in-batch keys gathered from all processes WITHOUT gradient, the positive of local query i
  at global index i + N·rank, cross-entropy scaled by 2τ.

Both compute in at least fp32 (bf16 logits at T = 0.07 lose the positive's margin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import fp32_loss, upcast
from selfsight.nn.distributed import gather_no_grad, rank


@fp32_loss
def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: N×d queries (with grad), k: N×d keys (no grad), queue: K×d keys; all L2-normalized."""
    q, k = upcast(q), upcast(k.detach())
    l_pos = (q * k).sum(1, keepdim=True)                                  # N×1
    l_neg = q @ queue.clone().detach().to(q.dtype).T                       # N×K (clone: the queue changes after)
    logits = torch.cat([l_pos, l_neg], 1) / temperature                   # N×(1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is first
    return F.cross_entropy(logits, labels)


@fp32_loss
def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: N×d predictions (with grad), k: N×d momentum-encoder keys of the other view."""
    q = F.normalize(upcast(q), dim=1)
    k = F.normalize(upcast(k.detach()), dim=1)
    k_all = gather_no_grad(k)                                             # (W·N)×d
    logits = q @ k_all.T / temperature                                    # N×(W·N)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)
