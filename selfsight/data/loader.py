"""From a data source to batches of views, identical in one process and under DDP.

Epoch ``e`` visits a permutation drawn from ``seed + e``; global step ``i`` takes the slice
``[i·G, (i+1)·G)`` (G = global batch) and rank ``r`` its ``r``-th chunk, so 2 processes see
exactly the global batch of 1 process, and a resumed run can start mid-epoch exactly.
In-memory arrays are indexed in the main process and augmented as a batch on the training
device (``BatchedViews``); folders are decoded and augmented per sample in DataLoader workers.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from selfsight.augment import BatchedViews, ViewRecipe, build_per_sample_views
from selfsight.data.arrays import ArrayDataset
from selfsight.faults import maybe_crash
from selfsight.masking.views import batch_seed


def epoch_indices(n: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class _BatchSampler:
    """Yields this rank's index lists for one epoch, from ``start`` (a step within the epoch)."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, epoch: int, seed: int, start: int = 0):
        self.n, self.gb, self.rank, self.world = n, global_batch, rank, world
        self.epoch, self.seed, self.start = epoch, seed, start
        self.local = global_batch // world

    def __len__(self) -> int:
        return self.n // self.gb - self.start

    def __iter__(self):
        perm = epoch_indices(self.n, self.epoch, self.seed)
        for i in range(self.start, self.n // self.gb):
            chunk = perm[i * self.gb:(i + 1) * self.gb]
            yield chunk[self.rank * self.local:(self.rank + 1) * self.local].tolist()


class _PerSample(torch.utils.data.Dataset):
    """An in-memory set augmented one image at a time (``data.device_augment=off``)."""

    def __init__(self, dataset: ArrayDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {**item, "image": self.transform(item["image"])}


def _stack_views(items: list[dict]) -> dict:
    views = [torch.stack(v) for v in zip(*(it["image"] for it in items))]
    return {"views": views, "label": torch.tensor([it["label"] for it in items]),
            "skipped": sum(it["skipped"] for it in items)}


class ViewLoader:
    """Iterates batches ``{"views": [V × B×C×S×S], "label": B, "skipped": int}`` on ``device``
    (plus ``"masks": [V × (B×N bool | None)]`` when a ``masker`` is set).

    ``wait`` accumulates seconds spent fetching raw batches (the data wait), ``augment_time``
    seconds spent in batched augmentation on the device.
    """

    def __init__(self, dataset, recipe: ViewRecipe, global_batch: int, device: torch.device, rank: int = 0,
                 world: int = 1, seed: int = 0, workers: int = -1, device_augment: str = "auto"):
        if global_batch % world:
            raise ValueError(f"data.batch_size={global_batch} must be divisible by the {world} processes")
        if len(dataset) < global_batch:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than one batch of {global_batch}: "
                             f"lower data.batch_size")
        self.dataset, self.recipe, self.device = dataset, recipe, device
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.steps_per_epoch = len(dataset) // global_batch
        self.batched = isinstance(dataset, ArrayDataset) and device_augment != "off"
        if device_augment == "on" and not self.batched:
            raise ValueError("data.device_augment=on needs an in-memory data set (built-in sets); folders "
                             "are augmented per sample in workers")
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.views = BatchedViews(recipe, self.generator)
        if not self.batched:
            per_sample = build_per_sample_views(recipe, channels=getattr(dataset, "channels", 3))
            if isinstance(dataset, ArrayDataset):
                self.dataset = _PerSample(dataset, per_sample)
            else:
                dataset.transform = per_sample
        self.workers = (0 if self.batched else 2) if workers < 0 else workers
        self.wait = 0.0
        self.augment_time = 0.0
        self.masker = None            # MIM: callable (views, seed) -> per-view masks, set by the trainer

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        sampler = _BatchSampler(len(self.dataset), self.global_batch, self.rank, self.world, epoch, self.seed, start)
        if self.batched:
            source = (self.dataset.__getitems__(idx) for idx in sampler)
        else:
            source = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                     collate_fn=_stack_views, pin_memory=self.device.type == "cuda",
                                     persistent_workers=False))
        step = start
        while True:
            t0 = time.perf_counter()
            try:
                raw = next(source)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.wait += t1 - t0
            if self.batched:
                images = raw["image"].to(self.device, non_blocking=True)
                batch = {"views": self.views(images), "label": raw["label"].to(self.device),
                         "skipped": raw["skipped"]}
                self.augment_time += time.perf_counter() - t1
            else:
                batch = {"views": [v.to(self.device, non_blocking=True) for v in raw["views"]],
                         "label": raw["label"].to(self.device), "skipped": raw["skipped"]}
            if self.masker is not None:           # collate-time masks, reproducible from (seed, epoch, step, rank)
                t2 = time.perf_counter()
                batch["masks"] = self.masker(batch["views"], batch_seed(self.seed, epoch, step, self.rank))
                self.augment_time += time.perf_counter() - t2
            maybe_crash(epoch * self.steps_per_epoch + step, self.rank)     # test hook (SELFSIGHT_TEST_CRASH)
            step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
