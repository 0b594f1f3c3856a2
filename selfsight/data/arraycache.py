"""Pre-decoded uint8 cache of an image folder (``data.cache``): decode every image once, then
train from one memory-mapped array with nothing left to decode.

Every readable image is resized (shorter side to S, centre crop to S×S) into
``<cache dir>/arrays/<key>.u8`` (raw N×C×S×S uint8, C-order) and ``<key>.npz`` (labels, classes,
skipped count, shape). The key hashes the folder index (root, paths, labels, classes) with S and
C, so a folder that indexes differently gets a new cache. Both files are written to temporary
names and moved into place with ``os.replace``, the ``.npz`` last: a cache is trusted only when
its ``.npz`` exists and the ``.u8`` has exactly the size it names, so a killed build leaves
nothing a later run would read. Later runs open the array with ``np.memmap`` (not read into
memory) as an ``ArrayDataset``, which the loader augments as a batch on the training device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from selfsight.data.arrays import ArrayDataset
from selfsight.data.folder import ImageFolder, default_cache_dir
from selfsight.data.images import BrokenImageError
from selfsight.progress import Progress

log = logging.getLogger("selfsight.data")

__all__ = ["cached_folder", "cache_key", "open_cache", "build_cache", "native_size", "maybe_cache"]


def cache_key(folder: ImageFolder, size: int, channels: int) -> str:
    h = hashlib.sha1()
    h.update(folder.root.encode("utf-8", "surrogateescape") + b"\0")
    h.update(folder._blob)
    h.update(np.ascontiguousarray(folder._labels, dtype="<i4").tobytes())
    h.update(json.dumps([folder.classes, size, channels]).encode())
    return h.hexdigest()[:24]


def _paths(cache_dir: str, key: str) -> tuple[str, str]:
    base = os.path.join(cache_dir, "arrays", key)
    return base + ".u8", base + ".npz"


def square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, centre crop to size×size (one PIL bilinear resize of the centre square)."""
    w, h = image.size
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))


def native_size(folder: ImageFolder, limit: int, probe: int = 64) -> int:
    """The largest shorter side among up to ``probe`` images spread over the folder (headers only),
    capped at ``limit``: small images (28-96 px) are cached at their own size, not upsampled."""
    best = 0
    for i in np.linspace(0, len(folder) - 1, min(probe, len(folder))).astype(int).tolist():
        try:
            with Image.open(os.path.join(folder.root, folder._path(i))) as im:
                best = max(best, min(im.size))
        except Exception:          # a broken file: found again (and counted) when the cache is built
            continue
        if best >= limit:
            return limit
    return best or limit


class _Squares(Dataset):
    def __init__(self, folder: ImageFolder, size: int, channels: int):
        self.folder, self.size, self.mode = folder, size, "L" if channels == 1 else "RGB"
        self.shape = (channels, size, size)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            image = self.folder.read(i)
        except (BrokenImageError, OSError):
            return torch.zeros(self.shape, dtype=torch.uint8), False
        image = square(image.convert(self.mode), self.size)
        x = torch.from_numpy(np.asarray(image).copy())
        return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).contiguous(), True


def open_cache(folder: ImageFolder, size: int, channels: int, cache_dir: str | None = None) -> ArrayDataset | None:
    """The finished cache of ``folder`` at ``size``/``channels``, or None (missing, partial, corrupt)."""
    u8, meta = _paths(cache_dir or default_cache_dir(), cache_key(folder, size, channels))
    try:
        with np.load(meta, allow_pickle=False) as z:
            n, c, s = (int(v) for v in z["shape"])
            labels = torch.from_numpy(z["labels"].astype(np.int64))
            classes = [str(v) for v in z["classes"]]
            skipped = int(z["skipped"])
        if (c, s) != (channels, size) or os.path.getsize(u8) != n * c * s * s or len(labels) != n:
            raise ValueError("size mismatch")
    except (OSError, ValueError, KeyError) as e:
        if os.path.exists(meta):
            log.warning("ignoring an invalid array cache %s (%s)", meta, e)
        return None
    # copy-on-write map: pages are read from disk on demand, nothing is written back
    images = torch.from_numpy(np.memmap(u8, dtype=np.uint8, mode="c", shape=(n, c, s, s)))
    ds = ArrayDataset(images, labels, name=folder.root, classes=classes)
    ds.skipped, ds.cache_file = skipped, u8
    return ds


