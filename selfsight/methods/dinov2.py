"""DINOv2 (Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without Supervision", Sec. 4;
``dinov2:dinov2/train/ssl_meta_arch.py``, ``configs/ssl_default_config.yaml``, ``data/collate.py``):
iBOT's two self-distillation terms (``methods/ibot.py``) plus what DINOv2 changed.

* student = ViT with a mask token -> DINO head on the class tokens of every crop, iBOT head on the
  masked patch tokens of the 2 global crops (only those go through the head, as the official code:
  a fixed number of rows, the masker's upper bound, masked patches first and padding of weight 0
  after them, so that nothing is read back from the device).
  ``separate_head=true`` unties the two heads (the ViT-L/g recipes; the default config shares one).
  teacher = EMA of both (parameters only; cosine 0.992 -> 1 per step), no drop-path, intact global crops.
* loss = w_dino·L_dino + w_ibot·L_ibot + w_koleo·L_koleo:
  - L_dino: DINO's cross-view loss on the class tokens (``losses.dino``);
  - L_ibot: the masked patches' cross-entropy, averaged per image over its masked patches, then over
    the 2B global-crop images (``losses.ibot.ibot_masked_loss``);
  - L_koleo: KoLeo on the student's class tokens (backbone output, L2-normalised), per global crop,
    summed over the two crops (``losses.koleo``; weight 0.1; per process as the official code).
* teacher targets: ``centering="center"``, DINO's softmax of the centred outputs (two running
  centers, class and masked patches); ``centering="sinkhorn"``, Sinkhorn-Knopp (3 iterations) on the
  class outputs of both global crops and on the masked patch outputs (``losses.sinkhorn``). One
  teacher temperature for both terms, 0.04 -> 0.07 over 30 epochs.
* masks: half of each global crop's images masked, each with its own ratio ~ U(0.1, 0.5), block-wise
  (smallest block 4 patches, largest half the grid: official ``MaskingGenerator(max_num_patches=0.5·N)``).
* recipe: AdamW, lr 4e-3·sqrt(B/1024), 10 warm-up epochs, cosine to 1e-6, wd 0.04 -> 0.4, layer-wise
  lr decay 0.9 and patch-embedding lr x 0.2 (``optim.layer_decay``, ``optim.patch_embed_lr_scale``),
  gradient clipping 3, last layer frozen for 1 epoch, LayerScale 1e-5, drop-path 0.3.

Deviations: masked images are chosen per global crop (round(B/2) of each; official: half of the 2B
crops together, ratios stratified over [0.1, 0.5] bins) and a block mask's target is round(r·N)
(official int(r·N)); gradients are clipped at 3 over all parameters together (official: the
backbone and each head separately); the patch center is the mean of the masked patches' teacher
outputs (the official ``update_center`` averages an M×K tensor over K, a constant shift that the
softmax ignores); stochastic depth rises linearly over the blocks (timm; official
``drop_path_uniform``: the same rate in every block); the temperature warm-up is linear per step;
the teacher holds a never-used EMA copy of the mask token. The iBOT rows' bound assumes the masks
come from this method's masker (the loader's), whose count of masked images per crop is fixed.
Evaluation and export use the TEACHER backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from selfsight.augment.views import DINO_VIEWS
from selfsight.config import setting
from selfsight.heads.dino import DINOHead, freeze_last_layer
from selfsight.losses.dino import dino_loss, dino_monitor, teacher_probs, update_center
from selfsight.losses.ibot import ibot_masked_loss, masked_rows
from selfsight.losses.koleo import koleo_loss
from selfsight.losses.sinkhorn import sinkhorn_knopp
from selfsight.masking.views import ViewMasker, build_masker
from selfsight.methods import register_method, vit_only
from selfsight.methods.ibot import N_GLOBAL, IBOTMaskParams, masked_global_crops
from selfsight.nn.momentum import momentum_copy, momentum_update, without_drop_path
from selfsight.nn.multicrop import group_by_resolution
from selfsight.nn.undo import StepUndo
from selfsight.schedules import linear_warmup


@dataclass
class DINOv2MaskParams(IBOTMaskParams):
    min_patches: int = setting(4, at_least=1)             # official MaskingGenerator min_num_patches
    max_patches: int = setting(0, at_least=0)             # 0 = half the global crops' grid (official)


@dataclass
class DINOv2Params:
    name: str = "dinov2"
    out_dim: int = setting(65536, at_least=1)             # DINO head prototypes (ViT-L/g recipes: 131072)
    hidden_dim: int = setting(2048, at_least=1)
    bottleneck_dim: int = setting(256, at_least=1)        # ViT-L/g recipes: 384
    head_layers: int = setting(3, at_least=1)
    separate_head: bool = False       # untie the iBOT head (ViT-L/g recipes: true)
    ibot_out_dim: int = setting(0, at_least=0)            # iBOT head, separate_head only; 0 = as the DINO head
    ibot_hidden_dim: int = setting(0, at_least=0)
    ibot_bottleneck_dim: int = setting(0, at_least=0)
    use_bn_in_head: bool = False
    norm_last_layer: bool = False     # DINOv2's last layer keeps a trainable weight norm
    student_temp: float = setting(0.1, above=0)
    teacher_temp: float = setting(0.07, above=0)          # class and patch tokens, after the warm-up
    warmup_teacher_temp: float = setting(0.04, above=0)
    teacher_temp_warmup_epochs: float = setting(30.0, at_least=0)
    centering: str = setting("center", choices=("center", "sinkhorn"))   # official train.centering
    sinkhorn_iterations: int = setting(3, at_least=1)
    center_momentum: float = setting(0.9, unit=True)
    momentum: float = setting(0.992, unit=True)           # teacher EMA, cosine to momentum_end per step
    momentum_end: float = setting(1.0, unit=True)
    freeze_last_layer: float = setting(1.0, at_least=0)   # epochs
    dino_weight: float = setting(1.0, at_least=0)
    ibot_weight: float = setting(1.0, at_least=0)
    koleo_weight: float = setting(0.1, at_least=0)
    koleo_scope: str = setting("process", choices=("process", "global"))  # neighbours: own batch (official) | all
    mask: DINOv2MaskParams = field(default_factory=DINOv2MaskParams)


class DINOv2(nn.Module):
    def __init__(self, params: DINOv2Params, backbone: nn.Module):
        super().__init__()
        p = self.params = params
        views = masked_global_crops(backbone, p.mask.views, "DINOv2")
        self.student = backbone
        self.head = DINOHead(backbone.embed_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers,
                             p.use_bn_in_head, p.norm_last_layer)
        self.ibot_head = (DINOHead(backbone.embed_dim, p.ibot_out_dim or p.out_dim, p.ibot_hidden_dim or p.hidden_dim,
                                   p.ibot_bottleneck_dim or p.bottleneck_dim, p.head_layers, p.use_bn_in_head,
                                   p.norm_last_layer) if p.separate_head else None)
        self.teacher = without_drop_path(momentum_copy(self.student))
        self.teacher_head = momentum_copy(self.head)
        self.teacher_ibot_head = momentum_copy(self.ibot_head) if p.separate_head else None
        k_patch = self.ibot_head.last_layer.weight.shape[0] if p.separate_head else p.out_dim
        self.register_buffer("center", torch.zeros(1, p.out_dim))              # centering="center" only
        self.register_buffer("patch_center", torch.zeros(1, k_patch))
        self.undo = StepUndo()
        gh, gw = backbone.net.patch_embed.grid_size
        # 0 = the official max_num_patches, 0.5·N of the global crops' grid
        self.masker: ViewMasker = build_masker(p.mask, backbone.patch_size, views,
                                               max_patches=p.mask.max_patches or max(1, gh * gw // 2))

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the teacher's backbone (methods.md pitfall 25)."""
        return self.teacher

    def finetune_network(self) -> nn.Module:
        return self.teacher

    def make_masker(self) -> ViewMasker:
        return self.masker

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def teacher_temperature(self, epoch: float) -> float:
        p = self.params
        return linear_warmup(epoch, p.warmup_teacher_temp, p.teacher_temp, p.teacher_temp_warmup_epochs)

    def before_optimizer_step(self, sched: dict) -> None:
        for head in (self.head, self.ibot_head):
            if head is not None:
                freeze_last_layer(head, sched.get("epoch", math.inf), self.params.freeze_last_layer)

    def after_step(self, sched: dict) -> None:
        pairs = [(self.teacher, self.student), (self.teacher_head, self.head)]
        if self.ibot_head is not None:
            pairs.append((self.teacher_ibot_head, self.ibot_head))
        momentum_update([t for t, _ in pairs], [o for _, o in pairs], sched.get("momentum", self.params.momentum),
                        sched.get("finite"))
        self.undo.settle(sched.get("finite"))

    def _masks(self, batch: dict) -> torch.Tensor:
        """(2B)×N bool (True = masked) for the two global crops together."""
        views, masks = batch["views"], batch.get("masks")
        if masks is None:                   # a batch built outside the loader
            masks = self.masker(views, int(batch.get("seed", 0)))
        out = []
        for v, m in zip(views[:N_GLOBAL], masks[:N_GLOBAL]):
            gh, gw = self.masker.grid(v.shape[-2:])
            out.append(torch.zeros(v.shape[0], gh * gw, dtype=torch.bool, device=v.device) if m is None
                       else m.reshape(v.shape[0], gh * gw))
        return torch.cat(out)

    def _masked_bound(self, b: int, n: int) -> int:
        """At most how many patches the masker masks in the 2 global crops of B images with N patches
        each (masked images × the largest ratio's count): the fixed number of rows the iBOT term takes."""
        gen = self.masker.generator
        hi = gen.ratio_range[1] if gen.ratio_range else gen.ratio
        masked_images = b - round(gen.unmasked_share * b)
        return N_GLOBAL * masked_images * min(n, math.ceil(hi * n) + 1)

    def _targets(self, cls_logits: torch.Tensor, patch_logits: torch.Tensor, rows: torch.Tensor, tau: float):
        """Teacher probabilities of the class outputs (2B)×K and of the chosen patch rows R×K' (``rows``:
        the masked ones among them)."""
        if self.params.centering == "sinkhorn":
            it = self.params.sinkhorn_iterations
            return sinkhorn_knopp(cls_logits, tau, it), sinkhorn_knopp(patch_logits, tau, it, rows)
        return teacher_probs(cls_logits, self.center, tau), teacher_probs(patch_logits, self.patch_center, tau)

    def training_step(self, batch: dict, sched: dict) -> dict:
        p, views = self.params, batch["views"]                                  # 2 global + n local
        if len(views) < N_GLOBAL:
            raise ValueError("DINOv2 needs at least two views (views.n_views: 2)")
        mask = self._masks(batch)                                               # (2B)×N
        b, n = views[0].shape[0], mask.shape[1]
        # the masked patches as R fixed rows (masked first, then padding of weight 0): no host wait
        order, weight = masked_rows(mask, self._masked_bound(b, n))             # R, R
        rows = weight > 0
        g = torch.cat(views[:N_GLOBAL])                                         # (2B)×C×H×W
        f = self.student.forward_features(g, mask)                             # cls (2B)×D, patch (2B)×N×D
        local = [self.student(x) for x in group_by_resolution(views[N_GLOBAL:])]   # per resolution: (n·B)×D
        picked = f.patch.flatten(0, 1)[order]                                   # R×D
        if self.ibot_head is None:                                              # one head, one call
            out = self.head(torch.cat([f.cls, *local, picked]))
            s_cls, s_patch = out[:out.shape[0] - picked.shape[0]], out[out.shape[0] - picked.shape[0]:]
        else:
            s_cls, s_patch = self.head(torch.cat([f.cls, *local])), self.ibot_head(picked)
        s_cls = s_cls.chunk(len(views))                                         # V × (B×K)
        tau = self.teacher_temperature(sched.get("epoch", 0.0))
        with torch.no_grad():
            tf = self.teacher.forward_features(g)                              # intact global crops
            t_picked = tf.patch.flatten(0, 1)[order]                            # R×D
            if self.teacher_ibot_head is None:
                t_out = self.teacher_head(torch.cat([tf.cls, t_picked]))
                t_cls, t_patch = t_out[:g.shape[0]], t_out[g.shape[0]:]
            else:
                t_cls, t_patch = self.teacher_head(tf.cls), self.teacher_ibot_head(t_picked)
            t_p, t_pp = self._targets(t_cls, t_patch, rows, tau)               # (2B)×K, R×K'
        loss_dino = dino_loss(list(s_cls), list(t_p.chunk(N_GLOBAL)), p.student_temp)
        loss_ibot = ibot_masked_loss(s_patch, t_pp, weight, g.shape[0], p.student_temp)
        loss = p.dino_weight * loss_dino + p.ibot_weight * loss_ibot
        monitor = {**dino_monitor(t_p, s_cls[:N_GLOBAL], p.student_temp), "dinov2_dino_loss": loss_dino.detach(),
                   "dinov2_ibot_loss": loss_ibot.detach(), "mask_ratio": mask.float().mean(),
                   "dinov2_teacher_temp": tau}
        if p.koleo_weight > 0:          # per global crop: never two crops of one image as neighbours
            loss_koleo = sum(koleo_loss(c, scope=p.koleo_scope) for c in f.cls.chunk(N_GLOBAL))
            loss = loss + p.koleo_weight * loss_koleo
            monitor["dinov2_koleo_loss"] = loss_koleo.detach()
        if p.centering == "center":
            self.undo.keep(self.center)                                         # put back on a skipped step
            self.undo.keep(self.patch_center)
            update_center(self.center, t_cls, p.center_momentum)               # after the loss
            update_center(self.patch_center, t_patch, p.center_momentum, rows)
        return {"loss": loss, "embedding": f.cls[:b].detach(), "monitor": monitor}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


