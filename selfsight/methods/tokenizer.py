"""Training a discrete image tokenizer, the teacher of BEiT-style masked image modeling
(methods.md §11-12; ``selfsight tokenizer train``).

Two kinds (modules in ``selfsight.tokenizers``):

* ``dvae``: DALL-E's discrete VAE (Ramesh et al. 2021, §2.1): Gumbel-softmax relaxation whose
  temperature is annealed (cosine per step) from ``temperature`` to ``temperature_end`` (1 -> 1/16
  in the paper), KL to the uniform prior; tokens = argmax of the encoder logits.
* ``vq``: a VQ-VAE (van den Oord et al. 2017, Eq. 3) with an L2-normalised codebook updated by
  EMA, k-means initialisation broadcast from rank 0, dead-code restart and the straight-through
  estimator. ``target: pixels`` reconstructs the image; ``target: teacher`` is BEiT v2's VQ-KD
  (Peng et al. 2022, Eq. 1-2): the decoder predicts a frozen teacher's patch features (e.g. a
  selfsight DINO run) at the token grid, loss 1 - cosine.

The token grid is the image side / ``downsample``: set ``downsample`` to the BEiT student's patch
size so that both grids match. Runs through the one training loop (budget, checkpoints, resume,
multi-process); at the end ``RUN/tokenizer.pt`` is written (the artifact BEiT recipes load with
``method.target.tokenizer``) with the view preprocessing it was trained on, and
``RUN/pictures/reconstructions.png`` (originals over reconstructions; VQ-KD: over the images
decoded from nothing, so only originals and token maps are shown). Logged: reconstruction error
(or cosine), codebook perplexity and share of codes used per batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision.utils as vutils

from selfsight.augment.views import default_normalization
from selfsight.config import setting
from selfsight.methods import register_method
from selfsight.targets import build_teacher_target, save_tokenizer
from selfsight.tokenizers import DVAE, VQTokenizer

KINDS = ("dvae", "vq")
log = logging.getLogger("selfsight")


@dataclass
class TokenizerParams:
    name: str = "tokenizer"
    kind: str = "vq"                  # vq (VQ-VAE / VQ-KD) | dvae (DALL-E)
    target: str = "pixels"            # vq: pixels (VQ-VAE) | teacher (VQ-KD, BEiT v2)
    vocab_size: int = setting(512, at_least=1)
    dim: int = setting(32, at_least=1)                    # vq: code dimension
    hidden: int = setting(64, at_least=1)                 # conv width
    downsample: int = setting(4, at_least=1)              # token grid = side / downsample: the BEiT student's patch size
    decay: float = setting(0.99, unit=True)              # vq: codebook EMA
    commitment: float = setting(0.25, at_least=0)         # vq: β of the commitment loss
    kl_weight: float = setting(0.0, at_least=0)           # dvae: weight of KL(q || uniform); 0 = the module's default
    temperature: float = setting(1.0, above=0)         # dvae: Gumbel-softmax τ, cosine per step to temperature_end
    temperature_end: float = setting(0.0625, above=0)
    teacher: str = ""                 # vq + teacher: a selfsight run, or timm:NAME / torchvision:NAME
    teacher_weights: str = ""
    teacher_size: int = setting(0, at_least=0)
    teacher_dim: int = setting(0, at_least=0)             # filled in from the teacher


class TokenizerTraining(nn.Module):
    def __init__(self, params: TokenizerParams, channels: int, preprocess: dict):
        super().__init__()
        p = self.params = params
        if p.kind not in KINDS:
            raise ValueError(f"method.kind must be one of {', '.join(KINDS)}, got {p.kind!r}")
        if p.target not in ("pixels", "teacher"):
            raise ValueError(f"method.target must be pixels or teacher, got {p.target!r}")
        if p.kind == "dvae" and p.target != "pixels":
            raise ValueError("method.target=teacher (VQ-KD) needs method.kind=vq; a dVAE reconstructs pixels")
        self.preprocess = preprocess
        self._last: dict = {}             # the last batch's monitor values, for the closing log line
        self.teacher = None
        if p.kind == "dvae":
            self.config = {"channels": channels, "vocab_size": p.vocab_size, "hidden": p.hidden,
                           "downsample": p.downsample}
            if p.kl_weight > 0:
                self.config["kl_weight"] = p.kl_weight
            self.tokenizer = DVAE(**self.config)
        else:
            feature_dim = 0
            if p.target == "teacher":
                self.teacher = build_teacher_target(p, preprocess, key="method")     # frozen, not checkpointed
                feature_dim = self.teacher.dim
            self.config = {"channels": channels, "vocab_size": p.vocab_size, "dim": p.dim, "hidden": p.hidden,
                           "downsample": p.downsample, "target": "features" if p.target == "teacher" else "pixels",
                           "feature_dim": feature_dim, "decay": p.decay, "commitment": p.commitment}
            self.tokenizer = VQTokenizer(**self.config)

    @property
    def backbone(self):
        raise ValueError("this is a tokenizer run: it has no backbone to evaluate or export; give its "
                         "tokenizer.pt to a BEiT run as method.target.tokenizer")

    def schedules(self) -> dict:
        return {"temperature": (self.params.temperature, self.params.temperature_end)} if self.params.kind == "dvae" \
            else {}

    def _teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.params.downsample, x.shape[-1] // self.params.downsample)
        feats = self.teacher(x, grid)                                            # B×N×D
        return feats.transpose(1, 2).reshape(x.shape[0], -1, *grid).float()      # B×D×h×w

    def training_step(self, batch: dict, sched: dict) -> dict:
        x = batch["views"][0]                                                    # B×C×H×W, normalized
        if self.params.kind == "dvae":
            out = self.tokenizer(x, sched.get("temperature", self.params.temperature))
        else:
            target = self._teacher_features(x) if self.teacher is not None else None
            out = self.tokenizer(x, target)
        monitor = dict(out["monitor"])
        if self.params.kind == "dvae":
            monitor["temperature"] = sched.get("temperature", self.params.temperature)
        self._last = {k: v.detach() if torch.is_tensor(v) else v for k, v in monitor.items()}   # for the summary
        return {"loss": out["loss"], "monitor": monitor}

    def forward(self, batch: dict, sched: dict) -> dict:            # so DDP can wrap the method
        return self.training_step(batch, sched)

    @torch.no_grad()
    def pictures(self, batch: dict) -> dict:
        """Originals (row 1) over reconstructions (row 2) of up to 8 images, un-normalized to [0, 1]
        (pixel targets); for VQ-KD the originals over their token maps (ids as gray levels)."""
        x = batch["views"][0][:8].float()
        mean = torch.tensor(self.preprocess["mean"], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess["std"], device=x.device).view(1, -1, 1, 1)
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        ids = self.tokenizer.encode(x)                                           # B×h×w
        if self.config.get("target", "pixels") == "pixels":
            second = self.tokenizer.decode_ids(ids).float()
        else:
            maps = ids[:, None].float() / max(1, self.params.vocab_size - 1)
            second = nn.functional.interpolate(maps, size=x.shape[-2:], mode="nearest")
            second = (second - mean) / std                                       # un-normalized below
        self.tokenizer.train(was_training)
        images = (torch.cat([x, second]) * std + mean).clamp(0, 1)              # (2n)×C×H×W
        if images.shape[-1] < 64:                                                # small images: enlarge (nearest)
            images = nn.functional.interpolate(images, scale_factor=64 // images.shape[-1], mode="nearest")
        return {"reconstructions": vutils.make_grid(images, nrow=x.shape[0], padding=2, pad_value=1.0)}

    def write_artifacts(self, run_dir) -> None:
        """``run_dir/tokenizer.pt``: the tokenizer artifact (``targets.tokens`` format), and a log
        line with the last batch's reconstruction error and codebook use."""
        path = f"{run_dir}/tokenizer.pt"
        save_tokenizer(self.tokenizer, self.params.kind, self.config, self.preprocess, path)
        last = {k: float(v) for k, v in self._last.items()}
        if last:
            error = (f"reconstruction MSE {last['recon_mse']:.4f}" if "recon_mse" in last
                     else f"mean cosine to the teacher's features {last.get('cosine', float('nan')):.4f}")
            log.info("tokenizer written to %s; last batch: %s, codebook perplexity %.1f of %d, %.0f %% of the "
                     "codes used", path, error, last.get("perplexity", float("nan")), self.params.vocab_size,
                     100 * last.get("usage", float("nan")))


@register_method("tokenizer", TokenizerParams, needs_backbone=False,
                 defaults={"views": {"n_views": 1, "crop_scale": [0.5, 1.0], "jitter_p": 0.0, "gray_p": 0.0,
                                     "blur_p": 0.0},
                           "optim": {"name": "adamw", "lr": 1e-3, "base_batch": 256, "weight_decay": 0.0,
                                     "betas": [0.9, 0.99], "warmup_fraction": 0.02}},
                 summary="an image tokenizer for BEiT targets: dVAE (DALL-E) or VQ-VAE / VQ-KD (BEiT v2)")
def build(params: TokenizerParams, backbone, channels: int, image_size: int) -> TokenizerTraining:
    mean, std = default_normalization(channels)                   # the views' normalization
    preprocess = {"size": image_size, "mean": list(mean), "std": list(std), "channels": channels}
    return TokenizerTraining(params, channels, preprocess)
