"""A Hugging Face ``datasets`` data set on local disk as a data source: ``hf:PATH[:split]``.

``PATH`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (read with
``load_from_disk``), or an ``imagefolder``-style folder (``load_dataset("imagefolder", data_dir=PATH)``,
which writes its arrow cache under ``$HF_HOME``). Nothing is downloaded: only local folders are read.
The images come from ``data.image_column`` (default: the first ``Image`` feature; a string column
holds paths, a binary column encoded images) and are decoded by selfsight's own decoder
(``data.images``), so a row reads to the same pixels as the same file in a folder; a row that does
not decode is skipped and counted in ``skipped``, as a folder's broken file is. Labels come from
``data.label_column`` (default ``label`` where it exists): a ``ClassLabel`` gives its ids and names,
other values are class names mapped as a list file's are (``lists.class_ids``).

``datasets`` is an optional extra (``pip install 'selfsight[hf]'``), imported only here.
"""
from __future__ import annotations

import copy
import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from selfsight.data.folder import read_or_next
from selfsight.data.images import BrokenImageError, decode_image, is_image_file, load_image, load_image_or_jpeg
from selfsight.data.lists import class_ids

__all__ = ["HF_PREFIX", "NEEDS_DATASETS", "SAVED_MARKERS", "HFImages", "is_hf_spec", "load_split", "parse_hf_spec"]

log = logging.getLogger("selfsight.data")

HF_PREFIX = "hf:"
NEEDS_DATASETS = "hf: data needs the datasets package: pip install 'selfsight[hf]'"
SAVED_MARKERS = ("dataset_dict.json", "state.json")      # what save_to_disk leaves in its folder


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """``"hf:PATH[:split]"`` -> (PATH, split or ""); a last ``:part`` without a ``/`` is the split
    unless the whole rest names an existing path."""
    rest = spec[len(HF_PREFIX):] if is_hf_spec(spec) else spec
    path, sep, split = rest.rpartition(":")
    if sep and path and split and "/" not in split and not os.path.exists(os.path.expanduser(rest)):
        return path, split
    return rest, ""


def _datasets():
    try:
        import datasets  # optional extra: selfsight[hf]
    except ImportError:
        raise ImportError(NEEDS_DATASETS) from None
    return datasets


def load_split(path: str, split: str = ""):
    """(the ``datasets.Dataset`` of ``split`` at ``path``, the split's name): a ``DatasetDict`` without a
    split named gives ``train``, or its only split."""
    if not path:
        raise ValueError("hf: needs a folder: hf:PATH[:split] (a save_to_disk folder or an imagefolder)")
    folder = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"hf:{path}: no such folder (hf: reads local data only: a folder written by "
                                "save_to_disk, or a folder of images for the imagefolder loader)")
    datasets = _datasets()
    saved = any(os.path.exists(os.path.join(folder, m)) for m in SAVED_MARKERS)
    if not saved and not _holds_an_image(folder):
        raise ValueError(f"hf:{path} is neither a folder written by save_to_disk (no {' or '.join(SAVED_MARKERS)}) "
                         "nor a folder of images for the imagefolder loader")
    try:
        data = datasets.load_from_disk(folder) if saved else datasets.load_dataset("imagefolder", data_dir=folder)
    except Exception as e:          # datasets' own errors (no images, a corrupt folder): one line naming the data
        first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
        raise ValueError(f"hf:{path}: cannot load it with datasets: {first}") from e
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or ("train" if "train" in data else names[0] if len(names) == 1 else "")
        if chosen not in data:
            raise ValueError(f"hf:{path} has splits {', '.join(names)}; name one: hf:{path}:{names[0]}"
                             if not split else f"hf:{path} has splits {', '.join(names)}, not {split!r}")
        data, split = data[chosen], chosen
    elif split:
        raise ValueError(f"hf:{path} holds one data set without splits: leave out :{split}")
    if not len(data):
        raise ValueError(f"hf:{path}{':' + split if split else ''} has no rows")
    return data, split


def _holds_an_image(folder: str) -> bool:
    """Whether a file with an image extension lies anywhere below ``folder`` (stops at the first)."""
    return any(is_image_file(f) for _, _, files in os.walk(folder) for f in files)


