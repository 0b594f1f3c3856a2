"""Features of a frozen backbone for the evaluations: images brought to the run's input (the
channels, the evaluation resize, the normalization), the backbone's chosen features
(``backbones.features``), and the features of a labeled train/test pair with the test labels
matched to the training classes (``labeled_features``)."""
from __future__ import annotations

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader

from selfsight.backbones.features import backbone_features
from selfsight.data.arrays import ArrayDataset
from selfsight.eval.labels import labeled_pair
from selfsight.nn.images import eval_resize, to_channels
from selfsight.nn.precision import autocast
from selfsight.progress import Progress
from selfsight.runs import load_run


def eval_batches(dataset, batch_size: int, workers: int, size: int):
    """Yield (uint8 images B×C×H×W, labels) from an array set or a folder (folder images are
    brought to the evaluation size by the same rule as ``nn.images.eval_resize``, in the workers)."""
    if isinstance(dataset, ArrayDataset):
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i:i + batch_size], dataset.labels[i:i + batch_size]
        return
    if size <= 64:
        transform = T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])
    else:
        transform = T.Compose([T.ToImage(), T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size)])
    loader = DataLoader(dataset.prepared(transform=transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images)
    yield from loader


def collate_images(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``{"image": C×H×W tensor, "label": int}`` -> (B×C×H×W, labels B)."""
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.no_grad()
def extract(fn, dataset, pre: dict, device="cpu", batch_size: int = 512, workers: int = 2,
            amp_dtype: torch.dtype | None = None, desc: str = "extracting features",
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` maps normalized images B×C×S×S to features B×D; returns (features, labels) on CPU.
    The wait shows its progress (``selfsight.progress``) under ``desc``."""
    mean = torch.tensor(pre["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, -1, 1, 1)
    feats, labels = [], []
    with Progress(len(dataset), desc, enabled=progress) as bar:
        for images, y in eval_batches(dataset, batch_size, workers, pre["size"]):
            x = to_channels(images.to(device).float() / 255.0, mean.shape[1])
            x = (eval_resize(x, pre["size"]) - mean) / std
            with autocast(device, amp_dtype):
                f = fn(x)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            bar.update(len(y))
    return torch.cat(feats), torch.cat(labels)


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def labeled_features(run: str, train, test, baseline: str | None = None, device: str | None = None,
                     data_root: str = "", batch_size: int = 512, features: str = "cls", protocol: str = "kNN",
                     unknown_classes: str = "error"):
    """Frozen features of a labeled train/test pair: (train_f, train_y, test_f, test_y, info).

    ``baseline="pixels"``: raw pixels at the run's input size, normalized as the run's inputs,
    mean-centred with the training-set mean (the stronger pixel baseline). ``"random"``: the
    same backbone at random initialisation. ``features``: cls | mean | cls+mean | lastN[+mean]
    (``backbones.features``). The test labels are matched to the training classes by name
    (``labels.match_classes``; ``unknown_classes``: error | wrong). ``info``: model, method,
    backbone, train, test, features, and the classes scored.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if baseline not in (None, "pixels", "random"):
        raise ValueError(f"--baseline must be pixels or random, got {baseline!r}")
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    train_set, test_set, classes = labeled_pair(train, test, data_root, protocol, unknown_classes)
    fn = pixel_features if baseline == "pixels" else backbone_features(model.backbone, features)
    train_f, train_y = extract(fn, train_set, pre, device, batch_size, desc="features of the training data")
    test_f, test_y = extract(fn, test_set, pre, device, batch_size, desc="features of the test data")
    if baseline == "pixels":
        mu = train_f.mean(0, keepdim=True)
        train_f, test_f = train_f - mu, test_f - mu
    info = {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "train": train, "test": test, "features": features, **classes}
    return train_f, train_y, test_f, test_y, info
