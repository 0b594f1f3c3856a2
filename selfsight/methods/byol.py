"""BYOL (Grill et al. 2020, Eq. 2-4; ``deepmind-research/byol``: byol_experiment.py,
utils/networks.py, utils/augmentations.py; methods.md §7, pitfalls 6-7, 24).

online = backbone -> projector -> predictor; target = backbone -> projector, an EMA of the
online weights (parameters only; BN statistics are the target's own, computed in training mode)
updated AFTER the optimizer step with τ following a cosine from 0.996 to 1 per step. MLPs:
Linear(bias) -> BN -> ReLU -> Linear(no bias), no BN at the outputs (``networks.MLP``).

    loss = mean_batch[ ||q̂(v1) - sg(ẑ'(v2))||² + ||q̂(v2) - sg(ẑ'(v1))||² ],  ||â - b̂||² = 2 - 2cos

The two views go through the networks in separate passes. Deviation: the target starts as a
copy of the online network (the official code initializes it with another RNG key; its
comment reports no significant difference). Evaluation and export use the online backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from selfsight.augment.views import BYOL_VIEWS
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import byol_regression
from selfsight.methods import register_method
from selfsight.nn.momentum import momentum_copy, momentum_update


@dataclass
class BYOLParams:
    name: str = "byol"
    hidden_dim: int = setting(4096, at_least=1)
    dim: int = setting(256, at_least=1)
    momentum: float = setting(0.996, unit=True)          # τ_base; the cosine schedule ends at momentum_end
    momentum_end: float = setting(1.0, unit=True)


class BYOL(nn.Module):
    def __init__(self, params: BYOLParams, backbone: nn.Module):
        super().__init__()
        self.params = params
        self.student = backbone

        def mlp(d_in):
            return ProjectionMLP(d_in, params.hidden_dim, params.dim, 2, last_bn="none",
                                 hidden_bias=True, last_bias=False)
        self.projector = mlp(backbone.embed_dim)
        self.predictor = mlp(params.dim)
        self.target_student = momentum_copy(self.student)
        self.target_projector = momentum_copy(self.projector)

    @property
    def backbone(self) -> nn.Module:
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def schedules(self) -> dict:
        return {"momentum": (self.params.momentum, self.params.momentum_end)}

    def after_step(self, sched: dict) -> None:
        """EMA of the target after the optimizer step (the update uses the new online weights)."""
        momentum_update([self.target_student, self.target_projector], [self.student, self.projector],
                        sched.get("momentum", self.params.momentum), sched.get("finite"))

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                          # N×C×S×S each
        z1 = self.projector(self.student(x1))                                # N×d
        z2 = self.projector(self.student(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_student(x1))
            t2 = self.target_projector(self.target_student(x2))
        loss = byol_regression(q1, t2) + byol_regression(q2, t1)
        return {"loss": loss, "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


register_method(
    "byol", BYOLParams,
    # 1000-epoch recipe: LARS lr 0.2·B/256, wd 1.5e-6, 10 warm-up epochs, cosine, SyncBN;
    # asymmetric views: crop 0.08-1, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2,
    # blur p 1.0 / 0.1, solarize p 0 / 0.2.
    defaults={"optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "base_batch": 256,
                        "weight_decay": 1.5e-6, "warmup_epochs": 10},
              "backbone": {"sync_bn": True},
              "views": BYOL_VIEWS},
    summary="BYOL: online predictor regresses an EMA target's projection, 2 - 2cos, symmetric",
)(BYOL)
