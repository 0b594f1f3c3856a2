"""WebDataset tar shards as a streaming data source (no extraction, no new dependency).

Shards written by ``selfsight shards make`` or by the ``webdataset`` package itself
(``ShardWriter``/``TarWriter``) are read with webdataset's own conventions (its
``tariterators.base_plus_ext`` and ``group_by_keys``): a member's key is its path up to the first
dot of its file name (dots in folder names are kept), the rest, lower-cased, is its extension
(``seg.png``); a sample is a run of consecutive members sharing a key; names without a dot or
starting with one, and ``__meta__`` entries, are ignored. A sample's image is its first member of
``IMAGE_EXTENSIONS`` (else a compound one ending in one, ``input.jpg``), its label the integer or
class name in ``.cls`` (``.cls2``, ``.class``, ``.label``). Shards are read with ``tarfile`` in
streaming mode.

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
from selfsight.data.lists import class_ids

log = logging.getLogger("selfsight.data")

SHARD_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")     # written byte for byte by ``write_shards``
# read as images, in this order of preference (webdataset writes "img" and "image" as JPEG)
IMAGE_EXTENSIONS = SHARD_EXTENSIONS + ("ppm", "pgm", "pbm", "tif", "tiff", "gif", "img", "image")
LABEL_EXTENSIONS = ("cls", "cls2", "class", "label")     # an integer (webdataset writes ints as decimal text) or a name
_META = re.compile(r"__[^/]*__($|/)")                   # webdataset's skip_meta: __key__-style entries
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SHARDS_JSON = "shards.json"          # {"__len__": N, "shards": {file name: samples}, "classes": [...]}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")

__all__ = ["ShardDataset", "expand_shards", "is_shard_spec", "scan_shard", "split_key", "write_shards", "SHARDS_JSON"]


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


def split_key(name: str) -> tuple[str | None, str]:
    """``"dir.v2/n01.seg.PNG"`` -> (``"dir.v2/n01"``, ``"seg.png"``): the webdataset key and extension
    (``base_plus_ext``, the extension lower-cased); (None, "") for a member webdataset ignores: no dot
    in its file name, a name starting with a dot (``._n01.jpg``), or a ``__meta__`` entry."""
    if _META.match(name):
        return None, ""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _members(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the regular files of a tar that form samples (``split_key``)."""
    for m in tf:
        if m.isfile():
            key, ext = split_key(m.name)
            if key is not None:
                yield key, ext, m


def _samples(path: str) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {ext: bytes}) per sample of one shard (a run of consecutive members sharing a key; of
    two members with the same extension the first is kept), streaming; (path, None) when the shard
    breaks."""
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for k, ext, m in _members(tf):
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                key = k
                data = tf.extractfile(m).read()
                parts.setdefault(ext, data)
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is broken after %s (%s: %s); its remaining samples are skipped", path, key,
                    type(e).__name__, e)
        yield path, None
        return
    if key is not None:
        yield key, parts


def _image_ext(exts) -> str | None:
    """The extension of a sample's image: the first of ``IMAGE_EXTENSIONS`` it has, else the first
    compound one ending in one of them (``input.jpg``), else None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in exts:
            return ext
    return next((e for e in exts if e.rpartition(".")[2] in IMAGE_EXTENSIONS), None)


def _image_of(parts: dict[str, bytes]) -> tuple[str, bytes] | None:
    ext = _image_ext(parts)
    return None if ext is None else (ext, parts[ext])


def _label_text(parts: dict[str, bytes]) -> str | None:
    ext = next((e for e in LABEL_EXTENSIONS if e in parts), None)
    if ext is None:
        return None
    try:
        return parts[ext].decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def scan_shard(path: str) -> tuple[int, set[str]]:
    """(samples with an image member, the label texts of the samples) of one shard, grouped as
    ``_samples`` groups them; headers and label members only (tarfile seeks over the images)."""
    count, labels, key, exts = 0, set(), None, {}

    def close() -> None:
        nonlocal count
        if key is not None and _image_ext(exts) is not None:
            count += 1
            text = _label_text(exts)
            if text is not None:
                labels.add(text)

    with tarfile.open(path, mode="r:") as tf:
        for k, ext, m in _members(tf):
            if k != key:
                close()
                key, exts = k, {}
            if ext not in exts:                 # {extension: the label member's bytes, b"" for the others}
                exts[ext] = tf.extractfile(m).read() if ext in LABEL_EXTENSIONS and m.size < 4096 else b""
    close()
    return count, labels


