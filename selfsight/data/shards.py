"""WebDataset-style tar shards as a streaming data source (no extraction, no new dependency).

A sample is the run of tar members sharing a key (the member path up to the first dot of its
file name): one image (``.jpg .jpeg .png .webp .bmp``) and an optional ``.cls`` (an integer label
as text), as ``webdataset`` writes them. Shards are read with ``tarfile`` in streaming mode.

Per epoch the shard list is permuted with (seed, epoch) and dealt out to the (rank, worker)
slots, each slot shuffles its stream through a buffer seeded with (seed, epoch, slot), and each
sample's crops are seeded with (seed, epoch, slot, position), so a run is reproducible (for a
given number of processes and workers) and resumes exactly mid-epoch by re-reading the batches
before the resume point. Broken members (undecodable images, a sample without an image, a
truncated shard) are skipped and counted in ``skipped``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import tempfile
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from selfsight.data.crops import sample_seed
from selfsight.data.folder import ImageFolder, default_cache_dir
from selfsight.data.images import BrokenImageError, decode_image

log = logging.getLogger("selfsight.data")

SHARD_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SHARDS_JSON = "shards.json"          # {"__len__": N, "shards": {file name: samples}, "classes": [...]}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")

__all__ = ["ShardDataset", "expand_shards", "is_shard_spec", "split_key", "write_shards", "SHARDS_JSON"]


def is_shard_spec(spec: str) -> bool:
    """A brace pattern or glob naming ``.tar`` files, one ``.tar`` file, or a folder holding ``.tar`` files."""
    path = os.path.expanduser(spec)
    if path.endswith(".tar") and (_BRACE.search(path) or glob.has_magic(path) or os.path.isfile(path)):
        return True
    if not os.path.isdir(path):
        return False
    # a folder of shards holds .tar files and nothing an image folder would (class folders, images):
    # an image folder with a downloaded archive beside its images stays an image folder
    names = os.listdir(path)
    others = [n for n in names if os.path.isdir(os.path.join(path, n)) or n.lower().endswith(IMAGE_SUFFIXES)]
    return any(n.endswith(".tar") for n in names) and not others


def expand_shards(spec: str) -> list[str]:
    """The shard files of ``path/shard-{000000..000099}.tar``, a glob, a ``.tar`` file or a folder."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar"))
    elif _BRACE.search(path):
        found = _braces(path)
        missing = [p for p in found if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(found)} shards of {spec!r} are missing, "
                                    f"e.g. {missing[0]}")
    else:
        found = sorted(glob.glob(path))
    if not found:
        raise FileNotFoundError(f"no .tar shards match {spec!r}")
    return [os.path.abspath(p) for p in found]


def _braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    a, b = m.groups()
    width = len(a) if a.startswith("0") else 0
    return [p for i in range(int(a), int(b) + 1)
            for p in _braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def split_key(name: str) -> tuple[str, str]:
    """``"dir/n01.seg.png"`` -> (``"dir/n01"``, ``"seg.png"``): the webdataset key and extension."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def _samples(path: str) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {ext: bytes}) per sample of one shard, streaming; (path, None) when the shard breaks."""
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = split_key(m.name)
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is broken after %s (%s: %s); its remaining samples are skipped", path, key,
                    type(e).__name__, e)
        yield path, None
        return
    if key is not None:
        yield key, parts


