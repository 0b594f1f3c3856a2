"""MoCo v3 (Chen, Xie, He 2021, Alg. 1; ``moco-v3:moco/builder.py``; methods.md §5, pitfalls 9, 24-25).

base encoder f_q = backbone -> projector -> predictor; momentum encoder f_k = a copy of backbone
-> projector (no predictor), updated with momentum m following a cosine from 0.99 to 1 per step,
inside the step before the key pass. No queue: the keys are the momentum encoder's outputs for
the other view, gathered from all processes without gradient (labels offset by rank):

    loss = ctr(q1, k2) + ctr(q2, k1),  ctr(q, k) = CE(q·k_all^T / τ, arange(N) + N·rank) · 2τ

The two views go through the encoders in separate passes (BN statistics per view, as the
official code). MLPs follow ``_build_mlp``: [Linear(no bias) -> BN -> ReLU] x (L-1) -> Linear(no
bias) [-> BN without affine]. ResNet: projector 2 layers with the output BN, predictor 2 layers
without it, τ 1.0. ViT: projector 3 layers, predictor WITH the output BN, τ 0.2, and the patch
projection frozen at its random init (``--stop-grad-conv1``). Under DDP the whole model uses
SyncBN (``backbone.sync_bn``, on by default). Evaluation and export use the base encoder's
backbone.

Deviation: timm's ViT keeps its learned position embedding (the official ViT uses a fixed
2-D sin-cos one) and its own initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from selfsight.augment.views import BYOL_VIEWS
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import moco_v3_loss
from selfsight.methods import register_method
from selfsight.nn.momentum import momentum_copy, momentum_update


@dataclass
class MoCoV3Params:
    name: str = "mocov3"
    temperature: float = setting(0.0, at_least=0)         # 0 = auto: 1.0 for ConvNets, 0.2 for ViTs
    proj_layers: int = setting(0, at_least=0)             # 0 = auto: 2 for ConvNets, 3 for ViTs
    hidden_dim: int = setting(4096, at_least=1)           # MLP hidden width (projector and predictor)
    dim: int = setting(256, at_least=1)                   # output width
    momentum: float = setting(0.99, unit=True)           # start of the cosine schedule
    momentum_end: float = setting(1.0, unit=True)
    freeze_patch_embed: bool = True   # ViTs: patch projection frozen at random init (stop-grad-conv1)


class MoCoV3(nn.Module):
    def __init__(self, params: MoCoV3Params, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.is_vit = isinstance(backbone, ViTBackbone)
        self.temperature = params.temperature or (0.2 if self.is_vit else 1.0)
        layers = params.proj_layers or (3 if self.is_vit else 2)
        self.student = backbone
        self.projector = ProjectionMLP(backbone.embed_dim, params.hidden_dim, params.dim, layers,
                                       last_bn="plain", hidden_bias=False, last_bias=False)
        self.predictor = ProjectionMLP(params.dim, params.hidden_dim, params.dim, 2,
                                       last_bn="plain" if self.is_vit else "none", hidden_bias=False, last_bias=False)
        if self.is_vit and params.freeze_patch_embed:
            for p in backbone.net.patch_embed.proj.parameters():
                p.requires_grad_(False)
        self.momentum_student = momentum_copy(self.student)
        self.momentum_projector = momentum_copy(self.projector)

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the base encoder's backbone."""
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                          # N×C×S×S each
        z1 = self.projector(self.student(x1))                                # N×d
        q1, q2 = self.predictor(z1), self.predictor(self.projector(self.student(x2)))
        with torch.no_grad():
            momentum_update([self.momentum_student, self.momentum_projector], [self.student, self.projector],
                            sched.get("momentum", self.params.momentum))
            k1 = self.momentum_projector(self.momentum_student(x1))          # N×d
            k2 = self.momentum_projector(self.momentum_student(x2))
        loss = moco_v3_loss(q1, k2, self.temperature) + moco_v3_loss(q2, k1, self.temperature)
        return {"loss": loss, "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "mocov3", MoCoV3Params,
    # ResNet recipe (CONFIG.md): LARS (FAIR flavour), lr 0.6·B/256 (100 ep; 0.3 for 300+), wd 1e-6,
    # 10 warm-up epochs, cosine; BYOL's asymmetric views with crop 0.2-1. ViTs: configs/mocov3_*vit*.yaml
    # (AdamW 1.5e-4·B/256, wd 0.1 on every parameter, 40 warm-up epochs).
    defaults={"optim": {"name": "lars", "lr": 0.6, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 1e-6, "warmup_epochs": 10},
              "backbone": {"sync_bn": True},
              "views": {**BYOL_VIEWS, "crop_scale": [0.2, 1.0]}},
    summary="MoCo v3: in-batch InfoNCE between predictor outputs and momentum keys, symmetric, x2τ",
)(MoCoV3)
