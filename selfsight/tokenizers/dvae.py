"""Discrete VAE tokenizer: the trainable dVAE of BEiT v1.

Ramesh et al. 2021, *Zero-Shot Text-to-Image Generation* (DALL-E), §2.1 stage 1; BEiT's trainable
version ``beit/modeling_discrete_vae.py:DiscreteVAE`` (from lucidrains' DALLE-pytorch), methods.md
§11.3. The encoder gives logits over the vocabulary per token; training relaxes the categorical
posterior q(ids|x) with the Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017), temperature τ
passed by the caller (DALL-E anneals τ from 1 to 1/16), and decodes the soft one-hot times the
codebook. Loss (the negative ELB of DALL-E Eq. 1 with these choices):

    loss = MSE(recon, x) + kl_weight · mean_tokens KL(q(·|x) || uniform),
    KL(q || uniform) = Σ_k q_k log q_k + log K,  q = softmax(logits).

Deviations: MSE instead of DALL-E's logit-Laplace likelihood (as in BEiT's trainable dVAE and
DALLE-pytorch), on the caller's normalized input; the KL is the mean per token (not a sum over
tokens) and its default weight is constant, 0.01 (DALL-E ramps β from 0 to 6.6 against a
likelihood summed over pixels; DALLE-pytorch defaults to 0). The small positive weight keeps the
per-token posteriors from saturating early: on Fashion-MNIST (vocab 64, 200 Adam steps) it lifted
the share of codes used on a batch from about 20 % (weight 0 or 0.001) to about 60 %, for a slightly
higher reconstruction error of the argmax tokens (MSE about 0.09 instead of 0.07-0.08). At
tokenization time the ids are the argmax of the logits (BEiT ``get_codebook_indices``), without noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.tokenizers.layers import check_input, code_stats, conv_decoder, conv_encoder


class DVAE(nn.Module):
    """``forward(x, temperature) -> {loss, recon, ids, monitor}``; ``encode(x) -> B×h×w`` ids;
    ``decode_ids(ids) -> B×C×H×W``. ``dim`` is the codebook width (the 1×1 conv embedding)."""

    def __init__(self, channels: int, vocab_size: int = 512, hidden: int = 64, downsample: int = 4,
                 kl_weight: float = 1e-2, dim: int = 64):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"DVAE: vocab_size must be at least 2, got {vocab_size}")
        self.config = dict(channels=channels, vocab_size=vocab_size, hidden=hidden, downsample=downsample,
                           kl_weight=kl_weight, dim=dim)
        self.channels, self.vocab_size, self.downsample, self.kl_weight = channels, vocab_size, downsample, kl_weight
        self.encoder = conv_encoder(channels, hidden, vocab_size, downsample)      # -> B×K×h×w logits
        self.codebook = nn.Conv2d(vocab_size, dim, 1, bias=False)                  # soft one-hot × codebook
        self.decoder = conv_decoder(dim, hidden, channels, downsample)             # -> B×C×H×W

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, self.downsample, "DVAE")
        return self.encoder(x)                                                      # B×K×h×w

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W (normalized like the training input) -> B×h×w long: argmax of the logits.
        Runs with autocast off, so the ids do not depend on the caller's mixed precision."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.logits(x.to(self.codebook.weight.dtype)).argmax(1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """B×h×w long -> B×C×H×W reconstruction (hard one-hot through the codebook)."""
        emb = self.codebook.weight[:, :, 0, 0].t()[ids]                             # B×h×w×dim
        return self.decoder(emb.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> dict:
        logits = self.logits(x).float()                                             # B×K×h×w
        soft = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)         # relaxed one-hot
        recon = self.decoder(self.codebook(soft.to(self.codebook.weight.dtype)))    # B×C×H×W
        recon_mse = F.mse_loss(recon.float(), x.float())
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * logq).sum(1).mean() + math.log(self.vocab_size)         # mean over B·h·w tokens
        loss = recon_mse + self.kl_weight * kl
        ids = logits.detach().argmax(1)                                             # B×h×w
        perplexity, usage = code_stats(ids, self.vocab_size)
        return {"loss": loss, "recon": recon, "ids": ids,
                "monitor": {"recon_mse": recon_mse.detach(), "kl": kl.detach(), "perplexity": perplexity,
                            "usage": usage}}
