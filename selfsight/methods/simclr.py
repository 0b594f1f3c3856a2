"""SimCLR v1 / v2 (Chen et al. 2020a, 2020b; methods.md §1-2).

backbone f -> projector g -> NT-Xent over the two views, negatives from the global batch
(gathered with gradient). Both views go through the encoder as one batch, as in the TF
code, so BatchNorm statistics cover both; under DDP use SyncBN (``backbone.sync_bn``).
v1: 2-layer projector; v2: 3-layer projector, and ``finetune_head_layers=1`` keeps the first
projector layer (Linear+BN+ReLU) in the network handed to fine-tuning (``ft_proj_selector``).
Evaluation/export use the encoder alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import nt_xent
from selfsight.methods import register_method


@dataclass
class SimCLRParams:
    name: str = "simclr"
    version: int = setting(1, choices=(1, 2))                 # 1: 2-layer projector (v1); 2: 3-layer projector (v2)
    temperature: float = setting(0.1, above=0)         # ImageNet 0.1; the CIFAR README command uses 0.5
    proj_hidden_dim: int = setting(0, at_least=0)         # 0 = the backbone's width (2048 for ResNet-50), as the paper
    proj_out_dim: int = setting(128, at_least=1)
    proj_layers: int = setting(0, at_least=0)             # 0 = 2 for v1, 3 for v2
    finetune_head_layers: int = setting(0, at_least=0)    # v2: projector layers kept for fine-tuning (paper: 1)


class SimCLR(nn.Module):
    def __init__(self, params: SimCLRParams, backbone: nn.Module):
        super().__init__()
        if params.version not in (1, 2):
            raise ValueError(f"SimCLR version must be 1 or 2, got {params.version}")
        layers = params.proj_layers or (2 if params.version == 1 else 3)
        if params.finetune_head_layers >= layers:
            raise ValueError(f"finetune_head_layers={params.finetune_head_layers} must be below the projector's {layers} layers")
        self.params = params
        self.student = backbone
        self.projector = ProjectionMLP(backbone.embed_dim, params.proj_hidden_dim or backbone.embed_dim,
                                       params.proj_out_dim, layers)

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the encoder f (projector thrown away)."""
        return self.student

    def finetune_network(self) -> nn.Module:
        """SimCLR v2: the encoder followed by the first ``finetune_head_layers`` projector layers."""
        keep = self.projector.leading_layers(self.params.finetune_head_layers)          # Linear, BN, ReLU per layer
        return nn.Sequential(self.student, *keep) if keep else self.student

    def training_step(self, batch: dict, sched: dict) -> dict:
        v1, v2 = batch["views"][:2]                                  # B×C×S×S each
        h = self.student(torch.cat([v1, v2], 0))                     # 2B×D
        z1, z2 = self.projector(h).chunk(2)                          # B×d each
        loss = nt_xent(z1, z2, self.params.temperature)
        return {"loss": loss, "embedding": z1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:            # so DDP can wrap the method
        return self.training_step(batch, sched)


register_method(
    "simclr", SimCLRParams,
    # SimCLR: LARS, lr 0.3*B/256, wd 1e-6 (v1), 10 warm-up epochs, cosine (methods.md §1).
    defaults={"optim": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6,
                        "warmup_epochs": 10, "base_batch": 256}},
    summary="SimCLR v1/v2: NT-Xent over two views, negatives from the (global) batch",
)(SimCLR)
