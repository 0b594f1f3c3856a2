"""iBOT (Zhou et al. 2022, "Image BERT Pre-Training with Online Tokenizer", Sec. 3;
``ibot:main_ibot.py``, ``models/head.py:iBOTHead``, ``loader.py:ImageFolderMask``; methods.md §9,
pitfalls 10-16, 25): DINO on the class token plus masked-patch self-distillation, the EMA teacher
being the "online tokenizer".

* student = ViT with a mask token (dense input, ``enable_masking("token")``) -> DINOHead on every
  token; it sees the 2 global crops masked and the local crops intact (class token only). teacher
  = EMA copy of both (parameters only, cosine 0.996 -> 1 per step, after the optimizer step), no
  drop-path, sees the intact global crops. One head serves the class and the patch tokens
  (official ``shared_head=true``, the recipe's; ``patch_out_dim`` = ``out_dim`` = K).
* masks (``make_masker``, drawn by the loader): block-wise (BEiT) on the global crops only,
  smallest block (min(h, w) // 3)² patches, per-image ratio ~ U(0.1, 0.5), half the images
  unmasked (official ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``); none before
  ``pred_start_epoch``.
* loss = λ1·L_cls + λ2·L_patch (the official sum, λ1 = λ2 = 1). L_cls = DINO's cross-view loss
  on the class tokens (``losses.dino``: teacher global crops vs every other student crop, same
  view skipped); L_patch = the same-view cross-entropy on masked patches divided by each image's
  masked count (``losses.ibot``). Teacher softmax at τ_t (class, 0.04 -> 0.07) and τ_t' (patch,
  0.04 -> 0.07), both warmed up over ``teacher_temp_warmup_epochs``; student τ_s = 0.1.
* two centers (buffers, so checkpointed), updated after the loss from the teacher's global-crop
  outputs all-reduced over processes: c1 from the class tokens, c2 from each image's mean patch
  output. Evaluation and export use the TEACHER backbone.

Deviations from the official code: the temperature warm-up is linear per step (the official
per-epoch table is the same line sampled per epoch, reaching the end one epoch early); exactly
round(B/2) images of each global crop are unmasked (official: each crop flips a coin) and a
block mask's target is round(r·N) patches (official: at most r·N); the student head runs once
on the global tokens and the local class tokens together (equal unless ``use_bn_in_head``); the
teacher also holds a (never used) EMA copy of the mask token, so the EMA zips equal lists; the
mask token starts trunc-normal (0.02, the ViT backbone's BEiT init; official ``masked_embed``: zeros).
Logged: DINO's collapse monitor on the class token, ``ibot_cls_loss``, ``ibot_patch_loss``,
``ibot_patch_entropy_ratio`` (teacher patch entropy / ln K, first 8 images) and ``mask_ratio``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from selfsight.augment.views import DINO_VIEWS
from selfsight.config import setting, unit_range
from selfsight.heads.dino import DINOHead, freeze_last_layer
from selfsight.losses.dino import dino_loss, dino_monitor, teacher_probs, update_center
from selfsight.losses.ibot import ibot_patch_loss, update_patch_center
from selfsight.masking.views import ViewMasker, build_masker
from selfsight.methods import register_method, vit_only
from selfsight.methods.dino import DINO_VIT_OPTIM
from selfsight.methods.mim import MaskParams
from selfsight.nn.momentum import momentum_copy, momentum_update, without_drop_path
from selfsight.nn.multicrop import group_by_resolution
from selfsight.nn.undo import StepUndo
from selfsight.schedules import linear_warmup

N_GLOBAL = 2


@dataclass
class IBOTMaskParams(MaskParams):
    kind: str = "block"               # official pred_shape block
    ratio: float = setting(0.3, unit=True)               # used only without ratio_range
    ratio_range: tuple = setting((0.1, 0.5), check=unit_range)  # pred_ratio 0.3 ± pred_ratio_var 0.2
    unmasked_share: float = setting(0.5, unit=True)      # pred_ratio 0 for the other half
    min_patches: int = setting(0, at_least=0)             # 0 = (min(h, w) // 3)² of the global crops' grid (official)
    views: tuple = ()                 # global crops to mask; [] = both


@dataclass
class IBOTParams:
    name: str = "ibot"
    out_dim: int = setting(8192, at_least=1)              # K, class and patch tokens (shared head)
    hidden_dim: int = setting(2048, at_least=1)
    bottleneck_dim: int = setting(256, at_least=1)
    head_layers: int = setting(3, at_least=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True      # official default; the ViT-S recipe: false
    student_temp: float = setting(0.1, above=0)
    teacher_temp: float = setting(0.07, above=0)       # class token, after the warm-up (README recipe; keep <= 0.07)
    warmup_teacher_temp: float = setting(0.04, above=0)
    teacher_patch_temp: float = setting(0.07, above=0) # patch tokens, after the warm-up
    warmup_teacher_patch_temp: float = setting(0.04, above=0)
    teacher_temp_warmup_epochs: float = setting(30.0, at_least=0)
    center_momentum: float = setting(0.9, unit=True)     # c1 (class token)
    patch_center_momentum: float = setting(0.9, unit=True) # c2 (patch tokens)
    momentum: float = setting(0.996, unit=True)          # teacher EMA, cosine to momentum_end per step
    momentum_end: float = setting(1.0, unit=True)
    freeze_last_layer: float = setting(1.0, at_least=0)   # epochs without updates of the (shared) last layer
    lambda1: float = setting(1.0, at_least=0)             # weight of L_cls
    lambda2: float = setting(1.0, at_least=0)             # weight of L_patch
    pred_start_epoch: float = setting(0.0, at_least=0)    # no masking before (official: 50 for Swin)
    mask: IBOTMaskParams = field(default_factory=IBOTMaskParams)


def masked_global_crops(backbone: nn.Module, mask_views, method: str) -> tuple:
    """The global crops a self-distillation method with masked patches (iBOT, DINOv2) masks, after
    checking that the backbone is a ViT and switching it to mask tokens (before the teacher copy, so
    student and teacher zip equal parameter lists). One line naming the key otherwise."""
    if not hasattr(backbone, "enable_masking"):
        raise ValueError(f"{method} needs a ViT backbone (backbone.name: vit_tiny, vit_small, vit_base, vit_large or "
                         f"timm:NAME), got backbone.name={getattr(backbone, 'name', type(backbone).__name__)!r}")
    views = tuple(mask_views) or tuple(range(N_GLOBAL))
    if not set(views) <= set(range(N_GLOBAL)):
        raise ValueError(f"method.mask.views: {method} masks global crops only (0, 1), got {list(mask_views)}")
    backbone.enable_masking("token")
    return views


class IBOT(nn.Module):
    def __init__(self, params: IBOTParams, backbone: nn.Module):
        super().__init__()
        p = self.params = params
        views = masked_global_crops(backbone, p.mask.views, "iBOT")
        self.student = backbone
        self.head = DINOHead(backbone.embed_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers,
                             p.use_bn_in_head, p.norm_last_layer)
        self.teacher = without_drop_path(momentum_copy(self.student))
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, p.out_dim))              # c1: 1×K, checkpointed
        self.register_buffer("patch_center", torch.zeros(1, p.out_dim))        # c2: 1×K, checkpointed
        self.undo = StepUndo()
        grid = backbone.net.patch_embed.grid_size
        self.masker = build_masker(p.mask, backbone.patch_size, views, p.mask.min_patches
                                   or max(1, (min(grid) // 3) ** 2))

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the teacher's backbone (methods.md pitfall 25)."""
        return self.teacher

    def finetune_network(self) -> nn.Module:
        return self.teacher

    def before_optimizer_step(self, sched: dict) -> None:
        freeze_last_layer(self.head, sched.get("epoch", math.inf), self.params.freeze_last_layer)

    def make_masker(self) -> ViewMasker:
        """The loader draws the global crops' masks with this when it assembles a batch."""
        return self.masker

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def teacher_temperatures(self, epoch: float) -> tuple[float, float]:
        """(τ_t class, τ_t' patch); the patch warm-up starts at ``pred_start_epoch`` (official)."""
        p = self.params
        return (linear_warmup(epoch, p.warmup_teacher_temp, p.teacher_temp, p.teacher_temp_warmup_epochs),
                linear_warmup(max(0.0, epoch - p.pred_start_epoch), p.warmup_teacher_patch_temp,
                              p.teacher_patch_temp, p.teacher_temp_warmup_epochs))

    def after_step(self, sched: dict) -> None:
        momentum_update([self.teacher, self.teacher_head], [self.student, self.head],
                        sched.get("momentum", self.params.momentum), sched.get("finite"))
        self.undo.settle(sched.get("finite"))

    def _masks(self, batch: dict, epoch: float) -> list[torch.Tensor]:
        """N_GLOBAL bool masks B×N (True = masked); all False for a crop not masked or before pred_start_epoch."""
        views = batch["views"]
        masks = batch.get("masks")
        if masks is None:                   # a batch built outside the loader
            masks = self.masker(views, int(batch.get("seed", 0)))
        out = []
        for v, m in zip(views[:N_GLOBAL], masks[:N_GLOBAL]):
            gh, gw = self.masker.grid(v.shape[-2:])
            if m is None or epoch < self.params.pred_start_epoch:
                m = torch.zeros(v.shape[0], gh * gw, dtype=torch.bool, device=v.device)
            out.append(m.reshape(v.shape[0], gh * gw))
        return out

    def training_step(self, batch: dict, sched: dict) -> dict:
        p, views = self.params, batch["views"]                                  # 2 global + n local
        if len(views) < N_GLOBAL:
            raise ValueError("iBOT needs at least two views (views.n_views: 2)")
        epoch = sched.get("epoch", 0.0)
        masks = self._masks(batch, epoch)
        g, mask = torch.cat(views[:N_GLOBAL]), torch.cat(masks)               # (2B)×C×H×W, (2B)×N
        f = self.student.forward_features(g, mask)                             # cls (2B)×D, patch (2B)×N×D
        local = [self.student(x) for x in group_by_resolution(views[N_GLOBAL:])]   # per resolution: (n·B)×D
        n_tok = f.patch.shape[0] * f.patch.shape[1]
        out = self.head(torch.cat([f.cls, *local, f.patch.flatten(0, 1)]))      # (V·B + 2B·N)×K
        s_cls = out[:-n_tok].chunk(len(views))                                  # V × (B×K)
        s_patch = out[-n_tok:].view(*f.patch.shape[:2], -1).chunk(N_GLOBAL)     # 2 × (B×N×K)
        tau, tau_patch = self.teacher_temperatures(epoch)
        with torch.no_grad():
            tf = self.teacher.forward_features(g)                              # intact global crops
            t_out = self.teacher_head(torch.cat([tf.cls, tf.patch.flatten(0, 1)]))
            t_cls, t_patch = t_out[:g.shape[0]], t_out[g.shape[0]:].view(*tf.patch.shape[:2], -1)  # (2B)×K, (2B)×N×K
            t_p = teacher_probs(t_cls, self.center, tau)
            t_pp = teacher_probs(t_patch, self.patch_center, tau_patch)
        loss_cls = dino_loss(list(s_cls), list(t_p.chunk(N_GLOBAL)), p.student_temp)
        loss_patch = ibot_patch_loss(list(s_patch), list(t_pp.chunk(N_GLOBAL)), masks, p.student_temp)
        loss = p.lambda1 * loss_cls + p.lambda2 * loss_patch
        with torch.no_grad():                                                   # 8 images: B×N×K is large
            ent = -(t_pp[:8] * t_pp[:8].clamp_min(1e-12).log()).sum(-1).mean()
        monitor = {**dino_monitor(t_p, s_cls[:N_GLOBAL], p.student_temp), "ibot_cls_loss": loss_cls.detach(),
                   "ibot_patch_loss": loss_patch.detach(), "ibot_patch_entropy_ratio": ent / math.log(p.out_dim),
                   "mask_ratio": mask.float().mean(), "ibot_teacher_temp": tau, "ibot_teacher_patch_temp": tau_patch}
        self.undo.keep(self.center)                                             # put back on a skipped step
        self.undo.keep(self.patch_center)
        update_center(self.center, t_cls, p.center_momentum)                   # after the loss
        update_patch_center(self.patch_center, t_patch, p.patch_center_momentum)
        b = views[0].shape[0]
        return {"loss": loss, "embedding": f.cls[:b].detach(), "monitor": monitor}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "ibot", IBOTParams, check=vit_only,
    # ViT-S/16 recipe (README; main_ibot.py defaults as DINO's): AdamW lr 5e-4·B/256, 10 warm-up
    # epochs, cosine to 1e-6, wd cosine 0.04 -> 0.4 (weights only), per-parameter clipping at 3,
    # drop-path 0.1 in the student; 2 global crops (0.25-1) with BYOL's asymmetric blur/solarize and
    # 10 local crops (0.05-0.25, blur 0.5).
    defaults={"optim": DINO_VIT_OPTIM,
              "backbone": {"name": "vit_small", "drop_path": 0.1},
              "views": {**DINO_VIEWS, "crop_scale": [0.25, 1.0], "local_crops": 10, "local_crop_scale": [0.05, 0.25]}},
    summary="iBOT: DINO on the class token + masked-patch self-distillation to the EMA teacher (shared head)",
)(IBOT)
