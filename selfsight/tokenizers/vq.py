"""Vector-quantized tokenizers: VQ-VAE (pixel target) and VQ-KD (teacher-feature target).

* ``target="pixels"``: VQ-VAE (van den Oord et al. 2017, Eq. 3 with the EMA codebook of the
  appendix / Razavi et al. 2019): conv encoder → 1×1 conv to ``dim`` → ``VectorQuantizer`` → conv
  decoder back to the image; loss = MSE(recon, x) + commitment loss.
* ``target="features"``: VQ-KD of BEiT v2 (Peng et al. 2022, §2.1 Eq. 1, ``beit2/modeling_vqkd.py``):
  the same encoder and quantizer, then a small conv stack at the token grid predicting
  ``feature_dim`` channels per token; loss = mean over tokens of (1 − cos(decoder output, teacher
  feature)) + commitment loss. The caller passes the teacher's B×feature_dim×h×w features
  (treated as constants).

Deviations from BEiT v2: a conv encoder/decoder instead of ViTs (the encoder's last 1×1 conv plays
``encode_task_layer``'s final Linear; the quantizer's L2 normalisation is the same), commitment
weight 0.25 (VQ-VAE) instead of 1.0 by default, and the quantizer's EMA is VQ-VAE-2's (see
quantizer.py). Token ids = the nearest code of the normalized encoder output, without noise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.tokenizers.layers import check_input, conv_decoder, conv_encoder
from selfsight.tokenizers.quantizer import VectorQuantizer

VQ_TARGETS = ("pixels", "features")


class VQTokenizer(nn.Module):
    """``forward(x, target_features=None) -> {loss, recon, ids, monitor}`` (``recon`` is None for
    features; ``monitor``: recon_mse or cosine, perplexity, usage, commit_loss, restarted);
    ``encode(x) -> B×h×w`` ids; ``decode_ids(ids)`` -> image (pixels) or predicted features.
    ``decay``, ``commitment``, ``kmeans_iters``, ``dead_threshold``, ``l2_norm`` go to the
    ``VectorQuantizer``; for short runs (a few hundred steps) a lower decay (0.95) lets the codebook
    and the dead-code restarts keep up with the encoder."""

    def __init__(self, channels: int, vocab_size: int = 512, dim: int = 32, hidden: int = 64, downsample: int = 4,
                 target: str = "pixels", feature_dim: int = 0, decay: float = 0.99, commitment: float = 0.25,
                 kmeans_iters: int = 10, dead_threshold: float = 0.01, l2_norm: bool = True):
        super().__init__()
        if target not in VQ_TARGETS:
            raise ValueError(f"VQTokenizer: target must be one of {', '.join(VQ_TARGETS)}, got {target!r}")
        if target == "features" and feature_dim < 1:
            raise ValueError("VQTokenizer: target='features' needs feature_dim, the teacher's feature width")
        self.config = dict(channels=channels, vocab_size=vocab_size, dim=dim, hidden=hidden, downsample=downsample,
                           target=target, feature_dim=feature_dim, decay=decay, commitment=commitment,
                           kmeans_iters=kmeans_iters, dead_threshold=dead_threshold, l2_norm=l2_norm)
        self.channels, self.vocab_size, self.downsample, self.target = channels, vocab_size, downsample, target
        self.encoder = conv_encoder(channels, hidden, dim, downsample)             # -> B×dim×h×w
        self.quantizer = VectorQuantizer(vocab_size, dim, decay=decay, commitment=commitment,
                                         kmeans_iters=kmeans_iters, dead_threshold=dead_threshold, l2_norm=l2_norm)
        if target == "pixels":
            self.decoder = conv_decoder(dim, hidden, channels, downsample)         # -> B×C×H×W
        else:
            self.decoder = conv_decoder(dim, hidden, feature_dim, 1)               # -> B×feature_dim×h×w

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W (normalized like the training input) -> B×h×w long ids. Runs with autocast off,
        so the ids do not depend on the caller's mixed precision."""
        check_input(x, self.channels, self.downsample, "VQTokenizer")
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.encoder(x.to(next(self.encoder.parameters()).dtype))
        b, d, h, w = z.shape                                                        # B×dim×h×w
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """B×h×w long -> B×C×H×W (pixels) or B×feature_dim×h×w (features)."""
        return self.decoder(self.quantizer.lookup(ids))

    def forward(self, x: torch.Tensor, target_features: torch.Tensor | None = None) -> dict:
        check_input(x, self.channels, self.downsample, "VQTokenizer")
        vq = self.quantizer(self.encoder(x))
        out = self.decoder(vq.quantized)
        monitor = {"perplexity": vq.perplexity, "usage": vq.usage, "commit_loss": vq.commit_loss.detach(),
                   "restarted": vq.restarted}
        if self.target == "pixels":
            rec = F.mse_loss(out.float(), x.float())
            monitor["recon_mse"] = rec.detach()
            recon = out
        else:
            if target_features is None:
                raise ValueError("VQTokenizer(target='features'): forward needs target_features, the teacher's "
                                 "B×feature_dim×h×w features")
            if target_features.shape != out.shape:
                raise ValueError(f"VQTokenizer: target_features has shape {tuple(target_features.shape)}, the "
                                 f"decoder gives {tuple(out.shape)} (B×feature_dim×h×w at the token grid)")
            cos = F.cosine_similarity(out.float(), target_features.detach().float(), dim=1)   # B×h×w
            rec = (1 - cos).mean()
            monitor["cosine"] = cos.detach().mean()
            recon = None
        return {"loss": rec + vq.commit_loss, "recon": recon, "ids": vq.ids, "monitor": monitor}
