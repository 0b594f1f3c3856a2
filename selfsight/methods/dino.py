"""DINO (Caron et al. 2021, Alg. 1; ``dino:main_dino.py``, ``utils.MultiCropWrapper``; methods.md §8,
pitfalls 10-15, 24-25).

student = backbone (drop-path as configured) -> DINOHead, sees every crop; teacher = an EMA copy of
both (parameters only, cosine 0.996 -> 1 per step, updated after the optimizer step) without
drop-path, sees only the global crops. Crops of equal resolution go through the backbone in one
forward (the two global crops together, then the local crops), the head runs once on all of them
(MultiCropWrapper); ViTs interpolate their position embeddings for the local crops' size.

Loss (``losses.dino``): teacher softmax at τ_t of the centred outputs, student log-softmax at
τ_s = 0.1, cross-entropy over the (global crop, other crop) pairs with the same view skipped.
The center (a buffer, so checkpointed) is updated after the loss, from the teacher's global-crop
outputs all-reduced over processes. τ_t warms up linearly from 0.04 to 0.07 over
``teacher_temp_warmup_epochs`` (the official code indexes a per-epoch table; here the warm-up is
linear per step, the same line sampled more finely). The last layer gets no update while
``epoch < freeze_last_layer`` (its gradients are dropped between backward and the optimizer step).
Weight decay 0.04 -> 0.4 (cosine), per-parameter gradient clipping at 3 and AdamW 5e-4·B/256 are
the method's recipe defaults. Evaluation and export use the TEACHER backbone.

Logged for the collapse monitor: the teacher's mean entropy (uniform collapse: ln K), the entropy
of its batch-mean distribution (one-hot collapse: 0) and the KL divergence teacher || student.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from selfsight.augment.views import DINO_VIEWS
from selfsight.config import setting
from selfsight.heads.dino import DINOHead, freeze_last_layer
from selfsight.losses.dino import dino_loss, dino_monitor, teacher_probs, update_center
from selfsight.methods import register_method
from selfsight.nn.momentum import momentum_copy, momentum_update, without_drop_path
from selfsight.nn.multicrop import group_by_resolution
from selfsight.nn.undo import StepUndo
from selfsight.schedules import linear_warmup


@dataclass
class DINOParams:
    name: str = "dino"
    out_dim: int = setting(65536, at_least=1)             # K prototypes
    hidden_dim: int = setting(2048, at_least=1)
    bottleneck_dim: int = setting(256, at_least=1)
    head_layers: int = setting(3, at_least=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True      # freeze the weight norm of the last layer at 1
    student_temp: float = setting(0.1, above=0)
    teacher_temp: float = setting(0.07, above=0)       # after the warm-up; keep <= 0.07 (pitfall 10)
    warmup_teacher_temp: float = setting(0.04, above=0)
    teacher_temp_warmup_epochs: float = setting(30.0, at_least=0)
    center_momentum: float = setting(0.9, unit=True)
    momentum: float = setting(0.996, unit=True)          # teacher EMA, cosine to momentum_end; 0.9995 at small batch (B 256)
    momentum_end: float = setting(1.0, unit=True)
    freeze_last_layer: float = setting(1.0, at_least=0)   # epochs without updates of the last layer


class DINO(nn.Module):
    def __init__(self, params: DINOParams, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.student = backbone
        self.head = DINOHead(backbone.embed_dim, params.out_dim, params.hidden_dim, params.bottleneck_dim,
                             params.head_layers, params.use_bn_in_head, params.norm_last_layer)
        self.teacher = without_drop_path(momentum_copy(self.student))
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, params.out_dim))          # 1×K, checkpointed
        self.undo = StepUndo()

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the teacher's backbone (methods.md pitfall 25)."""
        return self.teacher

    def finetune_network(self) -> nn.Module:
        return self.teacher

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def teacher_temperature(self, epoch: float) -> float:
        p = self.params
        return linear_warmup(epoch, p.warmup_teacher_temp, p.teacher_temp, p.teacher_temp_warmup_epochs)

    def before_optimizer_step(self, sched: dict) -> None:
        freeze_last_layer(self.head, sched.get("epoch", math.inf), self.params.freeze_last_layer)

    def after_step(self, sched: dict) -> None:
        momentum_update([self.teacher, self.teacher_head], [self.student, self.head],
                        sched.get("momentum", self.params.momentum), sched.get("finite"))
        self.undo.settle(sched.get("finite"))

    def training_step(self, batch: dict, sched: dict) -> dict:
        views = batch["views"]                                                  # 2 global + n local
        n_global = 2
        if len(views) < 2:
            raise ValueError("DINO needs at least two views (views.n_views: 2)")
        feats = [self.student(x) for x in group_by_resolution(views)]          # per resolution: (n·B)×D
        student_logits = self.head(torch.cat(feats)).chunk(len(views))          # V × (B×K)
        tau_t = self.teacher_temperature(sched.get("epoch", 0.0))
        with torch.no_grad():
            t_logits = self.teacher_head(self.teacher(torch.cat(views[:n_global])))   # (2B)×K
            t_p = teacher_probs(t_logits, self.center, tau_t)
            t_chunks = t_p.chunk(n_global)
        loss = dino_loss(list(student_logits), list(t_chunks), self.params.student_temp)
        monitor = {**dino_monitor(t_p, student_logits[:n_global], self.params.student_temp),
                   "dino_teacher_temp": tau_t}
        self.undo.keep(self.center)                                             # put back on a skipped step
        update_center(self.center, t_logits, self.params.center_momentum)      # after the loss
        b = views[0].shape[0]
        return {"loss": loss, "embedding": feats[0][:b].detach(), "monitor": monitor}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


# DINO's ViT optimizer (main_dino.py), shared with iBOT (main_ibot.py uses the same defaults)
DINO_VIT_OPTIM = {"name": "adamw", "lr": 5e-4, "lr_scaling": "linear", "base_batch": 256, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "warmup_epochs": 10, "min_lr": 1e-6, "clip_grad": 3.0,
                  "clip_mode": "per_param"}

register_method(
    "dino", DINOParams,
    # ViT recipe (main_dino.py): AdamW lr 5e-4·B/256, 10 warm-up epochs, cosine to 1e-6, wd cosine
    # 0.04 -> 0.4 (weights only), per-parameter clipping at 3.0, drop-path 0.1 in the student;
    # views: 2 global crops (0.4-1) with BYOL's asymmetric blur/solarize and 8 local crops (0.05-0.4,
    # 96/224 of the size, blur 0.5). ConvNets (README): configs/dino_*.yaml use SGD 0.03, wd 1e-4.
    defaults={"optim": DINO_VIT_OPTIM,
              "backbone": {"drop_path": 0.1, "sync_bn": True},
              "views": DINO_VIEWS},
    summary="DINO: self-distillation to an EMA teacher with centering, sharpening and multi-crop",
)(DINO)
