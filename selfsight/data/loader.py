"""From a data source to batches of views, identical in one process and under DDP.

Epoch ``e`` visits a permutation drawn from ``seed + e``; global step ``i`` takes the slice
``[i·G, (i+1)·G)`` (G = global batch) and rank ``r`` its ``r``-th chunk, so 2 processes see
exactly the global batch of 1 process, and a resumed run can start mid-epoch exactly. How the
views are made depends on the source (``data.paths``: batched on the device, workers plus
device, or per sample); ``ViewLoader`` adds what every path shares: the clocks of the data wait
and the augmentation, the masks of masked image modeling and the random state.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from selfsight.augment import BatchedViews, ViewRecipe
from selfsight.data.paths import choose_path
from selfsight.faults import maybe_crash
from selfsight.masking.views import batch_seed
from selfsight.nn.device import to_device


class ViewLoader:
    """Iterates batches ``{"views": [V × B×C×S×S], "label": B, "skipped": int}`` on ``device``
    (plus ``"masks": [V × (B×N bool | None)]`` when a ``masker`` is set).

    ``wait`` accumulates seconds spent fetching raw batches (the data wait), ``augment_time``
    seconds spent in batched augmentation on the device.
    """

    def __init__(self, dataset, recipe: ViewRecipe, global_batch: int, device: torch.device, rank: int = 0,
                 world: int = 1, seed: int = 0, workers: int = -1, device_augment: str = "auto",
                 decode: str = "workers", prefetch: int = 2):
        if global_batch % world:
            raise ValueError(f"data.batch_size={global_batch} must be divisible by the {world} processes")
        if len(dataset) < global_batch:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than one batch of {global_batch}: "
                             f"lower data.batch_size")
        self.recipe, self.device, self.seed, self.rank = recipe, device, seed, rank
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        views = BatchedViews(recipe, self.generator)
        self.path = choose_path(dataset, recipe, views, device, device_augment, decode, prefetch, workers,
                                global_batch=global_batch, rank=rank, world=world, seed=seed)
        self.mode, self.steps_per_epoch, self.workers = self.path.mode, self.path.steps_per_epoch, self.path.workers
        self.wait = 0.0
        self.augment_time = 0.0
        self.masker = None            # MIM: callable (views, seed) -> per-view masks, set by the trainer

    def raw_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's batches of one epoch as the source gives them, before anything runs on the
        device: uint8 crops on the hybrid path, images on the batched one, finished views otherwise
        (``epoch`` finishes them; ``benchmarks/loader_throughput.py`` times this part alone)."""
        return self.path.raw_batches(epoch, start)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        source = self.raw_batches(epoch, start)
        step = start
        while True:
            t0 = time.perf_counter()
            try:
                raw = next(source)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.wait += t1 - t0
            label = to_device(raw["label"], self.device)
            views, bad = self.path.finish(raw)
            if self.mode != "per_sample":
                self.augment_time += time.perf_counter() - t1
            batch = {"views": views, "label": label, "skipped": raw["skipped"] + bad}
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
