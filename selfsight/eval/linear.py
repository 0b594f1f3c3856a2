"""Linear probe on frozen features (the fast path: features extracted once, methods.md §0
evaluation protocols).

A linear classifier on pre-extracted features, optionally behind MAE's BatchNorm without affine
parameters (He et al. 2022, §A.2: "an extra BatchNorm layer without affine transformation"; on
fixed features it standardises each dimension, here with the training-set statistics, i.e.
BatchNorm's running statistics). Trained with SGD (momentum 0.9, no weight decay on the bias)
and a cosine learning rate over ``epochs``, cross-entropy. The learning rate and weight decay are
chosen by a small sweep on a held-out share of the training split (``val_fraction``, drawn with
the seed; the sweep's classifiers train together as one stacked layer on the same mini-batches),
then the classifier is refitted on the whole training split with the chosen pair and evaluated
once on the test split.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.eval.features import labeled_features

LRS = (0.001, 0.01, 0.1)
WEIGHT_DECAYS = (0.0, 1e-4)


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


class StackedLinear(nn.Module):
    """S independent linear classifiers D -> C evaluated together: x (N×D) -> logits S×N×C."""

    def __init__(self, n: int, dim: int, num_classes: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dim, num_classes, device=device))   # convex: a fixed start
        self.bias = nn.Parameter(torch.zeros(n, 1, num_classes, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias                              # S×N×C


def mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over S classifiers of each one's mean cross-entropy: logits S×b×C, labels b. Each
    classifier gets exactly its own gradient."""
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="sum") / len(y)


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, lrs, weight_decays,
                 epochs: int = 30, batch_size: int = 256, seed: int = 0, loss_fn=mean_cross_entropy) -> StackedLinear:
    """One linear classifier per (lr, weight decay) pair, trained together on features x (N×D, or
    N×…×D: every position classified, as the dense probe's tokens N×h×w×D) and labels y (N×…):
    the same mini-batches, each with its own SGD (momentum 0.9, weight decay on the weights only,
    as ``torch.optim.SGD``) and cosine learning rate. ``loss_fn(logits S×(b·…)×C, y[batch])`` is
    the sum of the S classifiers' losses. Returns the S classifiers."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    heads = StackedLinear(len(pairs), x.shape[-1], num_classes, x.device)
    lr0 = torch.tensor([p[0] for p in pairs], device=x.device)
    wd = torch.tensor([p[1] for p in pairs], device=x.device).view(-1, 1, 1)
    buf_w, buf_b = torch.zeros_like(heads.weight), torch.zeros_like(heads.bias)
    n = x.shape[0]
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(x.device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            logits = heads(xb.reshape(-1, xb.shape[-1]).float())                     # S×(b·…)×C
            loss = loss_fn(logits, y[idx])
            gw, gb = torch.autograd.grad(loss, [heads.weight, heads.bias])
            lr = (lr0 * 0.5 * (1 + math.cos(math.pi * step / total))).view(-1, 1, 1)
            with torch.no_grad():
                buf_w.mul_(0.9).add_(gw + wd * heads.weight)
                buf_b.mul_(0.9).add_(gb)
                heads.weight.sub_(lr * buf_w)
                heads.bias.sub_(lr * buf_b)
            step += 1
    return heads


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """top-1/top-5 of logits N×C against labels N."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"top1": (top[:, 0] == y).float().mean().item(), "top5": (top == y[:, None]).any(1).float().mean().item()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 lrs=LRS, weight_decays=WEIGHT_DECAYS, epochs: int = 30, batch_size: int = 256,
                 batchnorm: bool = True, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Sweep (lr, weight decay) on a held-out share of the training split, refit on all of it,
    report top-1/top-5 on the test split plus the chosen pair and its held-out accuracy."""
    train_x, test_x = train_x.float(), test_x.float()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_x.shape[0], generator=g)
    n_val = max(1, int(round(val_fraction * train_x.shape[0])))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_x, val_x = train_x[fit_idx], train_x[val_idx]
    if batchnorm:
        fit_x, val_x = _standardize(fit_x, val_x)
    heads = train_linear(fit_x, train_y[fit_idx], num_classes, lrs, weight_decays, epochs, batch_size, seed)
    with torch.no_grad():
        val_logits = heads(val_x)                                                    # S×n_val×C
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    sweep = [{"lr": lr, "weight_decay": wd, "val_top1": accuracy(val_logits[i], train_y[val_idx])["top1"]}
             for i, (lr, wd) in enumerate(pairs)]
    best = max(sweep, key=lambda r: r["val_top1"])
    full_x, test_x = _standardize(train_x, test_x) if batchnorm else (train_x, test_x)
    head = train_linear(full_x, train_y, num_classes, [best["lr"]], [best["weight_decay"]], epochs, batch_size, seed)
    with torch.no_grad():
        test_logits = head(test_x)[0]
    return {**accuracy(test_logits, test_y), "lr": best["lr"], "weight_decay": best["weight_decay"],
            "val_top1": best["val_top1"], "epochs": epochs, "batchnorm": batchnorm, "sweep": sweep}


def evaluate_linear(run: str, train: str, test: str, baseline: str | None = None, device: str | None = None,
                    data_root: str = "", batch_size: int = 512, features: str = "cls", epochs: int = 30,
                    batchnorm: bool = True, unknown_classes: str = "error") -> dict:
    """Linear-probe top-1/top-5 (``eval.linear.linear_probe``: features extracted once, lr and
    weight decay chosen on a held-out tenth of the training split) of a run or a baseline."""
    t0 = time.perf_counter()
    train_f, train_y, test_f, test_y, info = labeled_features(run, train, test, baseline, device, data_root,
                                                              batch_size, features, protocol="the linear probe",
                                                              unknown_classes=unknown_classes)
    res = linear_probe(train_f, train_y, test_f, test_y, epochs=epochs, batchnorm=batchnorm)
    return {**info, **res, "feature_dim": int(train_f.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}
