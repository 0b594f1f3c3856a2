"""Frozen-backbone features for evaluation, and loading the evaluation backbone of a run."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from selfsight.config import build_config
from selfsight.data.arrays import ArrayDataset
from selfsight.engine.checkpoint import CheckpointError, safe_load


def load_run(path: str | Path, device="cpu", random_init: bool = False):
    """A run folder or checkpoint -> (method module in eval mode, config, preprocess meta).

    ``random_init=True`` builds the same network without loading the trained weights (the
    random-initialisation baseline; seeded by the run's seed).
    """
    from selfsight.engine.trainer import CHECKPOINT, build_method
    p = Path(path)
    ck_path = p / CHECKPOINT if p.is_dir() else p
    if not ck_path.exists():
        raise CheckpointError(f"no checkpoint at {ck_path}")
    ck = safe_load(ck_path, map_location="cpu")
    cfg = build_config(ck["config"])
    pre = ck["meta"]["preprocess"]
    torch.manual_seed(cfg.train.seed)
    model = build_method(cfg, pre["channels"], pre["size"])
    if not random_init:
        model.load_state_dict(ck["model"])
    return model.to(device).eval(), cfg, pre


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation resize: small images straight to ``size``; large ones shorter side to
    size·256/224, then the central size×size crop (the usual ImageNet protocol)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if max(h, w) <= 64:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    short = int(round(size * 256 / 224))
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def _batches(dataset, batch_size: int, workers: int, size: int):
    """Yield (uint8 images B×C×H×W, labels) from an array set or a folder (folder images are
    brought to the evaluation size by the same rule as ``_resize``, in the workers)."""
    if isinstance(dataset, ArrayDataset):
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i:i + batch_size], dataset.labels[i:i + batch_size]
        return
    import torchvision.transforms.v2 as T
    if size <= 64:
        dataset.transform = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])
    else:
        dataset.transform = T.Compose([T.ToImage(), T.Resize(round(size * 256 / 224), antialias=True),
                                       T.CenterCrop(size)])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_eval)
    yield from loader


def _collate_eval(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.no_grad()
def extract(fn, dataset, pre: dict, device="cpu", batch_size: int = 512, workers: int = 2,
            amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` maps normalized images B×C×S×S to features B×D; returns (features, labels) on CPU."""
    mean = torch.tensor(pre["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, -1, 1, 1)
    feats, labels = [], []
    for images, y in _batches(dataset, batch_size, workers, pre["size"]):
        x = images.to(device).float() / 255.0
        x = (_resize(x, pre["size"]) - mean) / std
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            f = fn(x)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(feats), torch.cat(labels)


FEATURES = ("cls", "mean", "cls+mean")


def backbone_features(backbone: nn.Module, features: str = "cls"):
    """x -> B×D features: ``cls`` (the class token of a ViT, the pooled map of a ConvNet),
    ``mean`` (the mean of the patch tokens: MAE's global pool) or ``cls+mean`` (concatenated)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        f = backbone.forward_features(x)
        if features == "cls":
            return f.cls
        mean = f.patch.mean(1) if f.patch is not None else f.cls
        return mean if features == "mean" else torch.cat([f.cls, mean], 1)
    return fn


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)
