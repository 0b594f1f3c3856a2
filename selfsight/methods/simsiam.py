"""SimSiam (Chen & He 2021, Alg. 1; ``facebookresearch/simsiam``: builder.py, main_simsiam.py;
methods.md §6, pitfalls 6-8).

encoder f = backbone -> projector (3 layers: [Linear(no bias) -> BN -> ReLU] x 2 -> Linear ->
BN without affine; the output Linear's bias is dropped since the affine-free BN removes it),
predictor h = Linear(no bias) -> BN -> ReLU -> Linear (bottleneck, NO BN at the output).

    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -cos(p, z)

The two views go through the network in separate passes (BN statistics per view, as the
official code). ``fix_pred_lr`` keeps the predictor at the base learning rate (not decayed),
as the README's 68.1 result. ``stop_gradient=false`` removes the stop-gradient: the network
collapses (the paper's Fig. 2), kept to demonstrate the collapse monitor. Evaluation and export
use the backbone alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from selfsight.augment.views import MOCO_V2_VIEWS
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import negative_cosine
from selfsight.methods import register_method


@dataclass
class SimSiamParams:
    name: str = "simsiam"
    dim: int = setting(2048, at_least=1)                  # projector output (and predictor output)
    proj_hidden_dim: int = setting(0, at_least=0)         # 0 = the backbone's width (official: prev_dim)
    proj_layers: int = setting(3, at_least=1)             # the paper's CIFAR variant uses 2
    pred_hidden_dim: int = setting(512, at_least=1)       # bottleneck
    fix_pred_lr: bool = True
    stop_gradient: bool = True


class SimSiam(nn.Module):
    def __init__(self, params: SimSiamParams, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.student = backbone
        self.projector = ProjectionMLP(backbone.embed_dim, params.proj_hidden_dim or backbone.embed_dim,
                                       params.dim, params.proj_layers, last_bn="plain")
        self.predictor = ProjectionMLP(params.dim, params.pred_hidden_dim, params.dim, 2, last_bn="none")

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters kept at the base learning rate by the engine (``--fix-pred-lr``)."""
        return list(self.predictor.parameters()) if self.params.fix_pred_lr else []

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                          # N×C×S×S each
        z1 = self.projector(self.student(x1))                                # N×d
        z2 = self.projector(self.student(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.params.stop_gradient:
            loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        else:                                                                # ablation: collapses
            loss = -(nn.functional.cosine_similarity(p1, z2).mean() + nn.functional.cosine_similarity(p2, z1).mean()) / 2
        return {"loss": loss, "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "simsiam", SimSiamParams,
    # SGD lr 0.05·B/256, momentum 0.9, wd 1e-4, cosine without warm-up, zero-init residuals,
    # SyncBN under DDP; MoCo v2's aug+ views (crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p 0.8,
    # gray 0.2, blur p 0.5 at 224 px).
    # main_simsiam.py's SGD takes the encoder's and predictor's parameters whole: weight decay on
    # every parameter (BN, biases too): decay_all
    defaults={"optim": {"name": "sgd", "lr": 0.05, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 1e-4, "momentum": 0.9, "warmup_epochs": 0, "decay_all": True},
              "backbone": {"sync_bn": True, "zero_init_residual": True},
              "views": MOCO_V2_VIEWS},
    summary="SimSiam: predictor + stop-gradient, negative cosine, no negatives and no momentum encoder",
)(SimSiam)
