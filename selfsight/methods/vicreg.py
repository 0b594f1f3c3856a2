"""VICReg (Bardes, Ponce, LeCun 2022; ``facebookresearch/vicreg:main_vicreg.py``).

backbone -> expander ([Linear -> BN -> ReLU] x 2 -> Linear(no bias), 8192 wide), then the
variance-invariance-covariance loss of ``losses/redundancy.py`` (λ = μ = 25, ν = 1). The two
views go through the network in separate passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from selfsight.augment.views import BYOL_VIEWS
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import vicreg_loss
from selfsight.methods import register_method


@dataclass
class VICRegParams:
    name: str = "vicreg"
    proj_dim: int = setting(8192, at_least=1)             # width of every expander layer ("8192-8192-8192")
    proj_layers: int = setting(3, at_least=1)
    sim_coeff: float = setting(25.0, at_least=0)          # λ, invariance
    std_coeff: float = setting(25.0, at_least=0)          # μ, variance
    cov_coeff: float = setting(1.0, at_least=0)           # ν, covariance


class VICReg(nn.Module):
    def __init__(self, params: VICRegParams, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.student = backbone
        self.projector = ProjectionMLP(backbone.embed_dim, params.proj_dim, params.proj_dim, params.proj_layers,
                                       last_bn="none", hidden_bias=True, last_bias=False)

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                          # N×C×S×S each
        z1 = self.projector(self.student(x1))                                # N×D
        z2 = self.projector(self.student(x2))
        p = self.params
        loss = vicreg_loss(z1, z2, p.sim_coeff, p.std_coeff, p.cov_coeff)
        return {"loss": loss, "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "vicreg", VICRegParams,
    # LARS lr 0.2·B/256, wd 1e-6, 10 warm-up epochs, cosine, SyncBN; BYOL's asymmetric views.
    defaults={"optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 1e-6, "warmup_epochs": 10},
              "backbone": {"sync_bn": True},
              "views": BYOL_VIEWS},
    summary="VICReg: invariance + variance hinge + covariance decorrelation of the two views' embeddings",
)(VICReg)
