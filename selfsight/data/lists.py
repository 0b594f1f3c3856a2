"""A CSV or text file listing images (``path[,label]``) as a data source: an ``ImageFolder`` over an
explicit list of files, so decoding, skipping broken files, labels and ``prepared`` are the folder's.

Formats (docs/data.md, *Lists of files*):

* ``.csv`` (comma) and ``.tsv`` (tab), read with Python's ``csv`` module (quoted fields allowed);
* ``.txt``: a tab or a comma in the first row makes it a TSV or a CSV; otherwise one path per line,
  optionally followed by whitespace and a label (``n01440764/n01440764_10026.JPEG 0``, the ImageNet
  list format) when the line does not itself end in an image extension.

An optional header row names the columns (``path,label``); it is recognised when its first field is
neither an image file name nor an existing file. Paths are relative to the list's folder (absolute
paths are allowed); blank lines and lines starting with ``#`` are ignored. Labels are class names
(ints count as names): the classes are the sorted names (numerically when every name is an integer),
a label is an index into them, as for class folders.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import stat
from collections import Counter

import numpy as np

from selfsight.data.folder import ImageFolder, Samples, _offsets
from selfsight.data.images import is_image_file
from selfsight.progress import Progress

__all__ = ["LIST_SUFFIXES", "ListImages", "ListRows", "class_ids", "is_list_spec", "read_list"]

log = logging.getLogger("selfsight.data")

LIST_SUFFIXES = (".csv", ".tsv", ".txt")
PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path")
LIST_SKIP_REASONS = ("missing", "not_a_file", "zero_byte")    # found while indexing: one stat per path
_TRAILING_LABEL = re.compile(r"^(.*\S)\s+(\S+)$")


def is_list_spec(spec: str) -> bool:
    """A file whose name ends in ``.csv``, ``.tsv`` or ``.txt`` (existing or not: a typo is an error later)."""
    path = os.path.expanduser(spec)
    return path.lower().endswith(LIST_SUFFIXES) and not os.path.isdir(path)


def class_ids(names: list[str | None]) -> tuple[np.ndarray, list[str]]:
    """Label names (None: no label) -> (ids as int32, -1 for None; the sorted class names). The names
    sort numerically when every one is an integer (``"2"`` before ``"10"``), else as strings."""
    used = {n for n in names if n is not None}
    numeric = bool(used) and all(re.fullmatch(r"[+-]?\d+", n) for n in used)
    if numeric:                               # "03" and "3" name the same class
        names = [None if n is None else str(int(n)) for n in names]
        classes = [str(v) for v in sorted({int(n) for n in used})]
    else:
        classes = sorted(used)
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([-1 if n is None else lookup[n] for n in names], dtype=np.int32), classes


class ListRows:
    """What a list file says: paths, label names (None: no label) and the line of each row."""

    def __init__(self, paths: list[str], labels: list[str | None], lines: list[int], header: list[str] | None):
        self.paths, self.labels, self.lines, self.header = paths, labels, lines, header


def read_list(path: str, image_column: str = "", label_column: str = "") -> ListRows:
    """Parse a list file (module docstring); ``image_column``/``label_column`` name header columns
    (default: the first of ``PATH_COLUMNS`` present, else the first column; ``label`` where present)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(f, 1)]
    lines = [(i, line) for i, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return ListRows([], [], [], None)
    rows = _split(path, lines)
    folder = os.path.dirname(os.path.abspath(path))
    first = rows[0][1]
    named = {c for c in (image_column, label_column) if c}
    header = None
    if named & set(first) or not (is_image_file(first[0]) or os.path.exists(os.path.join(folder, first[0]))):
        header, rows = first, rows[1:]
    if header is None and named:
        raise ValueError(f"{path} has no header row, so data.image_column/data.label_column ({', '.join(named)}) "
                         "name no column: add a header row such as path,label")
    path_at, label_at = _columns(path, header, image_column, label_column)
    paths, labels, at = [], [], []
    for line, fields in rows:
        p = fields[path_at] if path_at < len(fields) else ""
        if not p:
            raise ValueError(f"{path}:{line}: no path in this row")
        paths.append(os.path.expanduser(p))
        label = fields[label_at] if label_at is not None and label_at < len(fields) else ""
        labels.append(label or None)
        at.append(line)
    return ListRows(paths, labels, at, header)


def _split(path: str, lines: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """The fields of each line, by the format of the file's suffix (module docstring)."""
    suffix = os.path.splitext(path)[1].lower()
    delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
    if delimiter is None:                     # .txt: tab, comma, or "path [label]"
        first = lines[0][1]
        delimiter = "\t" if "\t" in first else "," if "," in first else None
    if delimiter is not None:
        texts = [t for _, t in lines]
        return [(i, [x.strip() for x in fields]) for (i, _), fields in
                zip(lines, csv.reader(texts, delimiter=delimiter))]
    out = []
    for i, text in lines:
        text = text.strip()
        m = _TRAILING_LABEL.match(text)
        out.append((i, [m.group(1), m.group(2)] if m and not is_image_file(text) else [text]))
    return out


def _columns(path: str, header: list[str] | None, image_column: str, label_column: str) -> tuple[int, int | None]:
    """(index of the path column, index of the label column or None)."""
    if header is None:
        return 0, 1
    lower = [h.lower() for h in header]
    for key, name in (("data.image_column", image_column), ("data.label_column", label_column)):
        if name and name not in header:
            raise ValueError(f"{key}={name!r} is not a column of {path} (columns: {', '.join(header)})")
    path_at = header.index(image_column) if image_column else \
        next((lower.index(c) for c in PATH_COLUMNS if c in lower), 0)
    label_at = header.index(label_column) if label_column else lower.index("label") if "label" in lower else None
    return path_at, label_at


class ListImages(ImageFolder):
    """The images a list file names (``path[,label]``, module docstring), as an ``ImageFolder``:
    items ``{"image", "label", "skipped"}``, files that do not decode skipped at load and counted in
    ``skipped``; paths that do not exist (or are empty, or folders) are skipped while indexing and
    counted in ``skip_counts`` and the INFO line, as a folder's skipped entries are."""

    def __init__(self, path: str | os.PathLike, image_column: str = "", label_column: str = "",
                 transform=None) -> None:
        self.list_path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.isfile(self.list_path):
            raise FileNotFoundError(f"image list {self.list_path} does not exist")
        rows = read_list(self.list_path, image_column, label_column)
        self.root = self._real_root = os.path.dirname(self.list_path)
        self.transform, self.undecoded_jpegs, self.channels = transform, False, 3
        self.follow_symlinks = True             # a list may name files anywhere (absolute paths)
        self.cache_path, self.from_cache, self._other_extensions = "", False, {}
        keep, self.skip_counts, self.first_skipped = _check_files(self.root, rows.paths, self.list_path)
        if not keep:
            raise ValueError(_nothing_listed(self.list_path, rows, self.skip_counts, self.first_skipped))
        names = [rows.labels[i] for i in keep]
        labeled = [n is not None for n in names]
        if any(labeled) and not all(labeled):
            line = rows.lines[keep[labeled.index(False)]]
            raise ValueError(f"{self.list_path}:{line}: no label, while other rows have one: give every row a "
                             "label, or none")
        self._labels, self.classes = class_ids(names)          # no label at all: -1 each, no classes
        self.labeled = all(labeled)
        paths = [rows.paths[i] for i in keep]
        self._blob = "\0".join(paths).encode("utf-8", "surrogateescape")
        self._offsets = _offsets(self._blob, len(paths))
        self.samples = Samples(self._blob, self._offsets, self._labels)
        self._bad: set[int] = set()
        self._log_summary()

    def first_readable(self) -> int:
        try:
            return super().first_readable()
        except ValueError as e:
            raise ValueError(f"{self.list_path} names no readable image: all {len(self)} listed files failed to "
                             f"decode ({str(e).rpartition('(e.g. ')[2].rstrip(')')})") from None

    def summary(self) -> dict:
        return {**super().summary(), "list": self.list_path}

    def __repr__(self) -> str:
        return (f"ListImages({self.list_path!r}, images={len(self)}, classes={len(self.classes)}, "
                f"labeled={self.labeled})")

    def _log_summary(self) -> None:
        skipped = {k: v for k, v in self.skip_counts.items() if v}
        what = f"{len(self.classes)} classes" if self.labeled else "unlabeled"
        log.info("listed %s: %d images, %s; skipped %s", self.list_path, len(self), what,
                 ", ".join(f"{k}={v}" for k, v in skipped.items()) or "nothing")
        if skipped:
            n = sum(skipped.values())
            log.warning("%s: %d listed path%s skipped (%s), e.g. %s; paths are relative to %s", self.list_path, n,
                        "s" if n > 1 else "", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()),
                        ", ".join(self.first_skipped), self.root)


def _check_files(root: str, paths: list[str], name: str) -> tuple[list[int], dict[str, int], list[str]]:
    """(the indices of the paths naming a non-empty file, the others counted by reason
    (``LIST_SKIP_REASONS``), the first 5 of them): one stat per path, relative to ``root``."""
    counts: Counter[str] = Counter()
    keep, first = [], []
    with Progress(len(paths), f"checking the files of {name}", unit="files") as bar:
        for i, p in enumerate(paths):
            try:
                st = os.stat(os.path.join(root, p))
                reason = "not_a_file" if not stat.S_ISREG(st.st_mode) else "zero_byte" if not st.st_size else ""
            except OSError:
                reason = "missing"
            if reason:
                counts[reason] += 1
                if len(first) < 5:
                    first.append(p)
            else:
                keep.append(i)
            if i % 4096 == 4095:
                bar.update(4096)
        bar.update(len(paths) % 4096)
    return keep, {k: counts.get(k, 0) for k in LIST_SKIP_REASONS}, first


def _nothing_listed(path: str, rows: ListRows, counts: dict, first: list[str]) -> str:
    if not rows.paths:
        return f"the image list {path} names no image (an empty file, or a header only)"
    what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n)
    return (f"the image list {path} names no readable image: all {len(rows.paths)} paths were skipped ({what}; "
            f"e.g. {', '.join(first[:3])}); paths are relative to the list's folder {os.path.dirname(path)}")
