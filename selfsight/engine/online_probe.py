"""Online linear probe: a linear classifier trained beside pretraining on detached features.

Each step (``eval.online_probe=true``) the probe takes the first view of the batch, runs the
method's evaluation backbone on it once more in evaluation mode and without gradients (an
extra forward of one view per step: about a sixth of the step's compute for a two-view
method; evaluation mode so that the backbone's BatchNorm statistics, dropout and drop-path
are not touched), and trains ``BatchNorm1d(affine=False) -> Linear`` on those features with
its own Adam optimizer and cross-entropy on the batch labels (samples labeled -1, i.e.
unlabeled, weigh 0); its step reads nothing back from the device. Nothing flows back into the
backbone: the features are computed under ``torch.no_grad``, the probe's parameters are in no
optimizer of the run, and building the probe draws no random numbers (zero-initialised
weights), so the backbone's gradients and the run's random streams are the same with and
without it (tested).

Under DDP every process trains its probe on its own share of the batch and the probe's
gradients are averaged over the processes (all-reduce), so the probes stay identical (the
BatchNorm running statistics are each process's own, as for the backbone's).

The probe's running train top-1 and loss (over the current epoch's labeled samples, summed
over processes) are logged per epoch; its parameters, optimizer and running sums are saved
in the checkpoint (``online_probe``) and resumed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from selfsight.backbones.features import backbone_features
from selfsight.config import parse_features
from selfsight.data import num_classes_of
from selfsight.engine.optim import step_unless_nonfinite
from selfsight.nn.distributed import all_ranks, world_size
from selfsight.nn.precision import autocast


class OnlineProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, lr: float = 1e-3, features: str = "cls", device=None):
        super().__init__()
        self.features = features
        self.norm = nn.BatchNorm1d(dim, affine=False, device=device)
        # zeros (a convex problem: any start will do) instead of nn.Linear's random init, so
        # that turning the probe on leaves the run's random number stream as it was
        self.weight = nn.Parameter(torch.zeros(num_classes, dim, device=device))
        self.bias = nn.Parameter(torch.zeros(num_classes, device=device))
        # fused (CPU and CUDA): a skipped step is skipped on the device (found_inf), no host read
        fused = torch.device(device).type in ("cpu", "cuda") if device is not None else True
        self.optimizer = torch.optim.Adam([self.weight, self.bias], lr=lr, fused=fused or None)
        self.register_buffer("sums", torch.zeros(3, device=device, dtype=torch.float64))   # loss·n, correct, n
        self._fn = None

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(f), self.weight, self.bias)

    @torch.no_grad()
    def _backbone_features(self, backbone: nn.Module, x: torch.Tensor, amp_dtype=None) -> torch.Tensor:
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()
        try:
            with autocast(x.device, amp_dtype):
                return backbone_features(backbone, self.features)(x).to(self.weight.dtype)
        finally:
            for m, mode in modes:
                m.training = mode

    def step(self, backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp_dtype=None) -> None:
        """One optimizer step of the probe on ``backbone``'s detached features of ``images``
        (computed under autocast to ``amp_dtype`` when given, as the training step).

        Nothing is read back to the host: unlabeled samples (-1) get weight 0 in the normalisation
        statistics and the loss, instead of being selected out by a boolean mask, and a batch with
        fewer than two labeled samples or non-finite features leaves the probe as it was (its
        parameters, Adam state, running statistics and sums), decided on the device, every process
        agreeing by an all-reduce."""
        f = self._backbone_features(backbone, images, amp_dtype)                 # B×D
        w = (labels >= 0).to(f.dtype)                                             # B, 1 = labeled
        n = w.sum()
        ok = all_ranks((n > 1) & torch.isfinite(f).all())
        f = torch.where(ok, f, 0.0)
        y = labels.clamp(min=0)
        with torch.autocast(f.device.type, enabled=False):
            self.train()
            with torch.no_grad():                   # BatchNorm1d(affine=False) over the labeled rows
                count = n.clamp(min=1)
                mean = (f * w[:, None]).sum(0) / count                            # D
                var = ((f - mean).square() * w[:, None]).sum(0) / count           # biased, as BN normalises
                x = (f - mean) * torch.rsqrt(var + self.norm.eps)
                m, rm, rv = self.norm.momentum, self.norm.running_mean, self.norm.running_var
                rm.copy_(torch.where(ok, (1 - m) * rm + m * mean, rm))
                rv.copy_(torch.where(ok, (1 - m) * rv + m * var * n / (n - 1).clamp(min=1), rv))   # unbiased
                self.norm.num_batches_tracked.add_(ok.long())
            logits = F.linear(x, self.weight, self.bias)                          # B×K
            loss = (F.cross_entropy(logits, y, reduction="none") * w).sum() / count
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if world_size() > 1:
            for p in (self.weight, self.bias):
                dist.all_reduce(p.grad)
                p.grad /= world_size()
        step_unless_nonfinite(self.optimizer, ok)
        with torch.no_grad():
            correct = ((logits.argmax(1) == y).to(w.dtype) * w).sum()
            self.sums += torch.where(ok, torch.stack([loss.detach() * n, correct, n]).double(), 0.0)

    def epoch_stats(self, reset: bool = True) -> dict:
        """Running train top-1 and loss since the last reset, over every process (a collective
        under DDP: call it on all processes at the same step)."""
        s = self.sums.clone()
        if world_size() > 1:
            dist.all_reduce(s)
        if reset:
            self.sums.zero_()
        n = float(s[2])
        if n == 0:
            return {}
        return {"online_probe_top1": float(s[1]) / n, "online_probe_loss": float(s[0]) / n,
                "online_probe_samples": int(n)}

    def state_dict_full(self) -> dict:
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict_full(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_online_probe(eval_cfg, model: nn.Module, dataset, device, log=None) -> OnlineProbe | None:
    """The probe that ``eval.online_probe`` asks for, or None (off, no labels, or no backbone)."""
    if not eval_cfg.online_probe:
        return None
    parse_features(eval_cfg.online_probe_features)
    classes = num_classes_of(dataset)
    try:
        backbone = model.backbone
    except (AttributeError, ValueError):                 # e.g. a tokenizer: no backbone to probe
        backbone = None
    if classes < 2 or backbone is None:
        if log is not None:
            why = "the training data have no labels" if classes < 2 else "this method has no backbone"
            log.warning("eval.online_probe is on but %s: no online probe", why)
        return None
    backbone_features(backbone, eval_cfg.online_probe_features)        # a clear error for lastN on a ConvNet
    dim = _feature_dim(backbone, eval_cfg.online_probe_features)
    return OnlineProbe(dim, classes, eval_cfg.online_probe_lr, eval_cfg.online_probe_features, device)


def _feature_dim(backbone: nn.Module, features: str) -> int:
    kind, n, with_mean = parse_features(features)
    d = backbone.embed_dim
    return {"cls": d, "mean": d, "cls+mean": 2 * d}.get(kind, n * d + (d if with_mean else 0))
