"""Frozen-backbone features for evaluation, and loading the evaluation backbone of a run."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from selfsight.data.arrays import ArrayDataset
from selfsight.eval.feature_choice import FEATURES, FEATURES_HELP, parse_features  # noqa: F401  (re-exported)


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
        transform = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])
    else:
        transform = T.Compose([T.ToImage(), T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size)])
    getattr(dataset, "dataset", dataset).transform = transform          # a folder, or a Subset of one
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_eval)
    yield from loader


def _collate_eval(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images of a folder (always decoded as RGB) for a run trained on gray images, or the reverse:
    RGB -> luma (ITU-R 601-2, as PIL's "L"), gray -> repeated."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3 and channels == 1:
        return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(f"the images have {x.shape[1]} channels, the run was trained on {channels}")


@torch.no_grad()
def extract(fn, dataset, pre: dict, device="cpu", batch_size: int = 512, workers: int = 2,
            amp_dtype: torch.dtype | None = None, desc: str = "extracting features",
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` maps normalized images B×C×S×S to features B×D; returns (features, labels) on CPU.
    The wait shows its progress (``selfsight.progress``) under ``desc``."""
    from selfsight.progress import Progress
    mean = torch.tensor(pre["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, -1, 1, 1)
    feats, labels = [], []
    with Progress(len(dataset), desc, enabled=progress) as bar:
        for images, y in _batches(dataset, batch_size, workers, pre["size"]):
            x = _match_channels(images.to(device).float() / 255.0, mean.shape[1])
            x = (_resize(x, pre["size"]) - mean) / std
            with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                f = fn(x)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


def backbone_features(backbone: nn.Module, features: str = "cls"):
    """x -> B×D features: ``cls`` (the class token of a ViT, the pooled map of a ConvNet),
    ``mean`` (the mean of the patch tokens: MAE's global pool), ``cls+mean`` (concatenated),
    ``lastN`` (ViTs: the class tokens of the last N blocks, each after the final norm,
    concatenated: N·D; DINO ``eval_linear.py`` ``n_last_blocks``) or ``lastN+mean`` (plus the
    mean of the last block's patch tokens: DINO's ``avgpool_patchtokens``)."""
    kind, n_last, with_mean = parse_features(features)
    if kind == "last" and not hasattr(backbone, "get_intermediate_layers"):
        raise ValueError(f"--features {features} needs a ViT backbone (the class tokens of its last blocks); "
                         f"{type(backbone).__name__} has no blocks with class tokens: use cls, mean or cls+mean")

    def fn(x: torch.Tensor) -> torch.Tensor:
        if kind == "last":
            layers = backbone.get_intermediate_layers(x, n_last)                  # n × B×(1+N)×D, normed
            prefix = getattr(getattr(backbone, "net", None), "num_prefix_tokens", 1)
            out = [t[:, 0] for t in layers]
            if with_mean:
                out.append(layers[-1][:, prefix:].mean(1))
            return torch.cat(out, 1)
        f = backbone.forward_features(x)
        if kind == "cls":
            return f.cls
        mean = f.patch.mean(1) if f.patch is not None else f.cls
        return mean if kind == "mean" else torch.cat([f.cls, mean], 1)
    return fn


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)
