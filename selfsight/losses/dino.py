"""DINO self-distillation loss and centering (Caron et al. 2021, Eq. 1-4 and Alg. 1;
``dino:main_dino.py:DINOLoss``; methods.md §8, pitfalls 10-13).

    P_t(i) = softmax((g_t(x_i) - c) / τ_t),  i ∈ the global crops (teacher, no gradient)
    L = 1/n Σ_{i ∈ global} Σ_{v ≠ i} mean_batch[ -Σ_k P_t(i)[k] · log softmax(g_s(x_v) / τ_s)[k] ]
    c ← m·c + (1 - m)·mean over the global batch and both global crops of g_t(x)   (after the loss)

The same-view pair (v = i) is skipped; n = number of remaining pairs. The center's mean is
all-reduced across processes, so it equals one process with the global batch.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfsight.losses.common import upcast
from selfsight.nn.distributed import world_size


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n·B)×K raw teacher outputs -> centred, sharpened probabilities, detached."""
    return F.softmax((upcast(teacher_logits.detach()) - center) / temperature, dim=-1)


def dino_loss(student_logits: list[torch.Tensor], teacher_p: list[torch.Tensor],
              student_temp: float) -> torch.Tensor:
    """student_logits: V tensors B×K (global crops first, in the teacher's order); teacher_p:
    n_global tensors B×K of probabilities. Cross-entropy averaged over the (i, v ≠ i) pairs."""
    log_p = [F.log_softmax(upcast(s) / student_temp, dim=-1) for s in student_logits]
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher_p):
        for v, lp in enumerate(log_p):
            if v == i:                                  # same view: skipped
                continue
            total = total + (-(t * lp).sum(-1)).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("the DINO loss needs at least two views")
    return total / pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float,
                  rows: torch.Tensor | None = None) -> None:
    """In place: c ← m·c + (1 - m)·mean of the raw teacher outputs ((n·B)×K) over all processes
    (the sum and the count all-reduced together, so processes may hold different numbers of rows;
    ``rows``, a bool per row, counts only those: DINOv2's masked patches among padding). No row
    anywhere leaves the center as it was; so does a non-finite batch (a step the engine will skip),
    decided on the device without a host sync: one bad step must not poison every later one."""
    logits = upcast(teacher_logits.detach())
    w = logits.new_ones(logits.shape[0]) if rows is None else rows.to(logits.dtype)        # (n·B)
    total = torch.cat([(logits * w[:, None]).sum(0), w.sum()[None]])[None]                 # 1×(K+1): sum, count
    if world_size() > 1:
        dist.all_reduce(total)
    batch_sum, count = total[:, :-1], total[:, -1:]
    new = center * momentum + batch_sum / count.clamp_min(1.0) * (1.0 - momentum)
    center.copy_(torch.where(torch.isfinite(batch_sum).all() & (count > 0).all(), new, center))


@torch.no_grad()
def dino_monitor(t_p: torch.Tensor, student_global: list[torch.Tensor], student_temp: float) -> dict:
    """The collapse monitor of DINO and iBOT's class token, as 0-d tensors (no host sync; the engine
    reads them at log steps): the teacher's mean entropy and its ratio to ln K (uniform collapse:
    1), the entropy of its batch-mean distribution over ln min(K, n) (one-hot collapse: 0), and
    KL(P_t || P_s) between the teacher and the student on the same global crops."""
    log_t = t_p.clamp_min(1e-12).log()
    entropy = -(t_p * log_t).sum(-1).mean()
    mean_p = t_p.mean(0)
    batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    log_s = torch.log_softmax(torch.cat(student_global).float() / student_temp, -1)
    kl = (t_p * (log_t - log_s)).sum(-1).mean()                                 # same view: KL(P_t || P_s)
    k = t_p.shape[1]
    return {"dino_teacher_entropy": entropy, "dino_entropy_ratio": entropy / math.log(k),
            "dino_batch_entropy_ratio": batch_entropy / math.log(min(k, t_p.shape[0])), "dino_kl": kl}
