"""The worker half of the hybrid path: a decoded image -> one uint8 RandomResizedCrop per view.

DataLoader workers decode and crop (the only steps that need the full-size image); the rest of
the recipe (flip, colour, blur, solarize, normalize) runs batched on the training device
(``BatchedViews.finish``). Crop boxes are drawn as torchvision's RandomResizedCrop draws them
(``sample_crop_boxes``) from a generator seeded per sample, so a view depends only on
(run seed, epoch, sample) and not on the worker that made it: runs are reproducible for any
number of workers and resume exactly mid-epoch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from selfsight.augment.batched import crop_rois, sample_crop_boxes
from selfsight.augment.views import ViewRecipe
from selfsight.data.images import EncodedJPEG, decode_image
from selfsight.nn.device import to_device

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """The crop seed of sample ``key`` (its index, or its position in a shard stream) in an epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + key) & _MASK


class WorkerCrops:
    """PIL image -> ``total_views`` uint8 tensors (``n_views`` of C×S×S, then the local crops at
    their own size): the crop box of each view (its scale and ratio) resized bilinearly with
    antialiasing, as ``T.RandomResizedCrop(antialias=True)`` does.

    The image becomes one uint8 tensor (a view of PIL's buffer, channels-last) and each crop is a
    slice of it resized by torch's uint8 antialiased bilinear kernel: 3-5x faster than PIL's
    ``resize(box=...)`` (a 224 crop of a ~300 px photo: 0.2 against 1.1 ms on one core), which
    matters most for multi-crop (DINO's 12 views of one image). The boxes of views that share a
    crop scale and ratio are drawn in one call."""

    def __init__(self, recipe: ViewRecipe, channels: int = 3):
        self.views = [recipe.for_view(i) for i in range(recipe.total_views)]
        self.mode = "L" if channels == 1 else "RGB"
        self.groups: dict[tuple, list[int]] = {}            # (scale, ratio) -> the views drawn together
        for i, r in enumerate(self.views):
            self.groups.setdefault((tuple(r.crop_scale), tuple(r.crop_ratio)), []).append(i)

    def boxes(self, height: int, width: int, seed: int) -> torch.Tensor:
        """The crop box (x0, y0, x1, y1), x1 and y1 exclusive, of every view: V×4 long."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(len(self.views), 4, dtype=torch.long)
        for (scale, ratio), members in self.groups.items():
            out[members] = sample_crop_boxes(len(members), height, width, scale, ratio, g).long()
        return out

    def __call__(self, image: "Image.Image | EncodedJPEG", seed: int) -> "list[torch.Tensor] | dict":
        """The uint8 crops of ``image``; for an undecoded JPEG (``data.decode=device``) its bytes and
        the boxes instead, ``{"jpeg": bytes as uint8, "boxes": V×4}``: the same boxes as decoded."""
        if isinstance(image, EncodedJPEG):
            return {"jpeg": image.data, "boxes": self.boxes(image.height, image.width, seed)}
        if image.mode != self.mode:
            image = image.convert(self.mode)
        pixels = TF.pil_to_tensor(image)[None]               # 1×C×H×W uint8, channels-last memory
        h, w = pixels.shape[-2:]
        out = []
        for r, (x0, y0, x1, y1) in zip(self.views, self.boxes(h, w, seed).tolist()):
            crop = F.interpolate(pixels[..., y0:y1, x0:x1], size=(r.size, r.size), mode="bilinear",
                                 antialias=True, align_corners=False)
            out.append(crop[0].contiguous())                 # uint8 C×S×S
        return out


class DeviceJPEGDecoder:
    """Decodes lists of JPEGs on ``device`` with ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU,
    libjpeg-turbo on a CPU), safely beside a training step that is still running.

    On a GPU torchvision's decoder writes its outputs, allocated on the caller's stream, from a
    stream of its own that does not wait for the caller's queued kernels, and nvJPEG's hardware
    engine does not honour stream order either: the caching allocator may hand it memory that
    those kernels are still reading, which it then overwrites (wrong numbers, NaN or a device-side
    assert far from the decoder; pytorch/vision PR 9606, meta-pytorch/torchcodec PR 1634; an MAE
    run here hit the assert). So the decode runs with a stream of this class current: its outputs
    come from that stream's pool, which holds only earlier decode outputs, and each output is
    marked used by the training stream (``record_stream``), so the allocator hands a block to the
    decoder again only once the training stream's kernels that read it have finished. The input
    bytes are kept until the next call, when the decoder has synchronised its own stream.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._inputs: list[torch.Tensor] = []

    def __call__(self, jpegs: list[torch.Tensor]) -> list["torch.Tensor | None"]:
        """J × 3×H×W uint8 on the device, None for a file no decoder could read."""
        if self.stream is None:
            return _decode_all(jpegs, self.device)
        training = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            images = _decode_all(jpegs, self.device)
        training.wait_stream(self.stream)
        for img in images:
            if img is not None:
                img.record_stream(training)
        self._inputs = jpegs
        return images


