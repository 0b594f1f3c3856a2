"""I-JEPA (Assran et al. 2023, *Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture*, Eq. 1; ``facebookresearch/ijepa``: src/train.py, src/masks/multiblock.py,
src/models/vision_transformer.py), composed from the masked-image-modeling parts (docs/mim.md):

    teacher T   an EMA copy of the encoder on the whole image (``targets.FeatureTarget``, kind ema)
    norm N      LayerNorm without affine on its patch tokens (``normalize_target(·, "layernorm")``)
    student S   the encoder on the context block only (the sparse path MAE uses: other patches dropped)
    head H      a narrow ViT predictor: context tokens + mask tokens at each target block's positions
    loss        over the M target blocks B_i:  (1/M) Σ_i mean_{j ∈ B_i} || H(S(x_ctx))_j − N(T(x))_j ||²

Masks are I-JEPA's multi-block masks (``masking.multiblock``: 4 target blocks of 15-20 % of the image,
aspect 0.75-1.5, one context block of 85-100 % with the target patches removed, equal counts across a
batch), drawn with each batch. There are no hand-made augmentations: one random resized crop (0.3-1),
no flip. The EMA update (momentum 0.996 -> 1) follows the optimizer step; weight decay goes
0.04 -> 0.4 (``optim.weight_decay_end``).

Evaluation and export use the target encoder, as the paper's linear probes do. Its encoders have no
class token (``backbone.class_token=false``), so the image feature is the mean of the last block's
final-normed patch tokens, the paper's "average pooled patch representation".

Deviations: the loss is the mean squared error of the paper (the official train.py uses smooth-l1,
``method.loss=smooth_l1``); the momentum ramp is the engine's cosine, not the official linear one;
the target LayerNorm uses eps 1e-6 (the official ``F.layer_norm`` 1e-5); masking details in
``masking/multiblock.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision.utils as vutils

from selfsight.augment.views import default_normalization
from selfsight.config import setting
from selfsight.heads.predictor import JEPAPredictor
from selfsight.losses.mim import mim_loss
from selfsight.masking.multiblock import MultiBlockMasker, MultiBlockMasks, block_masks_to_bool
from selfsight.methods import register_method, vit_only
from selfsight.nn.momentum import momentum_copy, momentum_update, without_drop_path
from selfsight.targets import build_target, normalize_target


@dataclass
class MultiBlockParams:
    targets: int = setting(4, at_least=1)
    target_scale: tuple = (0.15, 0.2)
    target_aspect: tuple = (0.75, 1.5)
    context_scale: tuple = (0.85, 1.0)
    context_aspect: tuple = (1.0, 1.0)
    min_context: int = setting(10, at_least=1)


@dataclass
class IJEPAParams:
    name: str = "ijepa"
    loss: str = setting("l2", choices=("l2", "smooth_l1"))
    smooth_l1_beta: float = setting(1.0, above=0)
    predictor_dim: int = setting(384, at_least=1)
    predictor_depth: int = setting(12, at_least=1)
    predictor_heads: int = setting(12, at_least=1)
    momentum: float = setting(0.996, unit=True)          # target EMA, ramped to momentum_end per step
    momentum_end: float = setting(1.0, unit=True)
    mask: MultiBlockParams = field(default_factory=MultiBlockParams)


class IJEPA(nn.Module):
    def __init__(self, params: IJEPAParams, backbone: nn.Module):
        super().__init__()
        p = self.params = params
        if not hasattr(backbone, "enable_masking"):
            raise ValueError("ijepa needs a ViT backbone (vit_tiny, ..., or timm:NAME of a timm VisionTransformer)")
        try:
            masks = MultiBlockMasks(p.mask.targets, tuple(p.mask.target_scale), tuple(p.mask.target_aspect),
                                    tuple(p.mask.context_scale), tuple(p.mask.context_aspect), p.mask.min_context)
        except ValueError as e:                 # the generator names the argument: name the config key
            raise ValueError(f"method.mask.{e}") from None
        backbone.enable_masking("drop")
        self.student = backbone
        self.teacher = without_drop_path(momentum_copy(backbone))
        mean, std = default_normalization(backbone.net.patch_embed.proj.in_channels)
        self.target = build_target(_EMA_TARGET, backbone, {"mean": list(mean), "std": list(std)}, self.teacher)
        self.predictor = JEPAPredictor(backbone.embed_dim, p.predictor_dim, p.predictor_depth, p.predictor_heads)
        self.masker = MultiBlockMasker(masks, backbone.patch_size)

    @property
    def backbone(self) -> nn.Module:
        return self.teacher

    def finetune_network(self) -> nn.Module:
        return self.teacher

    def make_masker(self) -> MultiBlockMasker:
        return self.masker

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def after_step(self, sched: dict) -> None:
        """EMA of the target encoder after the optimizer step (the official update follows ``optimizer.step``)."""
        momentum_update(self.teacher, self.student, sched.get("momentum", self.params.momentum), sched.get("finite"))

    def _masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        masks = batch.get("masks")
        if masks is None:                          # a batch built outside the loader
            masks = self.masker(batch["views"], int(batch.get("seed", 0)))
        return masks[0]

    def predict(self, x: torch.Tensor, context: torch.Tensor, targets: torch.Tensor) -> tuple:
        """Student on the context patches, predictor at the target blocks -> (B×M×Kt×D, grid, student tokens)."""
        grid = self.masker.grid(x.shape[-2:])
        dropped = ~block_masks_to_bool(context, grid[0] * grid[1])                      # B×N, True = not context
        tokens = self.student.forward_features(x, dropped, visible=context.shape[1]).patch   # B×Kc×D, ascending
        return self.predictor(tokens, context, targets, grid), grid, tokens

    def training_step(self, batch: dict, sched: dict) -> dict:
        x = batch["views"][0]                                                             # B×C×S×S
        context, targets = self._masks(batch)                                             # B×Kc, B×M×Kt
        pred, grid, tokens = self.predict(x, context, targets)                            # B×M×Kt×D
        with torch.no_grad():
            target = normalize_target(self.target(x, grid), "layernorm")                  # B×N×D
            b, m, kt = targets.shape
            target = target.gather(1, targets.reshape(b, m * kt, 1).expand(-1, -1, target.shape[-1]))
        # every block has Kt patches: the mean over all (B, M, Kt) is the mean over blocks of each block's mean
        loss = mim_loss(pred.reshape(b, m * kt, -1), target, None, self.params.loss, self.params.smooth_l1_beta)
        monitor = {"context_patches": float(context.shape[1]), "target_patches": float(kt),
                   "target_std": target.std(1).mean()}
        return {"loss": loss, "embedding": tokens.mean(1).detach(), "monitor": monitor}

    @torch.no_grad()
    def pictures(self, batch: dict, n: int = 8) -> dict:
        """{"ijepa_blocks": image}: for ``n`` images of the batch, the image, its context block (the
        rest grayed) and its target blocks (each tinted in its own colour over the grayed image)."""
        x = batch["views"][0][:n].float()
        context, targets = (t[:n] for t in self._masks(batch))
        grid = self.masker.grid(x.shape[-2:])
        p = self.masker.patch_size
        mean, std = (x.new_tensor(v).view(1, -1, 1, 1) for v in default_normalization(x.shape[1]))
        rgb = (x * std + mean).clamp(0, 1).expand(-1, 3, -1, -1)                          # n×3×S×S
        up = lambda m: m.view(-1, 1, *grid).float().repeat_interleave(p, 2).repeat_interleave(p, 3)  # noqa: E731
        ctx = up(block_masks_to_bool(context.cpu(), grid[0] * grid[1]).to(x.device))     # n×1×S×S
        shown = rgb * (0.25 + 0.75 * ctx)
        colours = x.new_tensor([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 0.9, 0.2]])
        tinted = rgb * 0.25
        for i in range(targets.shape[1]):
            block = up(block_masks_to_bool(targets[:, i].cpu(), grid[0] * grid[1]).to(x.device))
            tinted = tinted * (1 - block) + block * (0.4 * rgb + 0.6 * colours[i % 4].view(1, 3, 1, 1))
        cols = torch.stack([rgb, shown, tinted], 1).flatten(0, 1)                         # (n·3)×3×S×S
        if cols.shape[-1] < 64:                                                           # small images: enlarge
            cols = nn.functional.interpolate(cols, scale_factor=64 // cols.shape[-1], mode="nearest")
        return {"ijepa_blocks": vutils.make_grid(cols, nrow=3, padding=2, pad_value=1.0)}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


@dataclass
class _EMATarget:                      # the ``method.target`` fields build_target reads for an EMA teacher
    kind: str = "ema"


_EMA_TARGET = _EMATarget()

register_method(
    "ijepa", IJEPAParams,
    # in1k_vith14_ep300.yaml: AdamW lr 1e-3 at batch 2048 (16 × 128), warm-up 40 of 300 epochs, cosine to
    # 1e-6, wd 0.04 -> 0.4, EMA 0.996 -> 1, predictor 12 blocks 384 wide; crop 0.3-1, no flip, no colour
    defaults={"optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "linear", "base_batch": 2048,
                        "betas": [0.9, 0.999], "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 40,
                        "min_lr": 1e-6, "clip_grad": 0.0},
              "backbone": {"name": "vit_base", "class_token": False, "drop_path": 0.0},
              "views": {"n_views": 1, "crop_scale": [0.3, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0,
                        "blur_p": 0.0, "solarize_p": 0.0, "view_blur_p": [], "view_solarize_p": [], "local_crops": 0}},
    summary="I-JEPA: predict the EMA encoder's LayerNorm-ed tokens of 4 target blocks from one context block",
    check=vit_only,
)(IJEPA)