def build_cache(folder: ImageFolder, size: int, channels: int = 3, cache_dir: str | None = None,
                workers: int = 2, progress: bool = True) -> ArrayDataset:
    """Decode every readable image of ``folder`` once into the cache (DataLoader workers), then open it."""
    cache_dir = cache_dir or default_cache_dir()
    u8, meta = _paths(cache_dir, cache_key(folder, size, channels))
    os.makedirs(os.path.dirname(u8), exist_ok=True)
    n, per = len(folder), channels * size * size
    t0 = time.perf_counter()
    tmp_u8 = tmp_meta = None
    try:
        fd, tmp_u8 = tempfile.mkstemp(dir=os.path.dirname(u8), prefix=".tmp-", suffix=".u8")
        os.close(fd)
        out = np.memmap(tmp_u8, dtype=np.uint8, mode="w+", shape=(n, channels, size, size))
        keep = np.zeros(n, dtype=bool)
        loader = DataLoader(_Squares(folder, size, channels), batch_size=64, num_workers=workers)
        pos = done = 0
        with Progress(n, "caching images", enabled=progress) as bar:
            for images, ok in loader:
                good = images[ok].numpy()
                out[pos:pos + len(good)] = good                     # readable images, packed in index order
                keep[done:done + len(ok)] = ok.numpy()
                pos, done = pos + len(good), done + len(ok)
                bar.update(len(ok))
        out.flush()
        del out
        os.truncate(tmp_u8, pos * per)
        with open(tmp_u8, "rb+") as f:
            os.fsync(f.fileno())
        if pos == 0:
            raise ValueError(f"no readable image in {folder.root} ({n} files failed to decode)")
        os.replace(tmp_u8, u8)
        tmp_u8 = None
        fd, tmp_meta = tempfile.mkstemp(dir=os.path.dirname(u8), prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, shape=np.array([pos, channels, size]), labels=np.asarray(folder._labels)[keep],
                     classes=np.array(folder.classes, dtype=str), skipped=np.array(n - pos), root=folder.root)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, meta)                                # the commit: the cache exists from here
        tmp_meta = None
    finally:
        for tmp in (tmp_u8, tmp_meta):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    log.info("cached %d images of %s (%d unreadable skipped) at %d px: %.1f MiB in %s, %.1f s", pos, folder.root,
             n - pos, size, pos * per / 2**20, u8, time.perf_counter() - t0)
    ds = open_cache(folder, size, channels, cache_dir)
    assert ds is not None, "the cache just written does not open"
    return ds


def cached_folder(folder: ImageFolder, size: int, channels: int = 3, cache_dir: str | None = None,
                  workers: int = 2, progress: bool = True) -> ArrayDataset:
    """``folder`` as a memory-mapped ``ArrayDataset`` of size×size images, built on first use."""
    ds = open_cache(folder, size, channels, cache_dir)
    if ds is None:
        ds = build_cache(folder, size, channels, cache_dir, workers, progress)
    else:
        log.info("using the array cache %s (%d images, %d px)", ds.cache_file, len(ds), size)
    if ds.skipped:
        log.warning("the array cache of %s leaves out %d files that did not decode when it was built "
                    "(counted in the first metrics row's skipped_files)", folder.root, ds.skipped)
    return ds


def maybe_cache(dataset, data_cfg, recipe, channels: int, progress: bool = True):
    """``data.cache``: the trainer's folder replaced by its array cache (rank 0 builds it, the
    other processes wait and open it); other data sources are returned unchanged."""
    if not isinstance(dataset, ImageFolder) or data_cfg.cache is False:
        return dataset
    size = data_cfg.cache_size or native_size(dataset, recipe.size)
    if data_cfg.cache == "auto" and open_cache(dataset, size, channels) is None:
        need = len(dataset) * channels * size * size
        cache_dir = default_cache_dir()
        os.makedirs(cache_dir, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if need > free / 2:
            log.info("data.cache=auto: not caching %s (%.1f GiB needed, %.1f GiB free)", dataset.root,
                     need / 2**30, free / 2**30)
            return dataset
    distributed = dist.is_available() and dist.is_initialized()
    workers = data_cfg.workers if data_cfg.workers >= 0 else 2
    if distributed and dist.get_rank() != 0:
        dist.barrier()                              # rank 0 builds the cache first
        return cached_folder(dataset, size, channels, workers=workers, progress=False)
    ds = cached_folder(dataset, size, channels, workers=workers, progress=progress)
    if distributed:
        dist.barrier()
    return ds
