"""Losses of masked image modeling, on the masked positions only (methods.md §14:
L = Σ_{i∈M} Loss(N(T(x))_i, H(S(x̃))_i); pitfall 17).

Every loss is the mean over masked tokens of a per-token loss:

* ``l2``        mean_c (p - t)²            (MAE's MSE: per patch, then over masked patches; MaskFeat)
* ``l1``        mean_c |p - t|
* ``smooth_l1`` mean_c SmoothL1_β(p - t)    (MaskDistill; β = ``beta``)
* ``cosine``    1 - cos(p, t)
* ``ce``        cross-entropy of logits p (K) against the id t (BEiT's visual tokens)

``pred`` and ``target`` are either full (B×N×C, B×N for ids) with ``mask`` B×N bool selecting
the masked tokens, or already selected (M×C, M) with ``mask=None``. Computed in float32.
With ``mask``, the per-token losses of every position are averaged with the mask as weights
(Σ_i m_i ℓ_i / Σ_i m_i, 0 when nothing is masked): the same value as selecting the masked tokens
first, without the host read that boolean selection costs on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.losses.common import upcast

MIM_LOSSES = ("l2", "l1", "smooth_l1", "cosine", "ce")


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "l2",
             beta: float = 1.0) -> torch.Tensor:
    if kind not in MIM_LOSSES:
        raise ValueError(f"method.loss must be one of {', '.join(MIM_LOSSES)}, got {kind!r}")
    if mask is not None:
        w = mask.to(torch.float32)                                    # B×N
        return (per_token(pred, target, kind, beta) * w).sum() / w.sum().clamp(min=1.0)
    if pred.shape[0] == 0:                                            # no masked token in the batch
        return pred.sum() * 0.0
    return per_token(pred, target, kind, beta).mean()


def per_token(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float = 1.0) -> torch.Tensor:
    """The loss of each token (pred ...×C logits or values, target ...×C or ... ids) -> ..., float32."""
    pred = upcast(pred)
    if kind == "ce":
        return F.cross_entropy(pred.flatten(0, -2), target.long().flatten(), reduction="none").view(target.shape)
    target = upcast(target.detach())
    if kind == "l2":
        return (pred - target).pow(2).mean(-1)
    if kind == "l1":
        return (pred - target).abs().mean(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)
    return 1 - F.cosine_similarity(pred, target, dim=-1)