# DINOv2's optimizer (ssl_default_config.yaml): AdamW 4e-3·sqrt(B/1024), 10 warm-up epochs, cosine to
# 1e-6, wd cosine 0.04 -> 0.4, layer-wise decay 0.9, patch embedding x 0.2, clipping at 3
DINOV2_OPTIM = {"name": "adamw", "lr": 4e-3, "lr_scaling": "sqrt", "base_batch": 1024, "weight_decay": 0.04,
                "weight_decay_end": 0.4, "warmup_epochs": 10, "min_lr": 1e-6, "clip_grad": 3.0, "clip_mode": "global",
                "layer_decay": 0.9, "patch_embed_lr_scale": 0.2}

register_method(
    "dinov2", DINOv2Params, check=vit_only,
    # ssl_default_config.yaml: ViT with LayerScale 1e-5 and drop-path 0.3; 2 global crops (0.32-1) with
    # BYOL's asymmetric blur/solarize, 8 local crops (0.05-0.32, 96/224 of the size)
    defaults={"optim": DINOV2_OPTIM,
              "backbone": {"name": "vit_small", "drop_path": 0.3, "layer_scale": 1e-5},
              "views": {**DINO_VIEWS, "crop_scale": [0.32, 1.0], "local_crops": 8, "local_crop_scale": [0.05, 0.32]}},
    summary="DINOv2: DINO + iBOT with KoLeo, Sinkhorn-Knopp centering, separate heads and DINOv2 masking",
)(DINOv2)
