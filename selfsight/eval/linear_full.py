"""Linear probe, full path: a linear classifier trained on the frozen backbone with augmentations
(for GPU users; ``selfsight eval linear --full``).

As MAE's ``main_linprobe.py`` and DINO's ``eval_linear.py``: every epoch the training images are
augmented anew (random resized crop, scale ``crop_scale``, and horizontal flip; nothing else),
the frozen backbone (evaluation mode, no gradients: its weights and BatchNorm statistics never
change) gives their features, and a head ``BatchNorm1d(affine=False)`` (MAE, He et al. 2022 §A.2;
``batchnorm=False`` drops it, as DINO) ``-> Linear`` is trained with SGD (momentum 0.9, weight
decay ``weight_decay`` on the weights) and a cosine learning rate per step after ``warmup_epochs``
of linear warm-up; ``lr`` is the base rate for a batch of 256 (linear scaling rule: lr·B/256).
The test split is evaluated once at the end on centred images (the resizing of kNN), top-1/top-5.

In-memory sets are augmented as whole uint8 batches on the device (``augment.BatchedViews`` with
the crop and flip of the view recipe only); folders per image in DataLoader workers (torchvision
transforms v2).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.backbones.features import backbone_features
from selfsight.data.arrays import ArrayDataset
from selfsight.eval.features import collate_images, extract, pixel_features
from selfsight.eval.labels import labeled_pair
from selfsight.eval.linear import accuracy
from selfsight.nn.precision import autocast, eval_precision
from selfsight.runs import load_run


def _recipe(pre: dict, crop_scale: tuple):
    return ViewRecipe(size=pre["size"], n_views=1, crop_scale=tuple(crop_scale), flip_p=0.5, jitter_p=0.0,
                      gray_p=0.0, blur_p=0.0, solarize_p=0.0, mean=tuple(pre["mean"]), std=tuple(pre["std"]))


def augmented_batches(dataset, pre: dict, epoch: int, batch_size: int, device, seed: int = 0, workers: int = 2,
                      crop_scale: tuple = (0.08, 1.0)):
    """One epoch of (normalized augmented images B×C×S×S on ``device``, labels), shuffled with
    ``seed`` and ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    recipe = _recipe(pre, crop_scale)
    if isinstance(dataset, ArrayDataset):
        views = BatchedViews(recipe, g)
        order = torch.randperm(len(dataset), generator=g)
        for i in range(0, len(dataset), batch_size):
            idx = order[i:i + batch_size]
            yield views.one_view(dataset.images[idx].to(device), recipe), dataset.labels[idx].to(device)
        return
    ops = [T.ToImage(), T.RandomResizedCrop(recipe.size, scale=recipe.crop_scale, antialias=True),
           T.RandomHorizontalFlip(0.5)]
    if pre["channels"] == 1:                                 # folders decode RGB; a gray run gets the luma
        ops.append(T.Grayscale(1))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(recipe.mean, recipe.std)]
    loader = DataLoader(dataset.prepared(transform=T.Compose(ops)), batch_size=batch_size, shuffle=True, generator=g, num_workers=workers,
                        collate_fn=collate_images, pin_memory=torch.device(device).type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def make_head(dim: int, num_classes: int, batchnorm: bool = True, device=None) -> nn.Module:
    """MAE's linear-probe head: BatchNorm without affine parameters (eps 1e-6), then a linear layer
    initialised with a truncated normal of std 0.01 and a zero bias."""
    linear = nn.Linear(dim, num_classes, device=device)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6, device=device), linear) if batchnorm else linear


def linear_probe_full(fn, train_set, test_set, pre: dict, num_classes: int, epochs: int = 30, lr: float = 0.1,
                      batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                      warmup_epochs: float = 0.0, batchnorm: bool = True, crop_scale: tuple = (0.08, 1.0),
                      device="cpu", seed: int = 0, workers: int = 2, amp_dtype: torch.dtype | None = None) -> dict:
    """Train a head on ``fn``'s features (``fn``: normalized images -> B×D, the frozen backbone; it
    runs under ``torch.no_grad``) of augmented training images; top-1/top-5 on ``test_set``."""
    device = torch.device(device)
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    base_lr = lr * batch_size / 256
    head, opt = None, None
    step = 0
    correct = seen = 0
    for epoch in range(epochs):
        correct = seen = 0
        for x, y in augmented_batches(train_set, pre, epoch, batch_size, device, seed, workers, crop_scale):
            with torch.no_grad(), autocast(device, amp_dtype):
                f = fn(x).float()
            if head is None:
                head = make_head(f.shape[1], num_classes, batchnorm, device)
                decay = [p for p in head.parameters() if p.ndim > 1]
                no_decay = [p for p in head.parameters() if p.ndim <= 1]
                opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=base_lr, momentum=momentum)
            if len(y) < 2 and batchnorm:                 # BatchNorm needs two samples: a lone last one is dropped
                continue
            cur = base_lr * (step + 1) / warmup if step < warmup else \
                base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = cur
            head.train()
            logits = head(f)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    if head is None:
        raise ValueError("the full linear probe needs at least one epoch of training images")
    test_f, test_y = extract(fn, test_set, pre, device, batch_size, workers, amp_dtype)
    head.eval()
    with torch.no_grad():
        logits = head(test_f.to(device)).cpu()
    return {**accuracy(logits, test_y), "train_top1": correct / max(seen, 1), "epochs": epochs, "lr": lr,
            "effective_lr": base_lr, "batch_size": batch_size, "weight_decay": weight_decay, "batchnorm": batchnorm,
            "crop_scale": list(crop_scale), "steps": step, "feature_dim": int(test_f.shape[1])}


def evaluate_linear_full(run: str, train: str, test: str, baseline: str | None = None, device: str | None = None,
                         data_root: str = "", features: str = "cls", epochs: int = 30, lr: float = 0.1,
                         batch_size: int = 256, weight_decay: float = 0.0, warmup_epochs: float = 0.0,
                         batchnorm: bool = True, workers: int = 2, crop_scale: tuple = (0.08, 1.0),
                         train_set=None, test_set=None, unknown_classes: str = "error") -> dict:
    """The full-path linear probe of a run (or of a baseline: ``pixels``, ``random``) on a
    labeled train/test pair (``train_set``/``test_set`` override the specs with data sources; the
    test labels are matched to the training classes by name, ``labels.match_classes``)."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if baseline not in (None, "pixels", "random"):
        raise ValueError(f"--baseline must be pixels or random, got {baseline!r}")
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    model.requires_grad_(False)
    train_set, test_set, matched = labeled_pair(train if train_set is None else train_set,
                                                test if test_set is None else test_set, data_root,
                                                "the linear probe", unknown_classes)
    classes = [len(ds.classes) if hasattr(ds, "labeled") else int(ds.labels.max()) + 1 for ds in (train_set, test_set)]
    fn = pixel_features if baseline == "pixels" else backbone_features(model.backbone, features)
    amp = eval_precision(device)
    res = linear_probe_full(fn, train_set, test_set, pre, max(classes), epochs, lr, batch_size, weight_decay,
                            warmup_epochs=warmup_epochs, batchnorm=batchnorm, crop_scale=crop_scale, device=device,
                            seed=cfg.train.seed, workers=workers, amp_dtype=amp)
    return {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name, "train": train,
            "test": test, "features": features, "protocol": "full", **matched, **res,
            "seconds": round(time.perf_counter() - t0, 1)}
