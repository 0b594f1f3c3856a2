"""Label-free health metrics of a checkpoint's representation (no labels needed).

* ``rankme``: the effective rank of the features (Garrido et al. 2023, Eq. 1): exp of the
  entropy of p_k = σ_k/‖σ‖₁ + ε over the singular values of the N×D feature matrix; 1 for
  features collapsed to one direction, up to min(N, D).
* ``alignment`` (Wang & Isola 2020, Eq. 4, α = 2): E‖f(x) − f(y)‖₂^α over positive pairs of
  L2-normalized features; 0 = the two views of an image map to the same point, 4 = opposite.
* ``uniformity`` (Eq. 5, t = 2): log E exp(−t‖f(x) − f(y)‖₂²) over all distinct pairs of
  images; −4 (= −2t) at best for N → ∞ in high dimensions, 0 for a collapse to one point.
* ``embedding_std``: the mean over dimensions of the per-dimension std of the L2-normalized
  features (SimSiam, Fig. 2): ≈ 1/sqrt(D) when healthy, 0 when collapsed;
  ``embedding_std_ratio`` = embedding_std·sqrt(D) (healthy ≈ 1).

RankMe, the std and uniformity are measured on the clean images (resized and normalized as for
kNN). Alignment needs positive pairs: two views of each image drawn with the run's own view
recipe (its ``views`` section: crop, flip, colour jitter, grayscale, blur, solarize, the same
distribution as in pretraining; the global views only, no multi-crop), as Wang & Isola measure
it on the training augmentations. The views come from ``augment.BatchedViews`` for in-memory
sets and from the per-sample transforms for folders.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from selfsight.augment import BatchedViews, build_per_sample_views, resolve_recipe
from selfsight.backbones.features import backbone_features
from selfsight.data import build_dataset, native_size
from selfsight.data.arrays import ArrayDataset
from selfsight.data.paths import stack_views
from selfsight.data.subset import draw
from selfsight.engine.monitor import normalized_std, rankme
from selfsight.eval.features import extract
from selfsight.nn.precision import autocast, eval_precision
from selfsight.runs import load_run

__all__ = ["rankme", "normalized_std", "alignment", "uniformity", "health_metrics", "evaluate_health"]


@torch.no_grad()
def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola Eq. 4: mean over the N positive pairs (x_i, y_i) of ‖x̂_i − ŷ_i‖₂^α (rows
    L2-normalized first)."""
    x, y = F.normalize(x.double(), dim=1), F.normalize(y.double(), dim=1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """Wang & Isola Eq. 5: log of the mean of exp(−t‖x̂_i − x̂_j‖₂²) over the N(N−1)/2 pairs
    i < j of L2-normalized rows (``torch.pdist`` in their code), summed block by block so
    that N×N is never held at once. For unit vectors ‖x̂_i − x̂_j‖² = 2 − 2 x̂_i·x̂_j."""
    x = F.normalize(x.double(), dim=1)
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two samples")
    total = x.new_zeros(())
    for i in range(0, n, chunk):
        q = x[i:i + chunk]
        sq = (2 - 2 * q @ x.T).clamp_min(0)                                # rows i.., all columns
        keep = torch.arange(n, device=x.device)[None, :] > torch.arange(i, i + len(q), device=x.device)[:, None]
        total += torch.where(keep, (-t * sq).exp(), torch.zeros_like(sq)).sum()
    return math.log(float(total) / (n * (n - 1) / 2))


def health_metrics(features: torch.Tensor, view1: torch.Tensor | None = None,
                   view2: torch.Tensor | None = None) -> dict:
    """The metrics of N×D ``features`` (clean images) and, when given, of the positive pairs
    (``view1``[i], ``view2``[i])."""
    d = features.shape[1]
    std = normalized_std(features)
    out = {"rankme": rankme(features), "rankme_max": min(features.shape), "embedding_std": std,
           "embedding_std_ratio": std * math.sqrt(d), "uniformity": uniformity(features)}
    if view1 is not None:
        out["alignment"] = alignment(view1, view2)
    return out


def _view_pairs(dataset, recipe, channels: int, device, batch_size: int, workers: int, seed: int):
    """Yield two augmented views (normalized float B×C×S×S each) of every image, in order."""
    if isinstance(dataset, ArrayDataset):
        views = BatchedViews(recipe, torch.Generator().manual_seed(seed))
        for i in range(0, len(dataset), batch_size):
            yield views(dataset.images[i:i + batch_size].to(device))[:2]
        return
    source = dataset.prepared(transform=build_per_sample_views(recipe, channels=channels), channels=channels)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=stack_views, generator=g)
    for batch in loader:
        yield [v.to(device) for v in batch["views"][:2]]


def evaluate_health(run: str, data: str, n_images: int = 4096, baseline: str | None = None,
                    device: str | None = None, features: str = "cls", data_root: str = "",
                    batch_size: int = 256, workers: int = 2, seed: int = 0, dataset=None) -> dict:
    """Health metrics of a run's evaluation backbone (or of the same backbone at random
    initialisation, ``baseline="random"``) on ``n_images`` images of ``data`` (drawn with
    ``seed``; labels are not used). ``dataset`` overrides ``data`` with any data source.
    ``features`` as for kNN (cls | mean | cls+mean | lastN[+mean]). RankMe can reach at most
    min(N, D): give at least as many images as the feature width."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if baseline not in (None, "random"):
        raise ValueError(f"--baseline must be random, got {baseline!r}")
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    ds = dataset if dataset is not None else build_dataset(data, data_root)
    ds = draw(ds, n_images, seed, sort=True)
    if len(ds) < 2:
        raise ValueError("health metrics need at least two images")
    fn = backbone_features(model.backbone, features)
    amp = eval_precision(device)
    feats, _ = extract(fn, ds, pre, device, batch_size, workers, amp)
    native, _ = native_size(ds)                                               # as the trainer resolves "auto"
    recipe = resolve_recipe(cfg.views, native, pre["channels"])
    recipe = replace(recipe, size=pre["size"], mean=tuple(pre["mean"]), std=tuple(pre["std"]), n_views=2,
                     local_crops=0)
    v1, v2 = [], []
    with torch.no_grad():
        for a, b in _view_pairs(ds, recipe, pre["channels"], device, batch_size, workers, seed):
            with autocast(device, amp):
                v1.append(fn(a).float().cpu())
                v2.append(fn(b).float().cpu())
    res = health_metrics(feats, torch.cat(v1), torch.cat(v2))
    return {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "data": data, "features": features, "n_images": len(ds), "feature_dim": int(feats.shape[1]), **res,
            "seconds": round(time.perf_counter() - t0, 1)}
