"""MoCo v1 / v2 (He et al. 2019; Chen et al. 2020c; methods.md §3-4, pitfalls 2-3, 23-25).

query encoder f_q (backbone + head) and a momentum key encoder f_k (a frozen copy updated
theta_k <- m·theta_k + (1-m)·theta_q INSIDE the step, BEFORE the key pass); a queue of K keys
(L2-normalized random init) gives the negatives of InfoNCE (positive first, temperature T).
After the logits are computed the keys of the whole global batch are enqueued; K must be a
multiple of the global batch (x2 with the symmetric loss).

v1 (``mocov1``): head = one Linear (fc -> 128), T 0.07. v2 (``mocov2``): head Linear-ReLU-Linear
without BN, T 0.2, cosine lr, blur in the ImageNet views (preset ``imagenet``).

BatchNorm cannot see a query and its key in the same statistics (the model would "cheat"):
the key pass runs with shuffle-BN (keys permuted across the global batch, restored after),
and BN statistics are per process, never synchronized. In one process, ``bn_splits`` groups
(default 8, as the CIFAR demo's ``--bn-splits``) stand in for the processes, in both encoders.

``symmetric`` adds the loss with the views swapped (the CIFAR demo's ``--symmetric``: the two
losses are summed and both views' keys are enqueued). The evaluation backbone is the query
encoder's; the key encoder and the head are thrown away at export.

Deviations: the queue is stored K×d (the official code: d×K); MoCo v1's grayscale-then-jitter
order is jitter-then-grayscale here (the shared view recipe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.augment.views import MOCO_V2_VIEWS
from selfsight.config import setting
from selfsight.heads import ProjectionMLP
from selfsight.losses import info_nce_queue
from selfsight.losses.common import upcast
from selfsight.methods import register_method
from selfsight.nn.distributed import gather_no_grad, world_size
from selfsight.nn.momentum import momentum_copy, momentum_update
from selfsight.nn.shuffle_bn import convert_split_bn, shuffled_forward
from selfsight.nn.undo import StepUndo


@dataclass
class MoCoParams:
    name: str = "mocov2"
    temperature: float = setting(0.2, above=0)         # v1 0.07, v2 0.2
    head: str = "mlp"                 # linear (v1: fc -> dim) | mlp (v2: Linear-ReLU-Linear, no BN)
    head_hidden_dim: int = setting(0, at_least=0)         # 0 = the backbone's width (2048 for ResNet-50), as the paper
    dim: int = setting(128, at_least=1)
    queue_size: int = setting(65536, at_least=1)          # K; a multiple of the global batch (x2 when symmetric)
    momentum: float = setting(0.999, unit=True)
    momentum_end: float = setting(-1.0, unit=True, off=-1)       # -1 = constant momentum (the paper); else cosine to this value per step
    symmetric: bool = False
    shuffle_bn: bool = True
    bn_splits: int = setting(0, at_least=0)               # BN groups per process; 0 = 8 in one process, 1 per process under DDP


class MoCo(nn.Module):
    def __init__(self, params: MoCoParams, backbone: nn.Module):
        super().__init__()
        if params.head not in ("linear", "mlp"):
            raise ValueError(f"method.head must be linear or mlp, got {params.head!r}")
        self.params = params
        splits = params.bn_splits or (8 if world_size() == 1 else 1)
        self.student = convert_split_bn(backbone, splits) if splits > 1 else backbone
        hidden = params.head_hidden_dim or backbone.embed_dim
        self.head = ProjectionMLP(backbone.embed_dim, hidden, params.dim, 1 if params.head == "linear" else 2,
                                  hidden_bn=False, last_bn="none")
        self.key_student = momentum_copy(self.student)
        self.key_head = momentum_copy(self.head)
        self.register_buffer("queue", F.normalize(torch.randn(params.queue_size, params.dim), dim=1))   # K×d
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._ptr: int | None = 0           # queue_ptr on the host, so the step reads nothing from the device
        self.undo = StepUndo()
        self.register_load_state_dict_post_hook(_forget_pointer)

    @property
    def backbone(self) -> nn.Module:
        """The network evaluation and export use: the query encoder's backbone."""
        return self.student

    def finetune_network(self) -> nn.Module:
        return self.student

    def schedules(self) -> dict:
        p = self.params
        return {"momentum": (p.momentum, p.momentum if p.momentum_end < 0 else p.momentum_end)}

    def after_step(self, sched: dict) -> None:
        self.undo.settle(sched.get("finite"))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(upcast(self.head(self.student(x))), dim=1)

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        def encode(v):
            return self.key_head(self.key_student(v))
        k = shuffled_forward(encode, x) if self.params.shuffle_bn else encode(x)
        return F.normalize(upcast(k), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Append the keys of every process (gathered, rank-ordered) at the pointer."""
        keys = gather_no_grad(keys)                                         # (W·N)×d
        n, size = keys.shape[0], self.queue.shape[0]
        if size % n:
            raise ValueError(f"method.queue_size={size} must be a multiple of the keys enqueued per step ({n}: "
                             f"the global batch{' x2 (symmetric loss)' if self.params.symmetric else ''})")
        if self._ptr is None:               # after a checkpoint was loaded: read its pointer once
            self._ptr = int(self.queue_ptr)
        ptr = self._ptr
        # non-finite keys (a step the engine skips) leave the queue as it was, decided on the device;
        # the pointer still moves on (the oldest keys stay one more round)
        old = self.queue[ptr:ptr + n]
        self.undo.keep(self.queue, slice(ptr, ptr + n))     # a skipped step puts the old keys back (after_step)
        self.queue[ptr:ptr + n] = torch.where(torch.isfinite(keys).all(), keys.to(self.queue.dtype), old)
        self._ptr = (ptr + n) % size
        self.queue_ptr.fill_(self._ptr)

    def training_step(self, batch: dict, sched: dict) -> dict:
        x1, x2 = batch["views"][:2]                                         # N×C×S×S each
        p = self.params
        momentum_update([self.key_student, self.key_head], [self.student, self.head], sched.get("momentum", p.momentum))
        q1, k2 = self._query(x1), self._key(x2)                             # N×d each
        loss = info_nce_queue(q1, k2, self.queue, p.temperature)
        keys = k2
        if p.symmetric:
            q2, k1 = self._query(x2), self._key(x1)
            loss = loss + info_nce_queue(q2, k1, self.queue, p.temperature)
            keys = torch.cat([k1, k2])
        self._enqueue(keys)                                                 # after the logits (pitfall 3)
        return {"loss": loss, "embedding": q1.detach()}

    def forward(self, batch: dict, sched: dict) -> dict:
        return self.training_step(batch, sched)


def _forget_pointer(module: "MoCo", incompatible_keys) -> None:
    module._ptr = None                      # a loaded checkpoint brings its own queue_ptr


# the official main_moco.py: SGD over model.parameters(), so weight decay on every parameter (BN, biases too)
_SGD = {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "base_batch": 256, "weight_decay": 1e-4,
        "momentum": 0.9, "warmup_epochs": 0, "decay_all": True}
# MoCo uses per-process BN with shuffle-BN, never SyncBN (methods.md §18).
def queue_fits_the_batch(cfg):
    """The queue must take whole steps of keys: a positive multiple of the keys enqueued per step."""
    m = cfg.method
    per_step = cfg.data.batch_size * (2 if m.symmetric else 1)
    if m.queue_size < 1 or m.queue_size % per_step:
        return ("method.queue_size", f"must be a positive multiple of the keys enqueued per step ({per_step}: "
                f"data.batch_size{' x2, symmetric loss' if m.symmetric else ''})", m.queue_size)
    return None


register_method(
    "mocov1", MoCoParams, check=queue_fits_the_batch,
    # v1: SGD 0.03 @ B=256, wd 1e-4, InstDisc views (crop 0.2-1, jitter 0.4 always, gray 0.2).
    # The paper's lr steps at epochs 120/160 are replaced by the engine's cosine schedule.
    defaults={"method": {"temperature": 0.07, "head": "linear"}, "optim": _SGD,
              "backbone": {"sync_bn": False},
              "views": {"crop_scale": [0.2, 1.0], "jitter": [0.4, 0.4, 0.4, 0.4], "jitter_p": 1.0}},
    summary="MoCo v1: InfoNCE against a queue of momentum-encoder keys, shuffle-BN, linear head",
)(MoCo)
register_method(
    "mocov2", MoCoParams, check=queue_fits_the_batch,
    # v2: + MLP head, T 0.2, aug+ (crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2, blur 0.5), cosine lr.
    defaults={"method": {"temperature": 0.2, "head": "mlp"}, "optim": _SGD,
              "backbone": {"sync_bn": False},
              "views": MOCO_V2_VIEWS},
    summary="MoCo v2: MoCo v1 + MLP head, temperature 0.2, blur, cosine schedule",
)(MoCo)