def count_samples(path: str) -> int:
    """Samples with an image member in one shard (``scan_shard``)."""
    return scan_shard(path)[0]


def _classes_of(labels: set[str]) -> list[str]:
    """Class names from the label texts of shards without a ``shards.json`` (names sorted as a list
    file's are, ``lists.class_ids``)."""
    return class_ids(sorted(labels))[1]


def _counts(shards: list[str], cache_dir: str) -> tuple[list[int], list[str], bool]:
    """Samples per shard, class names, and whether the label texts are class names: from a
    ``shards.json`` beside the shards (its labels are ids into its classes), else counted once (with
    the label texts, which name the classes) and cached in ``<cache dir>/shards/`` (keyed by the
    shards' paths, sizes and times)."""
    folder = os.path.dirname(shards[0])
    try:
        with open(os.path.join(folder, SHARDS_JSON)) as f:
            meta = json.load(f)
        per = meta.get("shards", {})
        if all(os.path.dirname(s) == folder and os.path.basename(s) in per for s in shards):
            return [int(per[os.path.basename(s)]) for s in shards], list(meta.get("classes", [])), False
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha1()
    for s in shards:
        st = os.stat(s)
        h.update(f"{s}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    cached = os.path.join(cache_dir, "shards", h.hexdigest() + ".json")
    try:
        with open(cached) as f:
            meta = json.load(f)
        return [int(v) for v in meta["counts"]], [str(c) for c in meta["classes"]], True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    counts, labels = [], set()
    for s in shards:
        try:
            n, seen = scan_shard(s)
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("cannot count the samples of shard %s (%s); counted as 0", s, e)
            n, seen = 0, set()
        counts.append(n)
        labels |= seen
    classes = _classes_of(labels)
    _write_json(cached, {"counts": counts, "classes": classes, "shards": shards})
    return counts, classes, True


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
        self.counts, self.classes, by_name = _counts(self.shards, cache_dir or default_cache_dir())
        self.labeled = bool(self.classes)
        # label texts name the classes (webdataset's shards), or are ids into them (shards.json)
        self._class_ids = {c: i for i, c in enumerate(self.classes)} if by_name else {}
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
            label = _label_id(_label_text(parts), self._class_ids)
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


def _label_id(text: str | None, names: dict[str, int]) -> int:
    """A label text -> a class id: with ``names`` (class name -> id) the text's class (integers
    compared as numbers: ``03`` is ``3``), else the text as an integer id; -1 when there is none."""
    if text is None:
        return -1
    numeric = re.fullmatch(r"[+-]?\d+", text) is not None
    if names:
        return names.get(str(int(text)) if numeric else text, -1)
    return int(text) if numeric else -1


def _collate(items: list, skipped: int) -> dict:
    if not items:
        return {"image": None, "label": torch.zeros(0, dtype=torch.long), "skipped": skipped}
    views = [torch.stack(v) for v in zip(*(views for views, _ in items))]
    return {"image": views, "label": torch.tensor([y for _, y in items]), "skipped": skipped}


def _as_png(dataset, i: int) -> bytes | None:
    """Image ``i`` of a source that decodes (``dataset.read``) as PNG bytes; None (with a warning)
    for one that does not decode."""
    buf = io.BytesIO()
    try:
        dataset.read(i).save(buf, format="PNG")
    except (BrokenImageError, OSError) as e:
        log.warning("not written to the shards: %s", e)
        return None
    return buf.getvalue()


def write_shards(dataset, out: str, shard_size: int) -> dict:
    """Write ``dataset`` (an ``ImageFolder`` or a list of files, an ``ArrayDataset``, or a source with
    ``read(i)`` such as ``hf:`` data) as ``OUT/shard-000000.tar``, ... plus ``OUT/shards.json``; files
    are copied byte for byte, other images written as PNG."""
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
                        data, ext = _as_png(dataset, i), "png"
                        if data is None:
                            continue
                elif hasattr(dataset, "read"):               # a source of decoded images (hf:): PNG
                    data, ext, label = _as_png(dataset, i), "png", int(dataset.labels[i])
                    if data is None:
                        continue
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