def _image_of(parts: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext in SHARD_EXTENSIONS:
        if ext in parts:
            return ext, parts[ext]
    return None


def count_samples(path: str) -> int:
    """Samples with an image member in one shard (headers only: tarfile seeks over the data)."""
    keys = set()
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            k, ext = split_key(m.name)
            if m.isfile() and ext in SHARD_EXTENSIONS:
                keys.add(k)
    return len(keys)


def _counts(shards: list[str], cache_dir: str) -> tuple[list[int], list[str]]:
    """Samples per shard, and class names: from a ``shards.json`` beside the shards, else counted
    once and cached in ``<cache dir>/shards/`` (keyed by the shards' paths, sizes and times)."""
    folder = os.path.dirname(shards[0])
    try:
        with open(os.path.join(folder, SHARDS_JSON)) as f:
            meta = json.load(f)
        per = meta.get("shards", {})
        if all(os.path.dirname(s) == folder and os.path.basename(s) in per for s in shards):
            return [int(per[os.path.basename(s)]) for s in shards], list(meta.get("classes", []))
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha1()
    for s in shards:
        st = os.stat(s)
        h.update(f"{s}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    cached = os.path.join(cache_dir, "shards", h.hexdigest() + ".json")
    try:
        with open(cached) as f:
            return [int(v) for v in json.load(f)["counts"]], []
    except (OSError, ValueError, KeyError, TypeError):
        pass
    counts = []
    for s in shards:
        try:
            counts.append(count_samples(s))
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("cannot count the samples of shard %s (%s); counted as 0", s, e)
            counts.append(0)
    _write_json(cached, {"counts": counts, "shards": shards})
    return counts, []


def _write_json(path: str, obj) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write %s (%s)", path, e)


class ShardDataset(IterableDataset):
    """Tar shards as a stream of batches ``{"image": [V × b×C×S×S], "label": b, "skipped": int}``.

    ``configure`` (called by ``ViewLoader``) sets the run seed, rank/world, the per-process batch
    and ``transform(image, seed) -> list of views``; ``set_epoch`` the epoch and the pass (a rank
    that runs out of samples before the epoch's last step reads its shards again, pass 1, 2, ...).
    Each (rank, worker) slot yields full batches and then its remainder; ``ViewLoader`` regroups.
    """

    def __init__(self, spec: str, cache_dir: str | None = None, shuffle_buffer: int = 1000):
        self.spec = spec
        self.shards = expand_shards(spec)
        self.counts, self.classes = _counts(self.shards, cache_dir or default_cache_dir())
        self.labeled = bool(self.classes)
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.world, self.batch = 0, 0, 1, 1
        self.epoch = self.pass_ = 0
        self.transform = None
        log.info("shards %s: %d files, %d samples", spec, len(self.shards), len(self))

    def __len__(self) -> int:
        return sum(self.counts)

    def image_sizes(self, n: int = 64) -> list[tuple[int, int]]:
        """(width, height) of the first ``n`` images of the first shards, from their headers only."""
        sizes = []
        for path in self.shards:
            for _, parts in _samples(path):
                image = None if parts is None else _image_of(parts)
                try:
                    with Image.open(io.BytesIO(image[1])) as im:
                        sizes.append(tuple(im.size))
                except (TypeError, OSError, ValueError, Image.DecompressionBombError):
                    continue
                if len(sizes) >= n:
                    return sizes
        return sizes

    def configure(self, seed: int, rank: int, world: int, batch: int, transform) -> None:
        self.seed, self.rank, self.world, self.batch, self.transform = seed, rank, world, batch, transform

    def set_epoch(self, epoch: int, pass_: int = 0) -> None:
        self.epoch, self.pass_ = epoch, pass_

    def slot_shards(self, slot: int, slots: int) -> list[str]:
        """The shards of one (rank, worker) slot this epoch: a seeded permutation, dealt round-robin."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, self.pass_))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [self.shards[i] for i in order[slot::slots]]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots, slot = self.world * workers, self.rank * workers + wid
        stream = ((self.pass_ * slots + slot) << 32)          # crop seeds: (seed, epoch, pass, slot, position)
        rng = random.Random(sample_seed(self.seed, self.epoch, stream))
        items, skipped, position = [], 0, 0
        for key, parts in self._shuffled(self.slot_shards(slot, slots), rng):
            image = None if parts is None else _image_of(parts)
            if image is None:
                skipped += 1
                continue
            try:
                decoded = decode_image(image[1], f"{key}.{image[0]}")
            except BrokenImageError as e:
                log.warning("skipping a broken shard member: %s", e)
                skipped += 1
                continue
            try:
                label = int(parts.get("cls", b"-1").decode().strip())
            except ValueError:
                label = -1
            items.append((self.transform(decoded, sample_seed(self.seed, self.epoch, stream + position)), label))
            position += 1
            if len(items) == self.batch:
                yield _collate(items, skipped)
                items, skipped = [], 0
        if items or skipped:
            yield _collate(items, skipped)

    def _shuffled(self, shards: list[str], rng: random.Random):
        """A shuffle buffer over the raw (undecoded) samples of ``shards``, read in order."""
        if self.shuffle_buffer <= 0:            # shard order: shards permuted, samples in file order
            for path in shards:
                yield from _samples(path)
            return
        buf = []
        for path in shards:
            for sample in _samples(path):
                if len(buf) < self.shuffle_buffer:
                    buf.append(sample)
                    continue
                j = rng.randrange(len(buf))
                buf[j], sample = sample, buf[j]
                yield sample
        rng.shuffle(buf)
        yield from buf


def _collate(items: list, skipped: int) -> dict:
    if not items:
        return {"image": None, "label": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    views = [torch.stack(v) for v in zip(*(views for views, _ in items))]
    return {"image": views, "label": torch.tensor([y for _, y in items]), "skipped": skipped}


def write_shards(dataset, out: str, shard_size: int) -> dict:
    """Write ``dataset`` (an ``ImageFolder`` or an ``ArrayDataset``) as ``OUT/shard-000000.tar``, ...
    plus ``OUT/shards.json``; folder files are copied byte for byte, arrays written as PNG."""


    os.makedirs(out, exist_ok=True)
    n = len(dataset)
    shards, names = {}, []
    for first in range(0, n, shard_size):
        name = f"shard-{first // shard_size:06d}.tar"
        tmp = os.path.join(out, f".tmp-{name}")
        with tarfile.open(tmp, "w") as tf:
            for i in range(first, min(n, first + shard_size)):
                if isinstance(dataset, ImageFolder):
                    rel, label = dataset.samples[i]
                    ext = os.path.splitext(rel)[1].lower().lstrip(".")
                    if ext in SHARD_EXTENSIONS:
                        with open(os.path.join(dataset.root, rel), "rb") as f:
                            data = f.read()
                    else:                                     # tif, gif: re-encoded as PNG
                        buf = io.BytesIO()
                        try:
                            dataset.read(i).save(buf, format="PNG")
                        except (BrokenImageError, OSError) as e:
                            log.warning("not written to the shards: %s", e)
                            continue
                        data, ext = buf.getvalue(), "png"
                else:
                    item = dataset[i]
                    arr = item["image"].numpy()
                    label = item["label"]
                    buf = io.BytesIO()
                    Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))) \
                        .save(buf, format="PNG")
                    data, ext = buf.getvalue(), "png"
                _add(tf, f"{i:09d}.{ext}", data)
                if label >= 0:
                    _add(tf, f"{i:09d}.cls", str(label).encode())
        os.replace(tmp, os.path.join(out, name))
        shards[name] = count_samples(os.path.join(out, name))
        names.append(name)
    meta = {"__len__": sum(shards.values()), "shards": shards, "classes": list(getattr(dataset, "classes", []) or [])}
    _write_json(os.path.join(out, SHARDS_JSON), meta)
    return {"out": os.path.abspath(out), "shards": len(names), "images": meta["__len__"]}


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))
