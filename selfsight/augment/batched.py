"""The view recipe applied to a whole uint8 batch on the training device.

Same distribution as ``build_per_sample_views`` (torchvision's RandomResizedCrop sampling,
ColorJitter in a random order per sample, ...), but every random parameter is drawn per
sample as a tensor and applied with batched tensor ops, so no Python runs per image:
crops are one ``roi_align`` call (bilinear, with area averaging when shrinking, like
``antialias=True``), blur is one grouped convolution with per-sample kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from selfsight.augment.views import ViewRecipe
from selfsight.nn.device import device_constant, to_device
from selfsight.nn.images import to_channels


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple, ratio: tuple,
                      generator: torch.Generator | None = None, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (x0, y0, x1, y1) for ``n`` images, as torchvision samples them.

    Up to ``tries`` candidates per image: area ~ U(scale)·H·W, log-ratio uniform; the first
    that fits is used, else the central crop with the ratio clamped to ``ratio``.
    """
    area = height * width
    u = torch.rand(n, tries, 4, generator=generator)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * r))
    h = torch.round(torch.sqrt(target / r))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x0 = torch.floor(u[rows, pick, 2] * (width - w + 1)).clamp(max=width - w)
    y0 = torch.floor(u[rows, pick, 3] * (height - h + 1)).clamp(max=height - h)
    # fallback: central crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    miss = first < 0
    w = torch.where(miss, torch.tensor(float(fw)), w)
    h = torch.where(miss, torch.tensor(float(fh)), h)
    x0 = torch.where(miss, torch.tensor(float((width - fw) // 2)), x0)
    y0 = torch.where(miss, torch.tensor(float((height - fh) // 2)), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (B×4, pixels) out of float ``images`` (B×C×H×W) and resize to size×size."""
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)[:, None], boxes], 1)
    return crop_rois(images, rois.to(images.dtype), size)


def crop_rois(images: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """The device crop filter: rois K×5 (image index, x0, y0, x1, y1 in pixels) of float ``images``
    (N×C×H×W) resized to K×C×size×size by ``roi_align``; sampling_ratio=-1 takes ceil(box/size)
    samples per output bin, averaged: area filtering when shrinking."""
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return to_channels(x, 1)                    # ITU-R 601-2 luma, as PIL and torchvision


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)  # 6×B×3×H×W
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1)).squeeze(0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, :1] + shift) % 1.0
    return _hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-sample Gaussian blur (B sigmas), reflect padding, separable grouped convolution."""
    b, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)               # (B·C)×K
    y = F.pad(x.reshape(1, b * c, h, w), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


class BatchedViews:
    """uint8 batch B×C×H×W (any device) -> list of normalized float views: ``n_views`` of B×C×S×S,
    then ``local_crops`` of B×C×s×s (multi-crop).

    No host-device synchronisation: every random parameter is drawn on the CPU (``generator``),
    the samples each op applies to are found there too, and they reach the device in one copy per
    group of views. Views that share a recipe (SimCLR's two, DINO's local crops) are finished as one
    batch, so a 2×224 + 10×96 DINO batch is 3 groups of kernels, not 12.
    """

    def __init__(self, recipe: ViewRecipe, generator: torch.Generator | None = None):
        self.recipe = recipe
        self.generator = generator

    def one_view(self, images: torch.Tensor, recipe: ViewRecipe | None = None) -> torch.Tensor:
        r = recipe or self.recipe
        return self.finish(self._crop(images.float() / 255.0, r), r)

    def _crop(self, images: torch.Tensor, r: ViewRecipe) -> torch.Tensor:
        b, c, h, w = images.shape
        boxes = to_device(sample_crop_boxes(b, h, w, r.crop_scale, r.crop_ratio, self.generator), images.device)
        return resized_crop(images, boxes, r.size)

    def finish(self, x: torch.Tensor, recipe: ViewRecipe | None = None) -> torch.Tensor:
        """Everything after the crop: flip, colour (``color``), normalize. ``x``: B×C×S×S crops,
        uint8 (the hybrid path's worker crops) or float in [0, 1]."""
        return self.finish_views([x], [recipe or self.recipe])[0]

    def finish_views(self, views: list[torch.Tensor], recipes: list[ViewRecipe]) -> list[torch.Tensor]:
        """``finish`` for several views; consecutive views with the same recipe and shape run as one batch."""
        out, i = [], 0
        while i < len(views):
            j = i + 1
            while j < len(views) and recipes[j] == recipes[i] and views[j].shape == views[i].shape:
                j += 1
            group = views[i] if j == i + 1 else torch.cat(views[i:j])
            out.extend(self._finish(group, recipes[i]).chunk(j - i))
            i = j
        return out

    def _finish(self, x: torch.Tensor, r: ViewRecipe) -> torch.Tensor:
        dev = x.device
        b, c = x.shape[:2]
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        p = _ViewParams(b, c, r, self.generator, dev)
        x = torch.where(p.flip, x.flip(-1), x)
        x = self.color(x, r, p)
        x = ((x - device_constant(tuple(r.mean), dev, x.dtype).view(1, c, 1, 1))
             / device_constant(tuple(r.std), dev, x.dtype).view(1, c, 1, 1))
        return x

    def color(self, x: torch.Tensor, recipe: ViewRecipe | None = None, params: "_ViewParams | None" = None
              ) -> torch.Tensor:
        """ColorJitter (random order per sample) with p, grayscale, blur, solarize; x in [0, 1]."""
        r = recipe or self.recipe
        p = params or _ViewParams(x.shape[0], x.shape[1], r, self.generator, x.device)
        if p.jitter:
            x = x.clone()
            for name, idx, f in p.jitter:          # in order of position: each sample's own op order
                x.index_copy_(0, idx, self._jitter_op(name, x.index_select(0, idx), f))
        if p.gray is not None:
            x = torch.where(p.gray, _gray(x).expand_as(x), x)
        if p.blur is not None:
            idx, sigma = p.blur
            x = x.index_copy(0, idx, gaussian_blur(x.index_select(0, idx), sigma.to(x.dtype), r.blur_kernel))
        if p.solarize is not None:
            x = torch.where(p.solarize & (x >= 0.5), 1.0 - x, x)
        return x

    @staticmethod
    def _jitter_op(name: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if name == "b":                                   # brightness: blend with black
            return (x * f).clamp(0, 1)
        if name == "c":                                   # contrast: blend with the mean gray level
            return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)
        if name == "s":                                   # saturation: blend with the gray image
            return _blend(x, _gray(x), f)
        return _adjust_hue(x, f)                          # hue: rotate H in HSV

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        recipes = [self.recipe.for_view(i) for i in range(self.recipe.total_views)]
        full = images.float() / 255.0                       # once, not once per view
        return self.finish_views([self._crop(full, r) for r in recipes], recipes)


class _ViewParams:
    """The random parameters of one group of B views, drawn on the CPU in one block (one column
    per draw) and sent to the device in two copies (floats, sample indices): nothing is read back.

    ``jitter``: (op, sample indices, factors) in application order: at position k every sample
    applies the op its own random permutation puts at k (torchvision's ColorJitter order), and
    only the samples that jitter at all (``jitter_p``) take part. ``blur``: (indices, sigmas) of
    the blurred samples: the blur runs on those alone.
    """

    def __init__(self, b: int, c: int, r: ViewRecipe, generator: torch.Generator | None, device: torch.device):
        bri, con, sat, hue = r.jitter
        ops = [("b", bri), ("c", con)] + ([("s", sat), ("h", hue)] if c == 3 else [])
        ops = [(name, a) for name, a in ops if a > 0]
        n = len(ops)
        u = torch.rand(b, 6 + 2 * n, generator=generator)         # flip, apply, n factors, n order keys, 4 more
        floats, index, layout = [(u[:, 0] < r.flip_p).float()], [], []
        self.jitter = []
        if ops and r.jitter_p > 0:
            apply = u[:, 1] < r.jitter_p
            order = torch.argsort(u[:, 2 + n:2 + 2 * n], 1)         # per-sample order of the ops
            for k, (name, a) in enumerate(ops):
                lo, hi = (-a, a) if name == "h" else (max(0.0, 1 - a), 1 + a)
                floats.append(lo + (hi - lo) * u[:, 2 + k])
            for pos in range(n):
                for k in range(n):
                    idx = torch.nonzero(apply & (order[:, pos] == k)).squeeze(1)
                    if len(idx):
                        index.append(idx)
                        layout.append(("jitter", ops[k][0], k, len(idx)))
        g, bl, sg, so = (u[:, 2 + 2 * n + i] for i in range(4))
        blur_idx = torch.nonzero(bl < r.blur_p).squeeze(1) if r.blur_p > 0 else torch.zeros(0, dtype=torch.long)
        if len(blur_idx):
            index.append(blur_idx)
            layout.append(("blur", "", -1, len(blur_idx)))
        floats += [(g < r.gray_p).float(), (so < r.solarize_p).float(), 0.1 + 1.9 * sg]
        fdev = to_device(torch.stack(floats, 1), device)                            # B×(4 + n)
        idev = to_device(torch.cat(index), device).split([m[3] for m in layout]) if index else []
        self.flip = fdev[:, 0].bool().view(b, 1, 1, 1)
        self.blur = None
        for (kind, name, k, _), idx in zip(layout, idev):
            if kind == "jitter":                  # factor k sits in column 1 + k
                self.jitter.append((name, idx, fdev[:, 1 + k].index_select(0, idx).view(-1, 1, 1, 1)))
            else:
                self.blur = (idx, fdev[:, -1].index_select(0, idx))
        self.gray = fdev[:, -3].bool().view(b, 1, 1, 1) if r.gray_p > 0 and c == 3 else None
        self.solarize = fdev[:, -2].bool().view(b, 1, 1, 1) if r.solarize_p > 0 else None
