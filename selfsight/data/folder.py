"""ImageFolder: a cached, fault-tolerant index of a folder tree of images."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from selfsight.data.images import IMAGE_EXTENSIONS, BrokenImageError, load_image, load_image_or_jpeg
from selfsight.progress import Progress

__all__ = ["ImageFolder", "default_cache_dir"]

log = logging.getLogger("selfsight.data")

SKIP_REASONS = (
    "zero_byte",  # image extension but 0 bytes
    "non_image",  # other extension
    "hidden",  # names starting with "." (files, and directories not descended into)
    "outside_root",  # symlinked file whose target is outside root (follow_symlinks=False)
    "symlinked_dir",  # symlinked directory not followed (follow_symlinks=False)
    "broken_link",  # dangling or looping symlink
    "loop",  # directory already visited (symlink or bind-mount loop, follow_symlinks=True)
    "unreadable_dir",  # directory that could not be listed
    "special",  # sockets, fifos, devices
)
MAX_TRIES = 50  # load attempts per __getitem__ before giving up
MAX_WARNINGS = 5  # load failures logged per process
RACY_NS = 2_000_000_000  # a folder modified this close to a scan is rescanned next time
_MAGIC = b"SELFSIGHT-INDEX 1\n"
_warned = {"pid": -1, "n": 0}


def default_cache_dir() -> str:
    """``$SELFSIGHT_CACHE`` or ``~/.cache/selfsight``."""
    return os.environ.get("SELFSIGHT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "selfsight"
    )


class ImageFolder(Dataset):
    """All images below ``root`` (recursive), optionally labeled by first-level subfolder.

    Items are ``{"image": RGB PIL image or transform(image), "label": int, "skipped": int}``;
    unreadable files are skipped (the next index is used) and counted in ``skipped``.
    See docs/data.md for layout, caching and symlink rules.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        labeled: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        refresh: bool = False,
        follow_symlinks: bool = False,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._real_root = os.path.realpath(self.root)
        self.transform = transform
        self.follow_symlinks = follow_symlinks
        self.undecoded_jpegs = False    # data.decode=device: colour JPEGs come back as EncodedJPEG
        self.channels = 3               # images are decoded as RGB (1: as PIL's luma "L"), see ``prepared``
        if not os.path.exists(self.root):
            raise ValueError(f"image folder {self.root} does not exist")
        if not os.path.isdir(self.root):
            raise ValueError(f"image folder {self.root} is not a directory")

        cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
        self.cache_path = _cache_path(cache_dir, self.root, follow_symlinks)
        index = None if refresh else _read_cache(self.cache_path, self.root, follow_symlinks)
        self.from_cache = index is not None
        if index is None:
            index = _scan(self.root, follow_symlinks)
            if not index.n:
                raise ValueError(_no_images_message(self.root, index.info))
            _write_cache(self.cache_path, index)
        info = index.info
        self._blob = index.blob
        self._offsets = index.offsets
        self.skip_counts: dict[str, int] = {k: info["counts"].get(k, 0) for k in SKIP_REASONS}
        self.first_skipped: list[str] = list(info["first_skipped"])
        self._other_extensions: dict[str, int] = dict(info.get("other_extensions", {}))

        groups = index.groups
        names = info["groups"]
        n_root = int(np.count_nonzero(groups < 0))
        used = sorted({names[g] for g in np.unique(groups[groups >= 0]).tolist()})
        if labeled is None:
            labeled = n_root == 0 and len(used) >= 2
        elif labeled and n_root:
            example = self._path(int(np.flatnonzero(groups < 0)[0]))
            raise ValueError(
                f"labeled=True but {n_root} images lie directly in {self.root} (e.g. {example}); "
                "put every image inside a class subfolder root/<class>/..."
            )
        self.labeled = bool(labeled)
        if self.labeled:
            self.classes: list[str] = used
            lookup = {c: i for i, c in enumerate(used)}
            table = np.array([lookup.get(nm, -1) for nm in names] or [-1], dtype=np.int32)
            self._labels = table[groups]
        else:
            self.classes = []
            self._labels = np.full(index.n, -1, dtype=np.int32)
        self.samples = Samples(self._blob, self._offsets, self._labels)
        self._bad: set[int] = set()
        self._log_summary()

    # ------------------------------------------------------------------ dataset API
    @property
    def labels(self) -> np.ndarray:
        """The label of every image (an index into ``classes``; -1 when unlabeled), read-only."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        def warning(i: int, e: Exception) -> str:
            why = e.reason if isinstance(e, BrokenImageError) else f"{type(e).__name__}: {e}"
            return f"skipping unreadable image {os.path.join(self.root, self._path(i))}: {why}"
        return read_or_next(self, index, warning, ("index", "images", "files"))

    def image_sizes(self, n: int = 64) -> list[tuple[int, int]]:
        """(width, height) of up to ``n`` images spread over the index, from their headers only (no
        decode; unreadable files are left out)."""
        picks = sorted({int(i) for i in np.linspace(0, len(self) - 1, min(n, len(self)))})
        sizes = []
        for i in picks:
            try:
                with Image.open(os.path.join(self.root, self._path(i))) as im:
                    sizes.append(tuple(im.size))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
        return sizes

    def first_readable(self) -> int:
        """The index of the first image that decodes (usually 0, one decode); a ValueError naming the
        folder when none does, instead of a failure inside a DataLoader worker later."""
        first_error = ""
        for i in range(len(self)):
            if i in self._bad:
                continue
            try:
                self.read(i)
                return i
            except (BrokenImageError, OSError) as e:
                self._bad.add(i)
                first_error = first_error or f"{self._path(i)}: {e.reason if isinstance(e, BrokenImageError) else e}"
        raise ValueError(f"no readable image in {self.root}: all {len(self)} image files failed to decode "
                         f"(e.g. {first_error})")

    def prepared(self, transform=None, undecoded_jpegs: bool = False, channels: int | None = None) -> "ImageFolder":
        """This folder as a loader wants it, leaving this object as it is: each decoded image goes
        through ``transform``; colour JPEGs stay undecoded (``data.decode=device``); images are
        decoded with ``channels`` channels (1: luma, for a run trained on gray images)."""
        out = copy.copy(self)
        out.transform, out.undecoded_jpegs = transform, undecoded_jpegs
        out.channels = channels or self.channels
        return out

    def read(self, i: int):
        """Decode image ``i`` (RGB PIL image); raises BrokenImageError or OSError, no skipping."""
        path = os.path.join(self.root, self._path(i))
        # a link that left the root after indexing (a reused cache, a changed link) is not read
        if not self.follow_symlinks and not _inside(os.path.realpath(path), self._real_root):
            raise BrokenImageError(path, "resolves outside the data root (follow_symlinks=False)")
        image = load_image_or_jpeg(path) if self.undecoded_jpegs else load_image(path)
        return image.convert("L") if self.channels == 1 and hasattr(image, "convert") else image

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bad"] = set()  # known-bad indices are per process
        return state

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """Counts of what was indexed and skipped (JSON-serialisable)."""
        return {
            "root": self.root,
            "images": len(self),
            "classes": len(self.classes),
            "labeled": self.labeled,
            "from_cache": self.from_cache,
            "skipped_at_index": dict(self.skip_counts),
            "first_skipped": list(self.first_skipped),
            "other_extensions": dict(self._other_extensions),
            "broken_at_load": len(self._bad),
        }

    def __repr__(self) -> str:
        return (
            f"ImageFolder({self.root!r}, images={len(self)}, classes={len(self.classes)}, "
            f"labeled={self.labeled})"
        )

    def _path(self, i: int) -> str:
        return _decode(self._blob[self._offsets[i] : self._offsets[i + 1] - 1])

    def _log_summary(self) -> None:
        skipped = {k: v for k, v in self.skip_counts.items() if v}
        what = f"{len(self.classes)} classes" if self.labeled else "unlabeled"
        log.info(
            "indexed %s: %d images, %s%s; skipped %s",
            self.root,
            len(self),
            what,
            " (from cache)" if self.from_cache else "",
            ", ".join(f"{k}={v}" for k, v in skipped.items()) or "nothing",
        )
        if skipped and self.first_skipped:
            log.info("first skipped files: %s", ", ".join(self.first_skipped))


class Samples(Sequence):
    """Read-only ``Sequence[tuple[relpath, label]]`` over the compact index.

    Kept as one bytes blob plus numpy arrays so that DataLoader workers neither copy
    it page by page (refcounts) nor pickle a million tuples.
    """

    def __init__(self, blob: bytes, offsets: np.ndarray, labels: np.ndarray) -> None:
        self._blob, self._offsets, self._labels = blob, offsets, labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        path = _decode(self._blob[self._offsets[i] : self._offsets[i + 1] - 1])
        return path, int(self._labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(other) == len(self) and all(a == tuple(b) for a, b in zip(self, other))

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"Samples([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


# ---------------------------------------------------------------------- indexing
class _Index:
    """Result of a scan: NUL-separated relpaths, first-level group per path, info."""

    def __init__(self, blob: bytes, groups: np.ndarray, info: dict[str, Any]) -> None:
        self.blob, self.groups, self.info = blob, groups, info
        self.n = len(groups)
        self.offsets = _offsets(blob, self.n) if self.n else np.zeros(1, dtype=np.int64)


class _Scan:
    """One walk of ``root`` with os.scandir (iterative; d_type only, lstat for images): the image
    files per first-level folder, and every skipped entry counted by reason."""

    def __init__(self, root: str, follow: bool):
        self.root, self.follow = root, follow
        self.real_root = os.path.realpath(root)
        self.started = time.time_ns()
        self.counts: Counter[str] = Counter()
        self.other_ext: Counter[str] = Counter()
        self.first_skipped: list[str] = []
        self.group_names: list[str] = []
        self.group_mtimes: dict[str, int] = {}
        self.per_group: dict[int, list[str]] = {-1: []}
        self.root_st = os.stat(root)
        self.visited = {(self.root_st.st_dev, self.root_st.st_ino)}
        self.stack: list[tuple[str, str, int]] = [(root, "", -1)]

    def run(self) -> _Index:
        bar = Progress(None, f"indexing {self.root}", unit="entries")
        while self.stack:
            self._list(*self.stack.pop(), bar)
        bar.close()
        return self._index()

    def skip(self, reason: str, rel: str) -> None:
        self.counts[reason] += 1
        if len(self.first_skipped) < 5:
            self.first_skipped.append(rel)

    def _list(self, path: str, prefix: str, group: int, bar: Progress) -> None:
        try:
            it = os.scandir(path)
        except OSError as e:
            if not prefix:
                raise ValueError(f"cannot list image folder {self.root}: {e}") from e
            self.skip("unreadable_dir", prefix.rstrip("/"))
            return
        seen = 0
        with it:
            for entry in it:
                seen += 1
                if seen % 4096 == 0:
                    bar.update(4096)
                st = self._entry(entry, prefix + entry.name, group)
                if st is not None:
                    self._descend(entry, st, prefix, group)
        bar.update(seen % 4096)

    def _entry(self, entry: os.DirEntry, rel: str, group: int) -> os.stat_result | None:
        """File an entry (an image of the group, or skipped); the stat of a directory to descend."""
        if entry.name[0] == ".":
            self.skip("hidden", rel)
            return None
        if entry.is_dir(follow_symlinks=False):
            return entry.stat(follow_symlinks=False)
        if entry.is_file(follow_symlinks=False):
            self._file(rel, entry.name, group, lambda: entry.stat(follow_symlinks=False).st_size, outside=False)
            return None
        if not entry.is_symlink():
            self.skip("special", rel)
            return None
        try:
            st = entry.stat()  # follows the link
        except OSError:
            self.skip("broken_link", rel)
            return None
        if stat.S_ISREG(st.st_mode):
            outside = not self.follow and not _inside(os.path.realpath(entry.path), self.real_root)
            self._file(rel, entry.name, group, lambda: st.st_size, outside)
            return None
        if not stat.S_ISDIR(st.st_mode):
            self.skip("special", rel)
        elif not self.follow:
            self.skip("symlinked_dir", rel)
        else:
            return st
        return None

    def _file(self, rel: str, name: str, group: int, size, outside: bool) -> None:
        """The one check of a file: an image extension, inside the root (links), not empty."""
        dot = name.rfind(".")
        ext = name[dot:].lower() if dot > 0 else ""
        if ext not in IMAGE_EXTENSIONS:
            self.other_ext[ext or "(none)"] += 1
            self.skip("non_image", rel)
        elif outside:
            self.skip("outside_root", rel)
        elif size() == 0:
            self.skip("zero_byte", rel)
        else:
            self.per_group[group].append(rel)

    def _descend(self, entry: os.DirEntry, st: os.stat_result, prefix: str, group: int) -> None:
        """A directory (real, or a followed symlink): walked once; a first-level one starts a group."""
        rel = prefix + entry.name
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            self.skip("loop", rel)
            return
        self.visited.add(key)
        if not prefix:
            group = len(self.group_names)
            self.group_names.append(entry.name)
            self.group_mtimes[entry.name] = st.st_mtime_ns
            self.per_group[group] = []
        self.stack.append((entry.path, rel + "/", group))

    def _index(self) -> _Index:
        """Deterministic order: root files, then each first-level folder by name."""
        paths: list[str] = []
        groups: list[np.ndarray] = []
        names = self.group_names
        for g in sorted(self.per_group, key=lambda g: (g >= 0, names[g] if g >= 0 else "")):
            lst = self.per_group[g]
            lst.sort()
            paths += lst
            groups.append(np.full(len(lst), g, dtype=np.int32))
        blob = "\0".join(paths).encode("utf-8", "surrogateescape")
        info = {"root": self.root, "follow_symlinks": self.follow, "extensions": sorted(IMAGE_EXTENSIONS),
                "scanned_ns": self.started, "root_mtime_ns": self.root_st.st_mtime_ns,
                "dir_mtimes_ns": self.group_mtimes, "groups": names, "counts": dict(self.counts),
                "other_extensions": dict(self.other_ext.most_common(10)), "first_skipped": self.first_skipped}
        return _Index(blob, np.concatenate(groups), info)


def _scan(root: str, follow: bool) -> _Index:
    """Walk ``root`` once (``_Scan``)."""
    return _Scan(root, follow).run()


def _inside(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _offsets(blob: bytes, n: int) -> np.ndarray:
    """Start of each path in ``blob`` plus a sentinel, so path i = blob[o[i]:o[i+1]-1]."""
    seps = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 0)
    if len(seps) != n - 1:
        raise ValueError(f"corrupt index: {len(seps) + 1} paths for {n} labels")
    out = np.empty(n + 1, dtype=np.int64)
    out[0] = 0
    out[1:n] = seps + 1
    out[n] = len(blob) + 1
    return out


def _no_images_message(root: str, info: dict[str, Any]) -> str:
    counts = {k: v for k, v in info["counts"].items() if v}
    supported = ", ".join(sorted(IMAGE_EXTENSIONS))
    if not counts:
        return f"no images in {root}: the folder is empty; supported extensions: {supported}"
    parts = []
    for reason, n in counts.items():
        if reason == "non_image":
            exts = ", ".join(info["other_extensions"])
            parts.append(f"{n} files with other extensions ({exts})")
        else:
            parts.append(f"{n} {reason.replace('_', '-')}")
    return (
        f"no images in {root}: found {'; '.join(parts)} (e.g. {', '.join(info['first_skipped'])});"
        f" supported extensions: {supported}"
    )


# ---------------------------------------------------------------------- cache
def _cache_path(cache_dir: str, root: str, follow: bool) -> str:
    key = hashlib.sha1(root.encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(cache_dir, "index", key + ("-follow" if follow else "") + ".idx")


def _write_cache(path: str, index: _Index) -> None:
    """Atomically write the index (temp file + fsync + os.replace); warn on failure."""
    header = dict(index.info, n=index.n, blob_len=len(index.blob))
    data = [
        _MAGIC,
        json.dumps(header).encode("ascii") + b"\n",
        index.groups.astype("<i4").tobytes(),
        index.blob,
    ]
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".idx")
        with os.fdopen(fd, "wb") as f:
            for chunk in data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning("cannot write image index cache %s (%s); continuing without cache", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _read_cache(path: str, root: str, follow: bool) -> _Index | None:
    """The cached index if it exists and is still valid for ``root``, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        if not data.startswith(_MAGIC):
            raise ValueError("bad magic")
        end = data.index(b"\n", len(_MAGIC))
        info = json.loads(data[len(_MAGIC) : end])
        n, blob_len = info["n"], info["blob_len"]
        start = end + 1
        groups = np.frombuffer(data, dtype="<i4", count=n, offset=start).astype(np.int32)
        blob = data[start + 4 * n :]
        if len(blob) != blob_len:
            raise ValueError("truncated")
        index = _Index(blob, groups, info)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring corrupt image index cache %s (%s)", path, e)
        return None
    if info["root"] != root or info["follow_symlinks"] != follow:
        return None
    if info["extensions"] != sorted(IMAGE_EXTENSIONS):
        return None
    stale = _stale(root, info)
    if stale:
        log.info("rescanning %s: %s", root, stale)
        return None
    return index