def _decode_all(jpegs: list[torch.Tensor], device: torch.device) -> list["torch.Tensor | None"]:
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)      # J × 3×H×W uint8
    except RuntimeError as e:               # one bad file fails the whole batch: decode one by one
        _reraise_device_errors(e)
        return [_decode_one(j, device) for j in jpegs]


def _reraise_device_errors(error: RuntimeError) -> None:
    """A broken device (a sticky CUDA error from any earlier kernel) is not a broken file."""
    if isinstance(error, getattr(torch, "AcceleratorError", ())):
        raise error


def decode_and_crop(jpegs: list[torch.Tensor], boxes: torch.Tensor, views: list[ViewRecipe],
                    decoder: DeviceJPEGDecoder) -> tuple[list[torch.Tensor], int]:
    """``data.decode=device``: decode J JPEGs on the training device (``decoder``) and cut every
    view's box out of each.

    jpegs: J × (bytes as 1-D uint8, CPU); boxes: J×V×4 (x0, y0, x1, y1), as ``WorkerCrops.boxes``.
    Returns V float tensors J×3×S×S in [0, 1] and the number of images that no decoder could read
    (each replaced by another image of the batch, so the batch keeps its size; the caller counts
    them as skipped). Crop and resize: ``roi_align`` per image, one call per view size, as the
    uint8 cache's device crops (``crop_rois``): area-averaged bilinear samples, edges replicated.
    """
    device = decoder.device
    images = decoder(jpegs)
    bad = sum(img is None for img in images)
    if bad == len(images):
        raise RuntimeError(f"none of the {len(images)} JPEGs of this batch could be decoded")
    good = next(img for img in images if img is not None)
    images = [(good if img is None else img)[None].float() for img in images]    # J × 1×3×H×W
    by_size: dict[int, list[int]] = {}
    for v, r in enumerate(views):
        by_size.setdefault(r.size, []).append(v)
    out: list = [None] * len(views)
    for size, members in by_size.items():
        b = boxes[:, members].float()                                        # J×k×4
        rois = to_device(torch.cat([torch.zeros(*b.shape[:2], 1), b], 2), device)           # J×k×5
        crops = torch.stack([crop_rois(img, rois[j], size) for j, img in enumerate(images)])
        crops = crops.div_(255.0).clamp_(0.0, 1.0)                           # J×k×3×S×S
        for i, v in enumerate(members):
            out[v] = crops[:, i]
    return out, bad


def _decode_one(data: torch.Tensor, device: torch.device) -> "torch.Tensor | None":
    """One JPEG on ``device``, else on the CPU with PIL (then moved); None when neither can read it."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        _reraise_device_errors(e)
    try:
        return TF.pil_to_tensor(decode_image(data.numpy().tobytes(), "<jpeg>")).to(device)
    except (ValueError, OSError):
        return None
