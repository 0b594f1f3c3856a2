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

import torch
import torch.nn as nn
import torch.nn.functional as F

from selfsight.augment import ViewRecipe
from selfsight.backbones.vit import ViTBackbone
from selfsight.config import OptimConfig
from selfsight.data import ArrayDataset
from selfsight.data.loader import ViewLoader
from selfsight.engine.optim import build_optimizer, param_groups, skips_weight_decay
from selfsight.schedules import cosine, scaled_lr
from selfsight.eval.features import backbone_features, extract
from selfsight.runs import load_run
from selfsight.eval.labels import labeled_pair
from selfsight.eval.linear import accuracy
from selfsight.eval.online_probe import num_classes_of

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
        self.backbone = backbone
        self.features = backbone_features(backbone, features)
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


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT's ``get_num_layer_for_vit`` on the parameter names of a ``Classifier`` around a ``ViTBackbone``:
    0 for the embeddings and tokens, b + 1 for block b, depth + 1 for everything above (norm, head)."""
    name = name.removeprefix("backbone.").removeprefix("net.")
    if name in ("cls_token", "pos_embed", "mask_token", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


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
    from timm.layers import DropPath
    blocks = vit.net.blocks
    for i, blk in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(blk, attr):
                setattr(blk, attr, DropPath(r) if r > 0 else nn.Identity())


class _Subset(torch.utils.data.Dataset):
    """Some images of a folder; ``transform`` (set by the loaders) reaches the folder itself."""

    def __init__(self, base, index: torch.Tensor):
        self.base, self.index = base, index.tolist()
        self.labeled, self.classes = getattr(base, "labeled", True), getattr(base, "classes", [])

    @property
    def transform(self):
        return self.base.transform

    @transform.setter
    def transform(self, t):
        self.base.transform = t

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.index[i]]


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise ValueError(f"--images must be positive, got {n}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(ds, ArrayDataset):
        return ArrayDataset(ds.images[idx].clone(), ds.labels[idx].clone(), ds.name, ds.classes)
    return _Subset(ds, idx)


class _Gray:
    """Folder images (decoded as RGB) to luma before the view transform, for runs trained on gray images."""

    def __init__(self, views):
        self.views = views

    def __call__(self, image):
        return self.views(image.convert("L") if hasattr(image, "convert") else image)


def _match_channels(ds, channels: int):
    """An in-memory set with the run's channel count (RGB -> ITU-R 601-2 luma, gray -> repeated)."""
    if not isinstance(ds, ArrayDataset) or ds.channels == channels:
        return ds
    if ds.channels == 1:
        images = ds.images.expand(-1, channels, -1, -1)
    elif ds.channels == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (ds.images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    else:
        raise ValueError(f"the images have {ds.channels} channels, the run was trained on {channels}")
    return ArrayDataset(images.contiguous(), ds.labels, ds.name, ds.classes)


def _num_classes(train, test) -> int:
    """Outputs of the new head: the classes of either set (``num_classes_of``, as the online probe
    counts them) or the named training classes, whichever is more (the test labels are already in
    the training classes' indices, ``labels.match_classes``)."""
    return max(len(train.classes), num_classes_of(train), num_classes_of(test))


def finetune(run, train, test, epochs: int = 10, lr: float | None = None, batch_size: int = 256,
             layer_decay: float = 0.75, label_smoothing: float = 0.1, weight_decay: float | None = None,
             warmup_epochs: float | None = None, drop_path: float | None = None, features: str = "cls",
             optimizer: str = "auto", crop_scale: tuple | None = None, device: str | None = None,
             baseline: str | None = None, max_train_images: int | None = None, data_root: str = "",
             precision: str | None = None, seed: int = 0, workers: int = 2, eval_batch_size: int = 512,
             head_norm: str = "bn", unknown_classes: str = "error") -> dict:
    """Fine-tune a copy of the run's evaluation backbone with a new linear head on ``train``; top-1/top-5
    on ``test``. ``train``/``test``: data specs (``build_dataset``) or data sets. ``None`` defaults depend
    on the backbone (module docstring): ViTs AdamW, base lr 5e-4, weight decay 0.05, drop path 0.1;
    others SGD, base lr 0.1, weight decay 1e-4, no drop path. ``lr`` is the base lr at batch 256 (the
    effective lr is lr · batch_size / 256). ``warmup_epochs``: a tenth of the epochs, at most 5 (MAE: 5 of
    100). ``crop_scale``: (0.08, 1) above 64 px (Inception crops); (0.75, 1) at 64 px and below (about
    CIFAR's pad-4 random crop, which keeps >= (28/32)² of the image; 8 % of a 28 px image is 8×8 px).
    ``baseline="random"``: the same network from random initialisation (supervised training from scratch).
    ``precision``: auto | bf16 | fp32 (default: the run's ``train.precision``). ``head_norm``: bn
    (default: the features standardised before the new head, ``Classifier``) or none (the bare head).
    The test labels are matched to the training classes by name (``labels.match_classes``;
    ``unknown_classes``: error | wrong)."""
    from selfsight.engine.trainer import pick_precision
    t0 = time.perf_counter()
    if baseline not in (None, "random"):
        raise ValueError(f"fine-tuning trains a backbone: --baseline must be random, got {baseline!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be positive, got {epochs} and {batch_size}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {layer_decay}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    backbone = copy.deepcopy(model.backbone)
    del model
    train_set, test_set, matched = labeled_pair(train, test, data_root, "fine-tuning", unknown_classes)
    train_set = _match_channels(_subset(train_set, max_train_images, seed), pre["channels"])
    if len(train_set) < batch_size:
        raise ValueError(f"--batch-size {batch_size} is more than the {len(train_set)} training images: pass "
                         f"--batch-size {max(1, 2 ** (len(train_set).bit_length() - 1))} or less")
    num_classes = _num_classes(train_set, test_set)

    vit = isinstance(backbone, ViTBackbone)
    d_opt, d_lr, d_wd, d_dp = VIT_DEFAULTS if vit else CONVNET_DEFAULTS
    optimizer = d_opt if optimizer == "auto" else optimizer
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be auto, adamw or sgd, got {optimizer!r}")
    base_lr = d_lr if lr is None else lr
    weight_decay = d_wd if weight_decay is None else weight_decay
    drop_path = d_dp if drop_path is None else drop_path
    warmup_epochs = min(5.0, epochs / 10) if warmup_epochs is None else warmup_epochs
    size = pre["size"]
    crop_scale = tuple(crop_scale or ((0.08, 1.0) if size > 64 else (0.75, 1.0)))

    for p in backbone.parameters():            # a momentum teacher arrives frozen: train everything ...
        p.requires_grad_(True)
    if vit:
        if cfg.backbone.pos_embed != "learned":   # ... but a fixed sin-cos (MAE) or absent (BEiT) position table
            backbone.net.pos_embed.requires_grad_(False)
        if backbone.mask_token is not None:        # unused without masks
            backbone.mask_token.requires_grad_(False)
        set_drop_path(backbone, drop_path)
    elif drop_path > 0:
        raise ValueError("--drop-path works for ViT backbones only")
    clf = Classifier(backbone, num_classes, features, pre["channels"], size, head_norm).to(device)
    channels_last = cfg.backbone.name.startswith("resnet") and cfg.backbone.channels_last
    if channels_last:
        clf = clf.to(memory_format=torch.channels_last)

    decay = layer_decay if (vit and optimizer == "adamw") else 1.0
    opt = finetune_optimizer(clf, optimizer, decay, weight_decay, dev.type)
    amp = pick_precision(precision or cfg.train.precision, dev)

    recipe = ViewRecipe(size=size, n_views=1, crop_scale=crop_scale, flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                        blur_p=0.0, solarize_p=0.0, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    loader = ViewLoader(train_set, recipe, batch_size, dev, seed=seed, workers=workers if not
                        isinstance(train_set, ArrayDataset) else -1)
    if not isinstance(train_set, ArrayDataset) and pre["channels"] == 1:
        train_set.transform = _Gray(train_set.transform)
    spe = loader.steps_per_epoch
    total, warmup = epochs * spe, round(warmup_epochs * spe)
    peak = scaled_lr(base_lr, batch_size, 256, "linear")
    torch.manual_seed(seed)                   # drop path
    clf.train()                               # BatchNorm in train mode (ResNets), drop path on (ViTs)
    step, history = 0, []
    for epoch in range(epochs):
        total_loss, n = torch.zeros((), device=dev), 0
        for batch in loader.epoch(epoch):
            x, y = batch["views"][0], batch["label"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            set_lr(opt, cosine(step, total, peak, 0.0, warmup))
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = clf(x)                                                  # B×K
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach()
            n += 1
            step += 1
        mean_loss = float(total_loss) / max(1, n)
        if not math.isfinite(mean_loss):
            raise ValueError(f"fine-tuning diverged (loss {mean_loss}) in epoch {epoch + 1}: lower --lr")
        history.append(round(mean_loss, 4))

    clf.eval()
    logits, y = extract(clf, test_set, pre, device, eval_batch_size, workers, amp, desc="classifying the test data")
    acc = accuracy(logits, y)
    return {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "train": train if isinstance(train, str) else getattr(train, "name", "dataset"),
            "test": test if isinstance(test, str) else getattr(test, "name", "dataset"),
            "features": features, "head_norm": head_norm, **matched, **acc, "epochs": epochs, "steps": step,
            "train_images": len(train_set),
            "batch_size": batch_size, "optimizer": optimizer, "base_lr": base_lr, "lr": peak,
            "layer_decay": decay if vit else None, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
            "warmup_epochs": warmup_epochs, "drop_path": drop_path, "crop_scale": list(crop_scale),
            "precision": str(amp).removeprefix("torch.") if amp else "fp32", "train_loss": history,
            "seconds": round(time.perf_counter() - t0, 1)}
