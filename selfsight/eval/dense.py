"""Linear semantic segmentation on frozen patch tokens (DINOv2's linear protocol, Oquab et al. 2023,
§7.4 and their ``eval/segmentation`` code: a linear layer on the patch tokens, logits bilinearly
upsampled to the label resolution, cross-entropy per pixel; "+ms" and the boosted variants left out).

The frozen backbone's last map becomes the token grid: a ViT's patch tokens (or, with ``blocks=N``,
the patch tokens of its last N blocks concatenated, each after the final norm: DINOv2's 4-layer
variant), a ConvNet's last feature map (``Features.patch``, B×h·w×D in row-major order). The tokens
are extracted once and standardised per channel with the training statistics (DINOv2 puts a
BatchNorm in front of its linear layer; on fixed features that is the same map). The head is the
linear probe's stacked classifier (``eval.linear.train_linear``): one 1×1 linear map per (lr, weight
decay) pair, trained together with SGD + cosine, the pair chosen by mIoU on a held-out tenth of the
training images, then refitted on all of them and scored once on the test images.

mIoU: per class, intersection over union of predicted and true pixels summed over the whole test
set (one confusion matrix, as mmseg and DINOv2 do, not a per-image mean), averaged over the classes
that occur in the test labels or the predictions; mask value 255 is not scored.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from selfsight.data import build_dense
from selfsight.data.scenes import IGNORE, DenseArrays
from selfsight.eval.linear import train_linear
from selfsight.nn.images import to_channels
from selfsight.nn.precision import autocast
from selfsight.progress import Progress
from selfsight.runs import load_run

# per-pixel cross-entropy averages over many positions, so the useful learning rates sit higher than
# the image-level probe's (DINOv2 scenes probe: 0.1 -> 0.207 mIoU, 1.0 -> 0.235, 3.0 -> 0.240 in 10 epochs);
# weight decay made no difference there
LRS = (0.1, 0.3, 1.0, 3.0)
WEIGHT_DECAYS = (0.0,)


def token_map(backbone, blocks: int = 1):
    """x (B×C×S×S) -> the backbone's token grid B×h×w×D (channels last): ``blocks`` > 1 concatenates
    the patch tokens of a ViT's last ``blocks`` blocks (N·D channels)."""
    prefix = getattr(getattr(backbone, "net", None), "num_prefix_tokens", None)
    if blocks > 1 and (not hasattr(backbone, "get_intermediate_layers") or prefix is None):
        raise ValueError(f"--blocks {blocks} concatenates the patch tokens of a ViT's last blocks; "
                         f"{type(backbone).__name__} is not a selfsight ViT: use --blocks 1 (its last map)")

    def fn(x: torch.Tensor) -> torch.Tensor:
        if blocks > 1:
            tokens = torch.cat([t[:, prefix:] for t in backbone.get_intermediate_layers(x, blocks)], 2)
        else:
            tokens = backbone.forward_features(x).patch                               # B×N×D
        if tokens is None or tokens.ndim != 3 or tokens.shape[1] == 0:
            raise ValueError(f"{getattr(backbone, 'name', type(backbone).__name__)} gives no spatial tokens "
                             "(Features.patch); dense evaluation needs a ViT or a ConvNet's feature map")
        return grid(tokens)
    return fn