class HFImages(Dataset):
    """The rows of a local Hugging Face data set (module docstring) as a map-style source: items
    ``{"image": RGB PIL image or transform(image), "label": int, "skipped": int}``; ``labels``,
    ``classes``, ``labeled``, ``channels``, ``prepared`` and ``image_sizes`` as a folder's."""

    def __init__(self, spec: str, image_column: str = "", label_column: str = "", transform=None) -> None:
        path, split = parse_hf_spec(spec)
        data, split = load_split(path, split)
        self.root = self.name = f"{HF_PREFIX}{path}" + (f":{split}" if split else "")
        self.folder = os.path.abspath(os.path.expanduser(path))
        self._rows, self.image_column = _image_rows(data, image_column, self.root)
        self._labels, self.classes, self.labeled = _labels(data, label_column, self.root)
        self.transform, self.undecoded_jpegs, self.channels = transform, False, 3
        self._bad: set[int] = set()
        log.info("%s: %d rows, %s (images from column %r)", self.root, len(self),
                 f"{len(self.classes)} classes" if self.labeled else "unlabeled", self.image_column)

    @property
    def labels(self) -> np.ndarray:
        """The label of every row (an index into ``classes``; -1 when unlabeled), read-only."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row ``index``, or (when it does not decode) the next one that does, with ``skipped`` the
        rows passed over; after ``MAX_TRIES`` failures in a row a RuntimeError."""
        return read_or_next(self, index, lambda i, e: f"skipping an unreadable image: {_why(e)}",
                            ("row", "rows", "rows"))

    def read(self, i: int):
        """Decode row ``i`` (RGB PIL image); raises BrokenImageError or OSError, no skipping."""
        value, name = self._raw(i)
        if isinstance(value, bytes):
            image = decode_image(value, name)
        else:
            image = load_image_or_jpeg(value) if self.undecoded_jpegs else load_image(value)
        return image.convert("L") if self.channels == 1 and hasattr(image, "convert") else image

    def _raw(self, i: int) -> tuple[bytes | str, str]:
        """(the encoded image, or the path of its file; a name for messages) of row ``i``."""
        value = self._rows[int(i)][self.image_column]
        name = f"{self.root} row {i}"
        if isinstance(value, dict):                                 # an Image feature: {"bytes", "path"}
            if value.get("bytes") is not None:
                return value["bytes"], name + (f" ({value['path']})" if value.get("path") else "")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), name
        if not value:
            raise BrokenImageError(name, "no image in this row")
        path = os.path.expanduser(str(value))
        if not os.path.isabs(path) and not os.path.exists(path):     # relative to the data set's folder
            path = os.path.join(self.folder, path)
        return path, path

    def image_sizes(self, n: int = 64) -> list[tuple[int, int]]:
        """(width, height) of up to ``n`` rows spread over the data, from the image headers (rows that
        do not open are left out)."""
        sizes = []
        for i in sorted({int(i) for i in np.linspace(0, len(self) - 1, min(n, len(self)))}):
            try:
                value, _ = self._raw(i)
                with Image.open(io.BytesIO(value) if isinstance(value, bytes) else value) as im:
                    sizes.append(tuple(im.size))
            except (BrokenImageError, OSError, ValueError, Image.DecompressionBombError):
                continue
        return sizes

    def first_readable(self) -> int:
        """The first row that decodes; a ValueError naming the data when none does."""
        first_error = ""
        for i in range(len(self)):
            try:
                self.read(i)
                return i
            except (BrokenImageError, OSError) as e:
                self._bad.add(i)
                first_error = first_error or _why(e)
        raise ValueError(f"no readable image in {self.root}: all {len(self)} rows failed to decode "
                         f"(e.g. {first_error})")

    def prepared(self, transform=None, undecoded_jpegs: bool = False, channels: int | None = None) -> "HFImages":
        """These rows as a loader wants them, leaving this object as it is (``ImageFolder.prepared``)."""
        out = copy.copy(self)
        out.transform, out.undecoded_jpegs = transform, undecoded_jpegs
        out.channels = channels or self.channels
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bad"] = set()  # known-bad rows are per process
        return state

    def summary(self) -> dict[str, Any]:
        return {"root": self.root, "images": len(self), "classes": len(self.classes), "labeled": self.labeled,
                "image_column": self.image_column, "broken_at_load": len(self._bad)}

    def __repr__(self) -> str:
        return f"HFImages({self.root!r}, images={len(self)}, classes={len(self.classes)}, labeled={self.labeled})"


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, BrokenImageError) else f"{getattr(e, 'filename', '')}: {type(e).__name__}: {e}"


def _image_rows(data, name: str, where: str):
    """(the rows of the image column alone, read undecoded: {"bytes", "path"}, a path or bytes; its
    name): ``name`` (checked), else the first ``Image`` feature."""
    datasets = _datasets()
    column = _image_column(data, name, where, datasets)
    rows = data.select_columns([column])
    if isinstance(data.features[column], datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))       # decoded here, by selfsight
    return rows, column


def _image_column(data, name: str, where: str, datasets) -> str:
    """``name`` (checked), else the first ``Image`` feature."""
    features = data.features
    if name:
        if name not in features:
            raise ValueError(f"data.image_column={name!r} is not a column of {where} "
                             f"(columns: {', '.join(features)})")
        feature = features[name]
        ok = isinstance(feature, datasets.Image) or isinstance(feature, datasets.Value) and \
            feature.dtype in ("string", "large_string", "binary", "large_binary")
        if not ok:
            raise ValueError(f"data.image_column={name!r} of {where} holds {feature}, not images (an Image "
                             "feature, paths as strings or encoded images as bytes)")
        return name
    found = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if found is None:
        raise ValueError(f"{where} has no Image column (columns: {', '.join(features)}): name the column of "
                         "paths or encoded images with data.image_column=NAME")
    return found


def _labels(data, name: str, where: str) -> tuple[np.ndarray, list[str], bool]:
    """(label ids, class names, whether every row is labeled) of the label column: ``name`` (checked),
    else ``label`` where there is one; none -> unlabeled."""
    if name and name not in data.column_names:
        raise ValueError(f"data.label_column={name!r} is not a column of {where} "
                         f"(columns: {', '.join(data.column_names)})")
    name = name or ("label" if "label" in data.column_names else "")
    n = len(data)
    if not name:
        return np.full(n, -1, dtype=np.int32), [], False
    values = data.select_columns([name]).with_format("arrow")[:].column(name).to_pylist()
    feature = data.features[name]
    if isinstance(feature, _datasets().ClassLabel):
        ids = np.array([-1 if v is None else v for v in values], dtype=np.int32)
        classes = list(feature.names)
    else:
        ids, classes = class_ids([None if v is None or v == "" else str(v) for v in values])
    labeled = bool(n) and bool((ids >= 0).all())
    if not labeled:
        missing = int((ids < 0).sum())
        if missing < n:
            log.info("%s: %d of %d rows have no %r: the data is used unlabeled", where, missing, n, name)
        return np.full(n, -1, dtype=np.int32), [], False
    return ids, classes, True