def _stale(root: str, info: dict[str, Any]) -> str:
    """Why the cached index can't be trusted ("" if it can).

    Compares the mtimes of root and its first-level folders; a folder modified less
    than RACY_NS before the scan may have changed again within the same timestamp
    tick, so such an index is never trusted (as git does for its index).
    """
    limit = info["scanned_ns"] - RACY_NS
    dirs = {"": info["root_mtime_ns"], **info["dir_mtimes_ns"]}
    for name, mtime in dirs.items():
        path = os.path.join(root, name) if name else root
        try:
            now = os.stat(path).st_mtime_ns
        except OSError:
            return f"{path} is gone"
        if now != mtime:
            return f"{path} changed since it was indexed"
        if mtime > limit:
            return f"{path} was modified just before it was indexed"
    return ""


def read_or_next(dataset, index: int, warning, words: tuple[str, str, str]) -> dict[str, Any]:
    """Item ``index`` of an indexed image source (``read(i)``, ``transform``, ``_labels``, ``_bad``,
    ``root``), or (when it does not decode) the next one that does, with ``skipped`` the entries
    passed over; after ``MAX_TRIES`` failures in a row a RuntimeError. ``warning(i, error)``: the
    line logged once per kind of failure; ``words``: what the messages call a position, the items
    and the unreadable ones (``("index", "images", "files")``)."""
    at, items, bad = words
    n, index = len(dataset), int(index)
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} {items}")
    i = index % n
    skipped = tries = 0
    for _ in range(n):
        if i not in dataset._bad:
            tries += 1
            try:
                image = dataset.read(i)
            except (BrokenImageError, OSError) as e:
                dataset._bad.add(i)
                _warn_once(warning(i, e))
                if tries >= MAX_TRIES:
                    break
            else:
                if dataset.transform is not None:
                    image = dataset.transform(image)
                return {"image": image, "label": int(dataset._labels[i]), "skipped": skipped}
        skipped += 1
        i = (i + 1) % n
    raise RuntimeError(f"no readable image found in {tries} tries starting at {at} {index} of "
                       f"{dataset.root} ({len(dataset._bad)} unreadable {bad} known so far)")


def _warn_once(msg: str) -> None:
    """Log the first MAX_WARNINGS load failures of each process."""
    pid = os.getpid()
    if _warned["pid"] != pid:
        _warned["pid"], _warned["n"] = pid, 0
    _warned["n"] += 1
    if _warned["n"] <= MAX_WARNINGS:
        last = _warned["n"] == MAX_WARNINGS
        log.warning("%s%s", msg, " (further failures in this process are not logged)" if last else "")
