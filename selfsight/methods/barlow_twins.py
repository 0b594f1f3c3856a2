"""Barlow Twins (Zbontar et al. 2021; ``facebookresearch/barlowtwins:main.py``).

backbone -> projector ([Linear(no bias) -> BN -> ReLU] x 2 -> Linear(no bias), 8192 wide) ->
affine-free BN (global statistics under DDP), then the cross-correlation loss of
``losses/redundancy.py`` with λ = 0.0051. The two views go through the network in separate passes.

Deviation: the official LARS gives biases and BN parameters their own learning rate (0.0048 vs
0.2 per 256); here they share the weights' schedule (without decay or adaptation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from selfsight.augment.views import BYOL_VIEWS
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import barlow_twins_loss
from selfsight.methods import register_method


@dataclass
class BarlowTwinsParams:
    name: str = "barlow_twins"
    proj_dim: int = setting(8192, at_least=1)             # width of every projector layer ("8192-8192-8192")
    proj_layers: int = setting(3, at_least=1)
    lambd: float = setting(0.0051, at_least=0)            # weight of the off-diagonal (redundancy) term


class BarlowTwins(nn.Module):
    def __init__(self, params: BarlowTwinsParams, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.student = backbone
        self.projector = ProjectionMLP(backbone.embed_dim, params.proj_dim, params.proj_dim, params.proj_layers,
                                       last_bn="plain")          # the output BN is the loss's affine-free BN

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                          # N×C×S×S each
        z1 = self.projector(self.student(x1))                                # N×D, batch-normalized
        z2 = self.projector(self.student(x2))
        return {"loss": barlow_twins_loss(z1, z2, self.params.lambd), "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "barlow_twins", BarlowTwinsParams,
    # LARS lr 0.2·B/256, wd 1.5e-6, 10 warm-up epochs, cosine, SyncBN; BYOL's asymmetric views.
    defaults={"optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 1.5e-6, "warmup_epochs": 10},
              "backbone": {"sync_bn": True},
              "views": BYOL_VIEWS},
    summary="Barlow Twins: cross-correlation of the two views' embeddings driven to the identity",
)(BarlowTwins)
