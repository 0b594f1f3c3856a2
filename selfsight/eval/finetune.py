"""Fine-tuning: the whole pretrained backbone and a new linear head trained on labeled data.

ViTs follow MAE (He et al. 2022, §A.3, Table 9) and BEiT (Bao et al. 2022, Appendix, Table 14): AdamW
(betas 0.9/0.999, weight decay 0.05, none on biases, norms and tokens) with **layer-wise learning-rate
decay** (Clark et al. 2020; ``beit/optim_factory.py``): with L blocks,

    lr_i = lr · decay^(L + 1 − i),   i = 0 for patch_embed / cls_token / pos_embed,
                                     i = b + 1 for block b, i = L + 1 for the final norm and the head

(BEiT's shared ``rel_pos_bias`` is L + 1, as ``get_num_layer_for_vit``), stochastic depth rising
linearly to ``drop_path`` over the blocks, the head initialised with std 2e-5 (MAE
``main_finetune.py``). ResNets: momentum SGD (0.9) without layer decay, base lr 0.1 and weight decay 1e-4 (the
supervised ResNet recipe of Goyal et al. 2017), BatchNorm in train mode. Both: label-smoothed
cross-entropy (Szegedy et al. 2016; torch's ``label_smoothing``), the features standardised by a
BatchNorm without affine parameters before the new head (``head_norm``; a deviation from the
papers' bare head, measured in docs/usage.md), linear warm-up then cosine per step
(``schedules.cosine``), learning rate ``lr · B / 256`` (MAE's ``blr``), random resized crop +
horizontal flip only (the library's ``BatchedViews`` for in-memory sets, torchvision v2 in workers for
folders; MixUp, CutMix and RandAugment of MAE are left out). Evaluation uses the resize and
normalisation of ``features.extract``; top-1/top-5 on the test split.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from selfsight.augment import ViewRecipe
from selfsight.backbones.features import backbone_features
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import OptimConfig
from selfsight.data import ArrayDataset, num_classes_of
from selfsight.data.loader import ViewLoader
from selfsight.data.subset import draw
from selfsight.engine.optim import build_optimizer, param_groups, skips_weight_decay, vit_layer_id
from selfsight.eval.features import extract
from selfsight.eval.labels import labeled_pair
from selfsight.eval.linear import accuracy
from selfsight.methods import hooks_of
from selfsight.nn.images import to_channels
from selfsight.nn.precision import autocast, grad_scaler, pick_precision
from selfsight.runs import load_run
from selfsight.schedules import cosine, scaled_lr

# defaults per backbone kind: (optimizer, base lr at batch 256, weight decay, drop path)
VIT_DEFAULTS = ("adamw", 5e-4, 0.05, 0.1)        # MAE ViT-B fine-tuning (blr 5e-4, wd 0.05, drop path 0.1)
CONVNET_DEFAULTS = ("sgd", 0.1, 1e-4, 0.0)       # supervised ResNet recipe (Goyal et al. 2017: 0.1·B/256, wd 1e-4)


class Classifier(nn.Module):
    """backbone -> features (``cls`` | ``mean`` | ``cls+mean``, as ``features.backbone_features``)
    [-> BatchNorm without affine, ``head_norm="bn"``] -> linear head: images B×C×S×S -> logits B×K.

    ``head_norm="bn"`` (``finetune``'s default) standardises each feature over the batch before the
    head (the BatchNorm MAE puts before its linear-probe head; its fine-tuning normalises pooled
    features too, with ``fc_norm``): the head sees the same scale whatever the method left in the
    features. Without it Barlow Twins' ResNet features throw the head off in the first SGD steps
    (first-epoch loss 160, top-1 0.497; with it 1.42 and 0.806); docs/usage.md has the table."""

    def __init__(self, backbone: nn.Module, num_classes: int, features: str = "cls", in_chans: int = 3,
                 size: int = 32, head_norm: str = "none"):
        super().__init__()
        self.backbone = backbone            # a backbone, or nn.Sequential(backbone, *layers) (finetune_network)
        self.features = backbone_features(backbone, features) if not isinstance(backbone, nn.Sequential) \
            else _network_output(backbone, features)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():                  # the feature width (D, 2·D for cls+mean, N·D for DINO's lastN)
            probe = torch.zeros(2, in_chans, size, size, device=next(backbone.parameters()).device)
            dim = self.features(probe).shape[1]
        backbone.train(was_training)
        if head_norm not in ("none", "bn"):
            raise ValueError(f"head_norm must be none or bn, got {head_norm!r}")
        self.head_norm = nn.BatchNorm1d(dim, affine=False) if head_norm == "bn" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)                  # MAE main_finetune.py
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.features(x)))


def layer_decay_groups(model: nn.Module, depth: int, decay: float, weight_decay: float) -> list[dict]:
    """Parameter groups keyed by (layer id, decayed or not), each with ``lr_scale`` = decay^(depth + 1 − id)
    and its own weight decay (0 for biases, norms and tokens: ``optim.skips_weight_decay``)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, skip = vit_layer_id(name, depth), skips_weight_decay(name, p)
        g = groups.setdefault((layer, skip), {
            "params": [], "layer_id": layer, "lr_scale": decay ** (depth + 1 - layer),
            "weight_decay": 0.0 if skip else weight_decay, "apply_wd": not skip})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def finetune_optimizer(clf: Classifier, name: str, layer_decay: float, weight_decay: float,
                       device_type: str = "cpu") -> torch.optim.Optimizer:
    """``engine.optim.build_optimizer`` (fused AdamW, or momentum-0.9 SGD) over layer-wise groups when
    ``layer_decay`` < 1 (ViTs only), else over the two usual groups; every group carries ``lr_scale``."""
    if layer_decay < 1.0:
        if not isinstance(clf.backbone, ViTBackbone):
            raise ValueError("layer-wise learning-rate decay needs a ViT backbone")
        groups = layer_decay_groups(clf, len(clf.backbone.net.blocks), layer_decay, weight_decay)
    else:
        groups = [{**g, "lr_scale": 1.0} for g in param_groups(clf)]
    return build_optimizer(clf, OptimConfig(name=name, weight_decay=weight_decay, momentum=0.9), device_type, groups)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr times each group's layer-wise scale."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]


def set_drop_path(vit: ViTBackbone, rate: float) -> None:
    """Stochastic depth (Huang et al. 2016) rising linearly from 0 to ``rate`` over the blocks (timm's rule)."""
    blocks = vit.net.blocks
    for i, blk in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(blk, attr):
                setattr(blk, attr, DropPath(r) if r > 0 else nn.Identity())


def _network_output(network: nn.Sequential, features: str):
    """A ``finetune_network()`` that continues the backbone (SimCLR v2's projector layers): its
    output is the feature, so only ``cls`` applies."""
    if features != "cls":
        raise ValueError(f"--features {features}: this run fine-tunes the backbone with projector layers "
                         "(method.finetune_head_layers), whose output is the feature: use --features cls")
    return network


@dataclass
class FinetuneSettings:
    """Every option of ``finetune``; ``None`` picks the backbone's default (module docstring)."""
    epochs: int = 10
    lr: float | None = None                 # base lr at batch 256 (ViTs 5e-4, ResNets 0.1); used: lr·B/256
    batch_size: int = 256
    layer_decay: float = 0.75               # ViTs with AdamW; 1 = off
    label_smoothing: float = 0.1
    weight_decay: float | None = None       # ViTs 0.05, ResNets 1e-4
    warmup_epochs: float | None = None      # a tenth of the epochs, at most 5
    drop_path: float | None = None          # ViTs 0.1, ResNets none
    features: str = "cls"
    optimizer: str = "auto"                 # auto: AdamW for ViTs, SGD for ResNets
    crop_scale: tuple | None = None         # (0.08, 1) above 64 px, (0.75, 1) at 64 px and below
    device: str | None = None
    baseline: str | None = None             # random: the same network from random initialisation
    max_train_images: int | None = None
    data_root: str = ""
    precision: str | None = None            # default: the run's train.precision
    seed: int = 0
    workers: int = 2
    eval_batch_size: int = 512
    head_norm: str = "bn"
    unknown_classes: str = "error"


@dataclass
class _Job:
    """What ``prepare`` makes and ``fit`` and ``evaluate`` use."""
    settings: FinetuneSettings
    clf: "Classifier"
    loader: ViewLoader
    opt: torch.optim.Optimizer
    amp: torch.dtype | None
    device: torch.device
    cfg: object
    pre: dict
    train_set: object
    test_set: object
    matched: dict
    vit: bool
    decay: float
    peak: float
    channels_last: bool


def _resolved(s: FinetuneSettings, vit: bool, size: int) -> FinetuneSettings:
    """``s`` with every ``None`` replaced by the backbone's default."""
    d_opt, d_lr, d_wd, d_dp = VIT_DEFAULTS if vit else CONVNET_DEFAULTS
    optimizer = d_opt if s.optimizer == "auto" else s.optimizer
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be auto, adamw or sgd, got {optimizer!r}")
    return replace(s, optimizer=optimizer, lr=d_lr if s.lr is None else s.lr,
                   weight_decay=d_wd if s.weight_decay is None else s.weight_decay,
                   drop_path=d_dp if s.drop_path is None else s.drop_path,
                   warmup_epochs=min(5.0, s.epochs / 10) if s.warmup_epochs is None else s.warmup_epochs,
                   crop_scale=tuple(s.crop_scale or ((0.08, 1.0) if size > 64 else (0.75, 1.0))))


def _check(s: FinetuneSettings) -> None:
    if s.baseline not in (None, "random"):
        raise ValueError(f"fine-tuning trains a backbone: --baseline must be random, got {s.baseline!r}")
    if s.epochs < 1 or s.batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be positive, got {s.epochs} and {s.batch_size}")
    if not 0 < s.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {s.layer_decay}")
    if s.max_train_images is not None and s.max_train_images < 1:
        raise ValueError(f"--images must be positive, got {s.max_train_images}")


def _trainable(network: nn.Module, core: nn.Module, cfg, s: FinetuneSettings, vit: bool) -> None:
    """Everything trains (a momentum teacher arrives frozen), except a ViT's fixed sin-cos (MAE) or
    absent (BEiT) position table and its unused mask token; a ViT gets its stochastic depth."""
    for p in network.parameters():
        p.requires_grad_(True)
    if vit:
        if cfg.backbone.pos_embed != "learned":
            core.net.pos_embed.requires_grad_(False)
        if core.mask_token is not None:
            core.mask_token.requires_grad_(False)
        set_drop_path(core, s.drop_path)
    elif s.drop_path > 0:
        raise ValueError("--drop-path works for ViT backbones only")


def prepare(run, train, test, s: FinetuneSettings) -> _Job:
    """The classifier (a copy of the run's fine-tuning network and a new head), the training
    loader, the optimizer and the precision."""
    _check(s)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, pre = load_run(run, device, random_init=s.baseline == "random")
    network = copy.deepcopy(hooks_of(model).network_to_finetune())
    core = network[0] if isinstance(network, nn.Sequential) else network          # the backbone itself
    del model
    train_set, test_set, matched = labeled_pair(train, test, s.data_root, "fine-tuning", s.unknown_classes)
    train_set = _match_channels(draw(train_set, s.max_train_images, s.seed), pre["channels"])
    if len(train_set) < s.batch_size:
        raise ValueError(f"--batch-size {s.batch_size} is more than the {len(train_set)} training images: pass "
                         f"--batch-size {max(1, 2 ** (len(train_set).bit_length() - 1))} or less")
    vit = isinstance(core, ViTBackbone)
    s = _resolved(s, vit, pre["size"])
    _trainable(network, core, cfg, s, vit)
    clf = Classifier(network, _num_classes(train_set, test_set), s.features, pre["channels"], pre["size"],
                     s.head_norm).to(device)
    channels_last = cfg.backbone.name.startswith("resnet") and cfg.backbone.channels_last
    if channels_last:
        clf = clf.to(memory_format=torch.channels_last)
    # layer-wise decay follows a ViT's blocks: not when projector layers are kept on top (SimCLR v2)
    decay = s.layer_decay if (vit and s.optimizer == "adamw" and network is core) else 1.0
    opt = finetune_optimizer(clf, s.optimizer, decay, s.weight_decay, device.type)
    amp = pick_precision(s.precision or cfg.train.precision, device)
    recipe = ViewRecipe(size=pre["size"], n_views=1, crop_scale=s.crop_scale, flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                        blur_p=0.0, solarize_p=0.0, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    if not isinstance(train_set, ArrayDataset) and pre["channels"] == 1:
        train_set = train_set.prepared(channels=1)              # a folder decodes luma for a gray run
    loader = ViewLoader(train_set, recipe, s.batch_size, device, seed=s.seed,
                        workers=s.workers if not isinstance(train_set, ArrayDataset) else -1)
    peak = scaled_lr(s.lr, s.batch_size, 256, "linear")
    return _Job(s, clf, loader, opt, amp, device, cfg, pre, train_set, test_set, matched, vit, decay, peak,
                channels_last)


def fit(job: _Job) -> tuple[list[float], int]:
    """Fine-tune: label-smoothed cross-entropy, warm-up then cosine per step; returns the mean loss
    of each epoch and the steps taken."""
    s, clf, opt, dev = job.settings, job.clf, job.opt, job.device
    spe = job.loader.steps_per_epoch
    total, warmup = s.epochs * spe, round(s.warmup_epochs * spe)
    torch.manual_seed(s.seed)                 # drop path
    clf.train()                               # BatchNorm in train mode (ResNets), drop path on (ViTs)
    step, history = 0, []
    scaler = grad_scaler(job.amp, dev)
    for epoch in range(s.epochs):
        total_loss, n = torch.zeros((), device=dev), 0
        for batch in job.loader.epoch(epoch):
            x, y = batch["views"][0], batch["label"]
            if job.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            set_lr(opt, cosine(step, total, job.peak, 0.0, warmup))
            with autocast(dev, job.amp):
                logits = clf(x)                                                  # B×K
            loss = F.cross_entropy(logits.float(), y, label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:               # fp16 (auto on a pre-Ampere GPU): scaled, an overflow step skipped
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            total_loss += loss.detach()
            n += 1
            step += 1
        mean_loss = float(total_loss) / max(1, n)
        if not math.isfinite(mean_loss):
            raise ValueError(f"fine-tuning diverged (loss {mean_loss}) in epoch {epoch + 1}: lower --lr")
        history.append(round(mean_loss, 4))
    return history, step


def evaluate(job: _Job, train, test, history: list[float], steps: int, seconds: float) -> dict:
    """Classify the test split once (the resizing and normalisation of ``features.extract``)."""
    s = job.settings
    job.clf.eval()
    logits, y = extract(job.clf, job.test_set, job.pre, job.device, s.eval_batch_size, s.workers, job.amp,
                        desc="classifying the test data")
    cfg = job.cfg
    return {"model": s.baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "train": train if isinstance(train, str) else getattr(train, "name", "dataset"),
            "test": test if isinstance(test, str) else getattr(test, "name", "dataset"),
            "features": s.features, "head_norm": s.head_norm, **job.matched, **accuracy(logits, y),
            "epochs": s.epochs, "steps": steps, "train_images": len(job.train_set), "batch_size": s.batch_size,
            "optimizer": s.optimizer, "base_lr": s.lr, "lr": job.peak, "layer_decay": job.decay if job.vit else None,
            "weight_decay": s.weight_decay, "label_smoothing": s.label_smoothing, "warmup_epochs": s.warmup_epochs,
            "drop_path": s.drop_path, "crop_scale": list(s.crop_scale),
            "precision": str(job.amp).removeprefix("torch.") if job.amp else "fp32", "train_loss": history,
            "seconds": round(seconds, 1)}


def finetune(run, train, test, settings: FinetuneSettings | None = None, **options) -> dict:
    """Fine-tune a copy of the run's fine-tuning network (``finetune_network`` hook; the evaluation
    backbone for most methods) with a new linear head on ``train``; top-1/top-5 on ``test``.
    ``train``/``test``: data specs (``build_dataset``) or data sets. ``settings``
    (``FinetuneSettings``) or its fields as keywords: ``None`` values depend on the backbone
    (module docstring); ``lr`` is the base lr at batch 256 (the effective lr is lr · batch_size /
    256). ``baseline="random"``: the same network from random initialisation (supervised training
    from scratch). The test labels are matched to the training classes by name
    (``labels.match_classes``; ``unknown_classes``: error | wrong)."""
    t0 = time.perf_counter()
    known = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune() got unknown options {unknown}")
    job = prepare(run, train, test, replace(settings or FinetuneSettings(), **options))
    history, steps = fit(job)
    return evaluate(job, train, test, history, steps, time.perf_counter() - t0)


def _match_channels(ds, channels: int):
    """An in-memory set with the run's channel count (RGB -> luma, gray -> repeated; ``nn.images``)."""
    if not isinstance(ds, ArrayDataset) or ds.channels == channels:
        return ds
    return ArrayDataset(to_channels(ds.images, channels).contiguous(), ds.labels, ds.name, ds.classes)


def _num_classes(train, test) -> int:
    """Outputs of the new head: the classes of either set (``num_classes_of``, as the online probe
    counts them) or the named training classes, whichever is more (the test labels are already in
    the training classes' indices, ``labels.match_classes``)."""
    return max(len(train.classes), num_classes_of(train), num_classes_of(test))
