"""The three ways a data source becomes batches of views, one small class each, chosen by
``choose_path``:

* ``BatchedPath``: in-memory arrays (built-in sets, ``data.cache``) indexed in the main process,
  the whole recipe applied to a uint8 batch on the training device (``BatchedViews``);
* ``HybridPath``: folders and tar shards; DataLoader workers decode and crop (``WorkerCrops``,
  uint8, seeded per sample), the device does the rest (``BatchedViews.finish_views``); with
  ``data.decode=device`` colour JPEGs reach the device undecoded (nvJPEG);
* ``PerSamplePath``: ``data.device_augment=off`` (and folders on a CPU-only run): the whole recipe
  per image in workers (torchvision transforms v2).

A path prepares its source through the source itself (``prepared``; shards: ``configure``), never
by setting attributes on the caller's object. ``raw_batches`` gives one epoch of this rank's
batches as the workers make them; ``finish`` completes one on the device.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Iterator

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader

from selfsight.augment import BatchedViews, ViewRecipe, build_per_sample_views
from selfsight.data.arrays import ArrayDataset
from selfsight.data.crops import DeviceJPEGDecoder, WorkerCrops, decode_and_crop, sample_seed
from selfsight.data.shards import ShardDataset
from selfsight.nn.device import to_device


def default_workers(device: torch.device, world: int = 1) -> int:
    """DataLoader workers per process for decoded sources (``data.workers=-1``): on a GPU every core
    but one of this process's share of the machine (decoding must keep up with the accelerator),
    at most 16; on a CPU-only run 2, beside the training threads."""
    if device.type == "cpu":
        return 2
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(2, min(16, (os.cpu_count() or 2) // max(1, local) - 1))


def epoch_indices(n: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class BatchSampler:
    """Yields this rank's index lists for one epoch, from ``start`` (a step within the epoch):
    epoch ``e`` visits a permutation drawn from ``seed + e``; global step ``i`` takes the slice
    ``[i·G, (i+1)·G)`` (G = global batch) and rank ``r`` its ``r``-th chunk."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, epoch: int, seed: int, start: int = 0,
                 keyed: bool = False):
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.epoch, self.seed, self.start = epoch, seed, start
        self.local = global_batch // world
        self.keyed = keyed              # yield (index, epoch) keys (the hybrid path seeds crops with them)

    def __len__(self) -> int:
        return self.n // self.gb - self.start

    def __iter__(self):
        perm = epoch_indices(self.n, self.epoch, self.seed)
        for i in range(self.start, self.n // self.gb):
            chunk = perm[i * self.gb:(i + 1) * self.gb]
            idx = chunk[self.rank * self.local:(self.rank + 1) * self.local].tolist()
            yield [(i, self.epoch) for i in idx] if self.keyed else idx


class _Transformed(torch.utils.data.Dataset):
    """A source without ``prepared`` (an in-memory set, a user's own map-style data set): each
    item's image goes through ``transform``."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {**item, "image": self.transform(item["image"])}


def prepared(dataset, transform=None, undecoded_jpegs: bool = False):
    """``dataset`` as a path wants it, asked of the source itself (``prepared``) where it can; any
    other map-style source is wrapped, never changed."""
    if hasattr(dataset, "prepared"):
        return dataset.prepared(transform=transform, undecoded_jpegs=undecoded_jpegs)
    return _Transformed(dataset, transform) if transform is not None else dataset


class _Cropped(torch.utils.data.Dataset):
    """The hybrid path's worker half for a map-style source: item ``(i, epoch)`` -> uint8 crops of
    image ``i`` seeded with (seed, epoch, i)."""

    def __init__(self, dataset, crops: WorkerCrops, seed: int):
        self.dataset, self.crops, self.seed = dataset, crops, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, epoch = key
        item = self.dataset[i]
        image = item["image"]
        if isinstance(image, torch.Tensor):
            image = TF.to_pil_image(image)
        return {**item, "image": self.crops(image, sample_seed(self.seed, epoch, i))}


class _IgnoreSeed:
    """A per-sample transform in the shards' ``transform(image, seed)`` slot (``device_augment=off``)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, seed: int):
        return self.transform(image)


class _Regroup:
    """Batches of exactly ``size`` from the per-worker batches of a stream (full ones, then remainders)."""

    def __init__(self, size: int):
        self.size, self.parts, self.skipped = size, [], 0

    def push(self, raw: dict) -> Iterator[dict]:
        self.skipped += raw["skipped"]
        if raw["image"] is not None:
            self.parts.append(raw)
        while sum(len(p["label"]) for p in self.parts) >= self.size:
            if len(self.parts) == 1 and len(self.parts[0]["label"]) == self.size:
                out, self.parts = self.parts[0], []
            else:
                views = [torch.cat(v) for v in zip(*(p["image"] for p in self.parts))]
                label = torch.cat([p["label"] for p in self.parts])
                out = {"image": [v[:self.size] for v in views], "label": label[:self.size]}
                rest = {"image": [v[self.size:] for v in views], "label": label[self.size:]}
                self.parts = [rest] if len(rest["label"]) else []
            yield {"views": out["image"], "label": out["label"], "skipped": self.skipped}
            self.skipped = 0


def stack_views(items: list[dict]) -> dict:
    """Worker crops -> ``views`` (V × B×C×S×S uint8). With ``data.decode=device`` some items are
    undecoded JPEGs (``{"jpeg", "boxes"}``): then ``views`` holds the K decoded items, at
    ``decoded_index``, and the others go to the device as ``jpeg`` (their bytes end to end),
    ``jpeg_sizes``, ``boxes`` (J×V×4) and ``jpeg_index``."""
    batch = {"label": torch.tensor([it["label"] for it in items]), "skipped": sum(it["skipped"] for it in items)}
    encoded = [i for i, it in enumerate(items) if isinstance(it["image"], dict)]
    if not encoded:
        batch["views"] = [torch.stack(v) for v in zip(*(it["image"] for it in items))]
        return batch
    decoded = [i for i, it in enumerate(items) if not isinstance(it["image"], dict)]
    batch["views"] = [torch.stack(v) for v in zip(*(items[i]["image"] for i in decoded))] if decoded else []
    batch["decoded_index"] = torch.tensor(decoded, dtype=torch.long)
    # one buffer (one shared-memory segment to the main process, not one per image) and the lengths
    batch["jpeg"] = torch.cat([items[i]["image"]["jpeg"] for i in encoded])
    batch["jpeg_sizes"] = torch.tensor([len(items[i]["image"]["jpeg"]) for i in encoded], dtype=torch.long)
    batch["boxes"] = torch.stack([items[i]["image"]["boxes"] for i in encoded])         # J×V×4
    batch["jpeg_index"] = torch.tensor(encoded, dtype=torch.long)
    return batch


def prefetched(source: Iterator[dict], depth: int = 2, pin: bool = False) -> Iterator[dict]:
    """``source``'s items, made up to ``depth`` ahead in a background thread (torch's indexing and
    copies release the GIL); ``pin``: the items' tensors are copied into pinned memory there. An
    error in the thread is raised here; closing this generator stops the thread."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source:
                if pin:
                    item = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
                if not put(item):
                    return
            put(end)
        except BaseException as e:      # handed to the consumer
            put(_Failure(e))

    thread = threading.Thread(target=run, name="selfsight-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Stepping:
    """What every path shares: this rank's place in the global batch and the worker DataLoader."""

    def __init__(self, dataset, global_batch: int, device: torch.device, rank: int, world: int, seed: int,
                 workers: int):
        self.dataset, self.global_batch, self.device = dataset, global_batch, device
        self.rank, self.world, self.seed, self.workers = rank, world, seed, workers
        self.steps_per_epoch = len(dataset) // global_batch
        self.streaming = isinstance(dataset, ShardDataset)
        self._loader = self._sampler = None       # map-style worker path: one DataLoader, workers kept

    def sampler(self, epoch: int, start: int, keyed: bool = False) -> BatchSampler:
        return BatchSampler(len(self.dataset), self.global_batch, self.rank, self.world, epoch, self.seed, start,
                            keyed=keyed)

    def worker_batches(self, epoch: int, start: int, keyed: bool) -> Iterator[dict]:
        """One DataLoader for the whole run whose workers outlive the epoch (``persistent_workers``):
        each epoch only swaps the batch sampler's epoch and start, which live in this process, so no
        epoch pays the workers' start-up (forking, importing, re-opening files) again."""
        sampler = self.sampler(epoch, start, keyed)
        if self._loader is None:
            self._sampler = sampler
            self._loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                      collate_fn=stack_views, pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.workers > 0)
        else:
            self._sampler.epoch, self._sampler.start = sampler.epoch, sampler.start
        return iter(self._loader)

    def stream(self, epoch: int, start: int) -> Iterator[dict]:
        """This rank's ``steps_per_epoch`` batches of a shard stream; the first ``start`` are read and
        dropped (a mid-epoch resume re-reads them). A rank whose shards run out early reads them again."""
        regroup, produced, pass_ = _Regroup(self.global_batch // self.world), 0, 0
        while produced < self.steps_per_epoch:
            self.dataset.set_epoch(epoch, pass_)
            before = produced
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                pin_memory=self.device.type == "cuda")
            for raw in loader:
                for batch in regroup.push(raw):
                    produced += 1
                    if produced > start:
                        yield batch
                    if produced == self.steps_per_epoch:
                        return
            if produced == before and pass_ > 0:
                raise RuntimeError(f"the shards {self.dataset.spec} hold no readable image for rank {self.rank}")
            pass_ += 1


