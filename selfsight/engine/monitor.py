"""Collapse monitor for joint-embedding methods (methods.md pitfall 6).

* ``embedding_std``: mean over dimensions of the per-dimension std of the L2-normalized
  embedding (SimSiam paper, Fig. 2): about 1/sqrt(D) when healthy, 0 when collapsed to a
  constant. ``embedding_std_ratio`` = embedding_std · sqrt(D) (healthy about 1). A projector
  ending in BN keeps every dimension's batch variance, so its collapse shows in the rank:
* ``rankme``: the effective rank of the embedding batch (Garrido et al. 2023, RankMe):
  exp(entropy of the normalized singular values); 1 for a batch collapsed to one direction.

``collapse_warning`` turns a row of these into a one-line warning, or None when healthy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_RATIO_MIN = 0.1           # below 10 % of the healthy spread: collapsed to (almost) a constant
RANK_MIN = 2.0                # effective rank of a batch that carries one or two directions


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict:
    """z: N×D embeddings (one process's batch). Returns floats for the logs."""
    z = z.detach().float()
    if not bool(torch.isfinite(z).all()):
        return {}                     # a non-finite step: the engine counts and skips it
    n, d = z.shape
    zn = F.normalize(z, dim=1)
    std = zn.std(0).mean().item() if n > 1 else 0.0
    s = torch.linalg.svdvals(z)                                   # uncentred, as the RankMe paper
    p = s / s.sum().clamp(min=1e-12) + 1e-7
    rank = math.exp(float(-(p * p.log()).sum()))
    return {"embedding_std": std, "embedding_std_ratio": std * math.sqrt(d), "rankme": rank}


def collapse_warning(row: dict) -> str | None:
    ratio, rank = row.get("embedding_std_ratio"), row.get("rankme")
    if ratio is not None and ratio < STD_RATIO_MIN:
        return (f"the embedding has collapsed: per-dimension std {row['embedding_std']:.2e} "
                f"({ratio:.3f} of the healthy 1/sqrt(D)), effective rank {rank:.2f}")
    if rank is not None and rank < RANK_MIN:
        return f"the embedding has collapsed to one or two directions (effective rank {rank:.2f})"
    return None
