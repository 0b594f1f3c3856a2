"""Vector quantizer with an EMA codebook, k-means initialisation and dead-code restarts.

* Nearest code and straight-through estimator: van den Oord et al. 2017, *Neural Discrete
  Representation Learning* (VQ-VAE), Eq. 1-3: q = e_k with k = argmin_j ||z - e_j||², the decoder
  gets z + sg(q - z) (forward value q, gradient of q copied to z), and the commitment loss
  β·||z - sg(q)||² (the third term of Eq. 3; here the mean over all elements, as
  ``F.mse_loss`` in BEiT v2's ``norm_ema_quantizer.py``). The codebook term of Eq. 3 is replaced by:
* EMA codebook: van den Oord et al. 2017 appendix A.1 / Razavi et al. 2019 (VQ-VAE-2) Eq. 4-6:
  N_k ← γ·N_k + (1-γ)·n_k,  m_k ← γ·m_k + (1-γ)·Σ_{i: k_i = k} z_i,  e_k = m_k / Ñ_k with the
  Laplace-smoothed count Ñ_k = (N_k + ε)/(Σ_j N_j + K·ε)·Σ_j N_j (Sonnet's VectorQuantizerEMA).
  In DDP the batch counts n and sums are all-reduced (SUM) first, so every rank keeps the same
  codebook (methods.md §12.1, §18).
* ``l2_norm`` (BEiT v2's NormEMAVectorQuantizer, Peng et al. 2022; ViT-VQGAN, Yu et al. 2022):
  z and the codebook live on the unit sphere; the nearest code is the max cosine (= min L2 there)
  and e_k = l2norm(m_k / Ñ_k). Deviation from BEiT v2, which keeps no N/m statistics and updates
  w ← l2norm(γ·w + (1-γ)·l2norm(batch mean)): this keeps VQ-VAE-2's (N, m) EMAs and normalises the
  ratio. Both give the same fixed points; the (N, m) form weighs codes by how often they are used
  and gives the usage statistic the dead-code restart needs.
* k-means initialisation on the first training batch (BEiT v2 ``kmeans_init``; spherical
  k-means with ``l2_norm``): run on rank 0's vectors only, then broadcast, because BEiT v2's
  per-rank initialisation leaves the ranks with different codebooks (methods.md pitfall 20).
* dead-code restart (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream): after
  each EMA update, a code whose EMA count N_k falls below ``dead_threshold`` × the mean count
  Σ_j N_j / K is replaced by a random current encoder vector of rank 0 (broadcast); its stats are
  reset to N_k = Σ_j N_j / K (a code of average weight) and m_k = N_k·e_k.

Codebook and statistics are buffers (checkpointed, never touched by the optimizer) and are
updated in training mode only. Everything runs in float32 with autocast disabled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from selfsight.nn.distributed import is_dist, rank
from selfsight.tokenizers.layers import code_stats

_CHUNK = 1 << 24              # at most this many N×K similarities at once (64 MB in float32)


@dataclass
class Quantized:
    quantized: torch.Tensor    # B×D×h×w, straight-through: value q, gradient to z
    ids: torch.Tensor          # B×h×w long
    commit_loss: torch.Tensor  # scalar, commitment·mean((z - sg(q))²)
    perplexity: torch.Tensor   # scalar, exp(entropy of this batch's code histogram), no grad
    usage: torch.Tensor        # scalar, share of the codes used in this batch, no grad
    restarted: torch.Tensor    # scalar, number of dead codes restarted this step (0 in eval)


def _sample_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """k rows of x (N×D): without replacement when N >= k, else with replacement."""
    n = x.shape[0]
    idx = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(0, n, (k,), device=x.device)
    return x[idx]


class VectorQuantizer(nn.Module):
    """EMA vector quantizer over a channels-first feature map (see the module docstring).

    ``forward(z: B×D×h×w) -> Quantized``; ``nearest(z_flat: N×D) -> N`` ids (no state change);
    ``lookup(ids: B×h×w) -> B×D×h×w`` code vectors.

    Defaults: decay 0.99 (VQ-VAE-2, BEiT v2), ε 1e-5 (Sonnet), commitment β 0.25 (VQ-VAE; BEiT v2
    uses 1.0), 10 k-means iterations (BEiT v2). ``dead_threshold`` is relative to the mean EMA count
    per code, so it does not depend on the batch size or the number of ranks; 0 turns restarts off.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, commitment: float = 0.25,
                 kmeans_iters: int = 10, dead_threshold: float = 0.01, l2_norm: bool = True):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer: num_codes and dim must be positive, got {num_codes}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.commitment, self.kmeans_iters, self.dead_threshold, self.l2_norm = \
            commitment, kmeans_iters, dead_threshold, l2_norm
        codebook = torch.randn(num_codes, dim)
        if l2_norm:
            codebook = F.normalize(codebook, dim=1)
        self.register_buffer("codebook", codebook)                              # K×D
        self.register_buffer("cluster_size", torch.zeros(num_codes))            # K, EMA count N
        self.register_buffer("embed_sum", codebook.clone())                     # K×D, EMA sum m
        self.register_buffer("initialised", torch.tensor(False))               # k-means done

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, commitment={self.commitment}, "
                f"l2_norm={self.l2_norm}, dead_threshold={self.dead_threshold}")

    # -- assignment -------------------------------------------------------------------------
    def _assign(self, x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """x: N×D, codebook: K×D -> N nearest ids (max cosine on the sphere, else min L2)."""
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        step = max(1, _CHUNK // codebook.shape[0])
        with torch.autocast(device_type=x.device.type, enabled=False):             # a caller's AMP: still fp32
            x, codebook = x.float(), codebook.float()
            sq = None if self.l2_norm else (codebook * codebook).sum(1)            # K
            for s in range(0, x.shape[0], step):
                sim = x[s:s + step] @ codebook.t()                                 # n×K
                if self.l2_norm:
                    out[s:s + step] = sim.argmax(1)
                else:                               # ||x||² - 2 x·e + ||e||², ||x||² is constant per row
                    out[s:s + step] = (sq - 2 * sim).argmin(1)
        return out

    @torch.no_grad()
    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """N×D vectors (normalised here when ``l2_norm``) -> N ids of the nearest codes."""
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            z_flat = z_flat.float()
            if self.l2_norm:
                z_flat = F.normalize(z_flat, dim=1)
            return self._assign(z_flat, self.codebook)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """B×h×w ids -> B×D×h×w code vectors."""
        return self.codebook[ids].permute(0, 3, 1, 2).contiguous()

    # -- state updates (training mode only) ---------------------------------------------------
    @torch.no_grad()
    def kmeans_init_(self, z_flat: torch.Tensor) -> None:
        """k-means (spherical with ``l2_norm``) on rank 0's N×D vectors, ``kmeans_iters``
        iterations from K sampled vectors; rank 0's centroids and counts are broadcast, so every
        rank starts from the same codebook. Sets N = counts·world (an estimate of the global
        batch's counts) and m = N·e."""
        k = self.num_codes
        if rank() == 0:
            x = z_flat.float()
            c = _sample_rows(x, k).clone()                                          # K×D
            for _ in range(self.kmeans_iters):
                ids = self._assign(x, c)
                counts = torch.bincount(ids, minlength=k).float()
                sums = torch.zeros_like(c).index_add_(0, ids, x)
                new = sums / counts.clamp_min(1.0)[:, None]
                if self.l2_norm:
                    new = F.normalize(new, dim=1)
                c = torch.where(counts[:, None] > 0, new, c)                        # empty clusters stay
            counts = torch.bincount(self._assign(x, c), minlength=k).float()
            packed = torch.cat([c, counts[:, None]], 1)
        else:
            packed = torch.empty(k, self.dim + 1, device=self.codebook.device)
        if is_dist():
            dist.broadcast(packed, src=0)
            packed[:, -1] *= dist.get_world_size()
        c, counts = packed[:, :-1], packed[:, -1]
        self.codebook.copy_(c)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(c * counts[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def ema_update_(self, z_flat: torch.Tensor, ids: torch.Tensor) -> None:
        """Razavi et al. 2019 Eq. 4-6 with all-reduced batch statistics (see the module docstring).
        A code never seen (N_k = 0 exactly) keeps its vector instead of becoming 0/Ñ_k."""
        k = self.num_codes
        sums = torch.zeros(k, self.dim, device=z_flat.device).index_add_(0, ids, z_flat)    # K×D
        counts = torch.bincount(ids, minlength=k).float()                                   # K
        packed = torch.cat([sums, counts[:, None]], 1)
        if is_dist():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        self.cluster_size.mul_(self.decay).add_(packed[:, -1], alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(packed[:, :-1], alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n                  # Laplace
        new = self.embed_sum / smoothed[:, None]
        if self.l2_norm:
            new = F.normalize(new, dim=1)
        self.codebook.copy_(torch.where(self.cluster_size[:, None] > 0, new, self.codebook))

    @torch.no_grad()
    def restart_dead_(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Replace the codes with N_k < dead_threshold·mean(N) by random vectors of rank 0's
        batch (broadcast with rank 0's dead mask, so every rank makes the same change; no host
        sync). Returns the number of restarted codes (a tensor)."""
        if self.dead_threshold <= 0:
            return torch.zeros((), device=z_flat.device)
        mean = self.cluster_size.sum() / self.num_codes
        dead = (self.cluster_size < self.dead_threshold * mean).float()                     # K
        packed = torch.cat([_sample_rows(z_flat.float(), self.num_codes), dead[:, None]], 1)  # K×(D+1)
        if is_dist():
            dist.broadcast(packed, src=0)
        fresh, dead = packed[:, :-1], packed[:, -1:] > 0.5
        self.codebook.copy_(torch.where(dead, fresh, self.codebook))
        self.cluster_size.copy_(torch.where(dead[:, 0], mean, self.cluster_size))
        self.embed_sum.copy_(torch.where(dead, fresh * mean, self.embed_sum))
        return dead.sum().float()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> Quantized:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer: expected B×{self.dim}×h×w, got shape {tuple(z.shape)}")
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().permute(0, 2, 3, 1).reshape(-1, d)                       # N×D, N = B·h·w
            if self.l2_norm:
                zf = F.normalize(zf, dim=1)
            if self.training and not bool(self.initialised):
                self.kmeans_init_(zf.detach())
            ids = self._assign(zf.detach(), self.codebook)                         # N
            q = self.codebook[ids]                                                  # N×D, a copy: no grad
            commit = self.commitment * F.mse_loss(zf, q)
            st = zf + (q - zf).detach()                                             # straight-through
            restarted = torch.zeros((), device=z.device)
            if self.training:
                self.ema_update_(zf.detach(), ids)
                restarted = self.restart_dead_(zf.detach())
            perplexity, usage = code_stats(ids, self.num_codes)
        return Quantized(quantized=st.view(b, h, w, d).permute(0, 3, 1, 2), ids=ids.view(b, h, w),
                         commit_loss=commit, perplexity=perplexity, usage=usage, restarted=restarted)