class BatchedPath(_Stepping):
    """In-memory arrays: indexed here, the whole recipe on the device."""
    mode = "batched"

    def __init__(self, dataset: ArrayDataset, views: BatchedViews, prefetch: int, **stepping):
        super().__init__(dataset, **stepping)
        self.views, self.prefetch = views, prefetch

    def raw_batches(self, epoch: int, start: int) -> Iterator[dict]:
        batches = (self.dataset.__getitems__(idx) for idx in self.sampler(epoch, start))
        # on a GPU the gather (a memory-mapped cache: ~50 MB per batch of 256 × 3×256×256) and the
        # copy into pinned memory run in a thread, ahead of the step, and the upload is asynchronous
        return prefetched(batches, self.prefetch, pin=True) if self.device.type == "cuda" and self.prefetch \
            else batches

    def finish(self, raw: dict) -> tuple[list[torch.Tensor], int]:
        return self.views(to_device(raw["image"], self.device)), 0


class HybridPath(_Stepping):
    """Folders and shards: workers decode and crop (uint8), the device flips, colours and normalizes."""
    mode = "hybrid"

    def __init__(self, dataset, views: BatchedViews, recipe: ViewRecipe, channels: int, decode: str, **stepping):
        crops = WorkerCrops(recipe, channels)
        self.jpeg_decoder = None
        if isinstance(dataset, ShardDataset):
            dataset.configure(stepping["seed"], stepping["rank"], stepping["world"],
                              stepping["global_batch"] // stepping["world"], crops)
        else:
            if decode == "device":          # colour JPEGs reach the device undecoded
                self.jpeg_decoder = DeviceJPEGDecoder(stepping["device"])
            dataset = _Cropped(prepared(dataset, undecoded_jpegs=decode == "device"), crops, stepping["seed"])
        super().__init__(dataset, **stepping)
        self.views = views
        self.view_recipes = [recipe.for_view(i) for i in range(recipe.total_views)]

    def raw_batches(self, epoch: int, start: int) -> Iterator[dict]:
        return self.stream(epoch, start) if self.streaming else self.worker_batches(epoch, start, keyed=True)

    def finish(self, raw: dict) -> tuple[list[torch.Tensor], int]:
        crops, bad = self._device_crops(raw)
        return self.views.finish_views(crops, self.view_recipes), bad

    def _device_crops(self, raw: dict) -> tuple[list[torch.Tensor], int]:
        """The batch's crops on the device: the workers' uint8 crops, plus (``data.decode=device``)
        the JPEGs decoded and cropped here; returns them and the JPEGs no decoder read."""
        views = [to_device(v, self.device) for v in raw["views"]]
        if "jpeg" not in raw:
            return views, 0
        jpegs = list(torch.split(raw["jpeg"], raw["jpeg_sizes"].tolist()))
        crops, bad = decode_and_crop(jpegs, raw["boxes"], self.view_recipes, self.jpeg_decoder)
        if not views:                       # every image of the batch was a JPEG decoded here
            return crops, bad
        at_jpeg = to_device(raw["jpeg_index"], self.device)
        at_decoded = to_device(raw["decoded_index"], self.device)
        out = []
        for crop, view in zip(crops, views):
            full = crop.new_empty((len(raw["label"]), *crop.shape[1:]))
            full.index_copy_(0, at_jpeg, crop)
            full.index_copy_(0, at_decoded, view.float().div_(255.0))
            out.append(full)
        return out, bad


class PerSamplePath(_Stepping):
    """The whole recipe per image in workers; the device only receives the views."""
    mode = "per_sample"

    def __init__(self, dataset, recipe: ViewRecipe, channels: int, **stepping):
        per_sample = build_per_sample_views(recipe, channels=channels)
        if isinstance(dataset, ShardDataset):
            dataset.configure(stepping["seed"], stepping["rank"], stepping["world"],
                              stepping["global_batch"] // stepping["world"], _IgnoreSeed(per_sample))
        else:
            dataset = prepared(dataset, transform=per_sample)
        super().__init__(dataset, **stepping)

    def raw_batches(self, epoch: int, start: int) -> Iterator[dict]:
        return self.stream(epoch, start) if self.streaming else self.worker_batches(epoch, start, keyed=False)

    def finish(self, raw: dict) -> tuple[list[torch.Tensor], int]:
        return [to_device(v, self.device) for v in raw["views"]], 0


def choose_path(dataset, recipe: ViewRecipe, views: BatchedViews, device: torch.device, device_augment: str,
                decode: str, prefetch: int, workers: int, **stepping):
    """The path of a source: arrays batched on the device; folders and shards hybrid on a GPU (or
    ``data.device_augment=on``), per sample on a CPU-only run (the hybrid path would move the colour
    work onto the cores that train); everything per sample with ``data.device_augment=off``.
    ``workers=-1``: none for arrays, ``default_workers`` for the rest."""
    mode = "per_sample" if device_augment == "off" else \
        "batched" if isinstance(dataset, ArrayDataset) else \
        "hybrid" if device_augment == "on" or device.type != "cpu" else "per_sample"
    if workers < 0:
        workers = 0 if mode == "batched" else default_workers(device, stepping["world"])
    stepping["workers"] = workers
    streaming = isinstance(dataset, ShardDataset)
    if decode == "device" and not (mode == "hybrid" and not streaming and hasattr(dataset, "prepared")):
        raise ValueError(
            "data.decode=device decodes the JPEGs of an image folder on the hybrid path (a folder on a GPU, or "
            f"data.device_augment=on); this run's data ({type(dataset).__name__}, path {mode}) is decoded "
            "elsewhere: leave data.decode=workers" + (" (data.cache=true never decodes after the first pass)"
                                                      if mode == "batched" else ""))
    channels = getattr(dataset, "channels", 3)
    if mode == "batched":
        return BatchedPath(dataset, views, prefetch, device=device, **stepping)
    if mode == "hybrid":
        return HybridPath(dataset, views, recipe, channels, decode, device=device, **stepping)
    return PerSamplePath(dataset, recipe, channels, device=device, **stepping)