def grid(tokens: torch.Tensor) -> torch.Tensor:
    """Row-major tokens B×N×D of a square input -> B×h×w×D (h = w = √N)."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid (dense evaluation feeds square images)")
    return tokens.reshape(b, side, side, d)


@torch.no_grad()
def extract_tokens(fn, data: DenseArrays, pre: dict, device="cpu", batch_size: int = 128,
                   amp_dtype: torch.dtype | None = None, desc: str = "tokens") -> torch.Tensor:
    """The token grids of every image of ``data`` (normalised as the run's inputs, at the data's
    own size): N×h×w×D float16 on the CPU."""
    mean = torch.tensor(pre["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], device=device).view(1, -1, 1, 1)
    out = []
    with Progress(len(data), desc) as bar:
        for i in range(0, len(data), batch_size):
            x = to_channels(data.images[i:i + batch_size].to(device).float() / 255.0, mean.shape[1])
            with autocast(device, amp_dtype):
                out.append(fn((x - mean) / std).half().cpu())
            bar.update(len(x))
    return torch.cat(out)


def standardize_(train: torch.Tensor, *others: torch.Tensor, chunk: int = 256) -> None:
    """Standardise token grids N×h×w×D per channel in place with the training grids' statistics."""
    flat = train.reshape(-1, train.shape[-1])
    s1 = torch.zeros(flat.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for i in range(0, flat.shape[0], chunk * 64):
        f = flat[i:i + chunk * 64].double()
        s1 += f.sum(0)
        s2 += (f * f).sum(0)
    mean = s1 / flat.shape[0]
    std = (s2 / flat.shape[0] - mean ** 2).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    for t in (train, *others):
        for i in range(0, t.shape[0], chunk):
            t[i:i + chunk] = ((t[i:i + chunk].float() - mean.float()) / std.float()).half()


def upsampled_loss(size: tuple[int, int]):
    """``train_linear``'s loss for token grids: logits S×(b·h·w)×C upsampled bilinearly to the label
    size, cross-entropy over the scored pixels of masks b×H×W; the sum of the S heads' means."""
    def loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        s, b = logits.shape[0], masks.shape[0]
        up = upsample(logits, b, size)                                                # (S·b)×C×H×W
        target = masks.long().repeat(s, 1, 1)
        scored = (masks != IGNORE).sum().clamp_min(1)
        return F.cross_entropy(up, target, ignore_index=IGNORE, reduction="sum") / scored
    return loss


def upsample(logits: torch.Tensor, b: int, size: tuple[int, int]) -> torch.Tensor:
    """S×(b·h·w)×C -> (S·b)×C×H×W, bilinear (DINOv2's ``resize`` of the logits to the labels)."""
    s, _, c = logits.shape
    side = math.isqrt(logits.shape[1] // b)
    maps = logits.reshape(s * b, side, side, c).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def confusion(heads, tokens: torch.Tensor, masks: torch.Tensor, num_classes: int,
              batch_size: int = 64) -> torch.Tensor:
    """Confusion matrices S×C×C (rows: true class, columns: predicted) of S stacked heads over
    the scored pixels of all images."""
    s = heads.weight.shape[0]
    cm = torch.zeros(s, num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i:i + batch_size], masks[i:i + batch_size].long()
        logits = heads(t.reshape(-1, t.shape[-1]).float())
        pred = upsample(logits, len(t), m.shape[-2:]).argmax(1).reshape(s, *m.shape)        # S×b×H×W
        keep = m != IGNORE
        for j in range(s):
            cm[j] += torch.bincount(m[keep] * num_classes + pred[j][keep],
                                    minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return cm


def scores(cm: torch.Tensor, classes: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy and the IoU of each class from one confusion matrix C×C (classes absent
    from both the labels and the predictions are left out of the mean)."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = tp / union.clamp_min(1)
    names = classes if classes and len(classes) == len(tp) else [str(i) for i in range(len(tp))]
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(tp.sum() / cm.sum().clamp_min(1)),
            "iou": {names[i]: round(float(iou[i]), 4) for i in range(len(tp)) if present[i]}}


def linear_segmentation(train_t: torch.Tensor, train_m: torch.Tensor, test_t: torch.Tensor, test_m: torch.Tensor,
                        num_classes: int, classes: list[str] | None = None, epochs: int = 10,
                        batch_size: int = 64, lrs=LRS, weight_decays=WEIGHT_DECAYS, val_fraction: float = 0.1,
                        seed: int = 0) -> dict:
    """Sweep (lr, weight decay) on a held-out share of the training images (by mIoU), refit on all
    of them, score the test images. Token grids N×h×w×D (standardised), masks N×H×W uint8."""
    size = tuple(train_m.shape[-2:])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_t), generator=g)
    n_val = max(1, int(round(val_fraction * len(train_t))))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    heads = train_linear(train_t[fit_idx], train_m[fit_idx], num_classes, lrs, weight_decays, epochs, batch_size,
                         seed, loss_fn=upsampled_loss(size))
    val_cm = confusion(heads, train_t[val_idx], train_m[val_idx], num_classes)
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    sweep = [{"lr": lr, "weight_decay": wd, "val_miou": round(scores(val_cm[i])["miou"], 4)}
             for i, (lr, wd) in enumerate(pairs)]
    best = max(sweep, key=lambda r: r["val_miou"])
    head = train_linear(train_t, train_m, num_classes, [best["lr"]], [best["weight_decay"]], epochs, batch_size,
                        seed, loss_fn=upsampled_loss(size))
    result = scores(confusion(head, test_t, test_m, num_classes)[0], classes)
    return {**result, "lr": best["lr"], "weight_decay": best["weight_decay"], "val_miou": best["val_miou"],
            "epochs": epochs, "sweep": sweep}


def evaluate_segmentation(run: str, train: str, test: str, baseline: str | None = None, device: str | None = None,
                          data_root: str = "", size: int | None = None, blocks: int = 1, epochs: int = 10,
                          max_train_images: int | None = None, batch_size: int = 128) -> dict:
    """Linear segmentation mIoU and pixel accuracy of a run's frozen backbone (module docstring) on
    dense data (``fashion-mnist-scenes``, or folders with ``images/`` + ``masks/``); ``baseline
    ="random"``: the same backbone at random initialisation. ``size``: the side the images are fed
    at (default: a built-in set's own size, a folder's at the run's input size)."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if baseline not in (None, "random"):
        raise ValueError(f"--baseline for segmentation must be random, got {baseline!r}")
    if blocks < 1:
        raise ValueError(f"--blocks must be at least 1, got {blocks}")
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    train_set = build_dense(train, data_root, size or None, default_size=pre["size"])
    test_set = build_dense(test, data_root, train_set.image_size)
    classes = _matched_classes(train_set, test_set, train, test)
    if max_train_images and max_train_images < len(train_set):
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:max_train_images]
        train_set = DenseArrays(train_set.images[keep], train_set.masks[keep], name=train_set.name,
                                classes=train_set.classes)
    fn = token_map(model.backbone, blocks)
    train_t = extract_tokens(fn, train_set, pre, device, batch_size, desc="tokens of the training images")
    test_t = extract_tokens(fn, test_set, pre, device, batch_size, desc="tokens of the test images")
    standardize_(train_t, test_t)
    res = linear_segmentation(train_t, train_set.masks, test_t, test_set.masks, len(classes), classes, epochs)
    h, w, d = train_t.shape[1:]
    return {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "train": train, "test": test, "size": train_set.image_size, "tokens": f"{h}x{w}", "blocks": blocks,
            "feature_dim": int(d), "train_images": len(train_set), "test_images": len(test_set),
            "skipped": train_set.skipped + test_set.skipped, "classes": classes, **res,
            "seconds": round(time.perf_counter() - t0, 1)}


def _matched_classes(train_set: DenseArrays, test_set: DenseArrays, train: str, test: str) -> list[str]:
    """The class names of the shared mask ids: names given by both sets must agree; a set without
    names (``class 0``, ...) takes the other's; the longer list covers the ids either set uses."""
    a, b = train_set.classes, test_set.classes
    named_a, named_b = (not all(c.startswith("class ") for c in names) for names in (a, b))
    if named_a and named_b and a != b:
        raise ValueError(f"{train} and {test} name their mask ids differently ({', '.join(a[:4])}, ... vs "
                         f"{', '.join(b[:4])}, ...): give both the same classes.txt")
    if named_a != named_b:
        names, other = (a, b) if named_a else (b, a)
        if len(other) > len(names):
            raise ValueError(f"mask ids up to {len(other) - 1} occur, but only {len(names)} classes are named "
                             "(classes.txt)")
        return names
    return max(a, b, key=len)
