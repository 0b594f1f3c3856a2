"""iBOT masked-patch self-distillation (Zhou et al. 2022, Sec. 3, L_MIM; ``ibot:main_ibot.py:iBOTLoss``;
methods.md §9, pitfall 16). The class-token term is DINO's loss (``losses.dino``).

For each global crop q (the student sees it masked, the teacher intact), with m the patch mask
of the student's view (True = masked) and N patches:

    P_t(q)_{b,p} = softmax((g_t(u_q)_{b,p} - c2) / τ_t')          teacher, intact view, no gradient
    L_patch = 1/n_g Σ_q mean_b[ Σ_p m_{q,b,p} · (-Σ_k P_t(q)_{b,p,k} · log softmax(g_s(û_q)_{b,p} / τ_s)_k)
                                / max(Σ_p m_{q,b,p}, 1) ]
    c2 ← m·c2 + (1 - m)·mean over the global batch of mean_p g_t(u)_{b,p}       (after the loss)

Only masked positions count; an image without masked patches contributes 0 (it still counts in
the batch mean, as the official code). The patch center is all-reduced like DINO's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import upcast
from selfsight.losses.dino import update_center


def ibot_patch_loss(student_patch: list[torch.Tensor], teacher_patch_p: list[torch.Tensor],
                    masks: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """student_patch: n_g tensors B×N×K of logits (the masked global crops); teacher_patch_p: n_g
    tensors B×N×K of probabilities (the same crops, intact); masks: n_g bool B×N (or B×h×w)."""
    if not (len(student_patch) == len(teacher_patch_p) == len(masks) > 0):
        raise ValueError("the iBOT patch loss needs one student output, teacher output and mask per global crop")
    total = 0.0
    for s, t, m in zip(student_patch, teacher_patch_p, masks):
        ce = -(t * F.log_softmax(upcast(s) / student_temp, dim=-1)).sum(-1)      # B×N
        w = m.reshape(ce.shape).to(ce.dtype)                                      # B×N, 1 = masked
        total = total + ((ce * w).sum(-1) / w.sum(-1).clamp(min=1.0)).mean()
    return total / len(student_patch)


@torch.no_grad()
def update_patch_center(center: torch.Tensor, teacher_patch_logits: torch.Tensor, momentum: float) -> None:
    """In place: c2 ← m·c2 + (1 - m)·(mean over images, all processes, of each image's mean raw
    teacher patch output); teacher_patch_logits: (n·B)×N×K, center: 1×K."""
    update_center(center, teacher_patch_logits.mean(1), momentum)                # (n·B)×K



def masked_rows(masks: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked patches of ``masks`` ((n·B)×N bool) as a fixed number of rows, without reading
    anything back from the device (DINOv2's ``upperbound`` buffer): ``order`` (``bound`` indices into
    the flattened (n·B)·N tokens, the masked ones first in row-major order, then unmasked padding)
    and ``weight`` (``bound``: 1 / the image's masked count for a masked row, 0 for padding).
    ``bound`` must be at least the number of masked patches (the masker's upper bound)."""
    flat = masks.reshape(-1)                                                         # (n·B·N)
    n = masks.shape[-1]
    bound = min(bound, flat.numel())
    order = torch.sort((~flat).to(torch.uint8), stable=True).indices[:bound]        # masked first
    per_image = masks.sum(-1).clamp(min=1)                                           # (n·B)
    return order, flat[order].float() / per_image[order // n]


def ibot_masked_loss(student_rows: torch.Tensor, teacher_rows_p: torch.Tensor, weight: torch.Tensor,
                     n_images: int, student_temp: float) -> torch.Tensor:
    """DINOv2's form of L_patch (``dinov2/loss/ibot_patch_loss.py:forward_masked``): the heads run on
    the masked patches only. student_rows: R×K logits and teacher_rows_p: R×K probabilities of the
    rows ``masked_rows`` chose, ``weight`` (R) theirs. Each image's cross-entropies are averaged over
    its masked patches, then over all ``n_images`` images (an unmasked image adds 0): the same value
    as ``ibot_patch_loss`` on the dense tensors."""
    ce = -(teacher_rows_p * F.log_softmax(upcast(student_rows) / student_temp, dim=-1)).sum(-1)      # R
    return (ce * weight.to(ce.dtype)).sum() / n_images
