"""Data sources: built-in sets (in memory), any folder of images, lists of files (CSV/text), local
Hugging Face data sets (``hf:``) and tar shards."""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

from selfsight.data.arrays import ArrayDataset
from selfsight.data.builtin import SPLITS, fashion_mnist, torchvision_set
from selfsight.data.folder import ImageFolder
from selfsight.data.hf import SAVED_MARKERS, HFImages, is_hf_spec
from selfsight.data.lists import ListImages, is_list_spec
from selfsight.data.masks import MaskFolder, is_mask_folder
from selfsight.data.scenes import DenseArrays, fashion_mnist_scenes, resized
from selfsight.data.shards import ShardDataset, is_shard_spec

BUILTIN = sorted(SPLITS)
log = logging.getLogger("selfsight.data")


def build_dataset(spec: str, root: str = "", download: bool = True, shuffle_buffer: int = 1000,
                  image_column: str = "", label_column: str = ""):
    """``"fashion-mnist"``, ``"cifar10:test"``, ``"stl10:unlabeled"``, a folder path, a list of files
    (``list.csv``, ``.tsv``, ``.txt``: ``path[,label]``), a local Hugging Face data set
    (``hf:PATH[:split]``), or tar shards (``shuffle_buffer``: samples each shard stream holds to
    shuffle within shards; 0 = shard order). ``image_column``/``label_column``: the columns of a
    list with a header row or of ``hf:`` data ("" = the defaults, docs/data.md).

    A built-in name without a split means its training split. Folders may be labeled
    (``root/<class>/...``) or not; see docs/data.md.
    """
    name, _, split = spec.partition(":")
    if name in SPLITS and not Path(spec).exists():
        split = split or "train"
        if split not in SPLITS[name]:
            raise ValueError(f"{name} has splits {', '.join(SPLITS[name])}, not {split!r}")
        if name == "fashion-mnist":
            return fashion_mnist(split, root, download)
        if name == "fashion-mnist-scenes":
            return fashion_mnist_scenes(split, fashion_mnist(split, root, download))
        return torchvision_set(name, split, root, download)
    if is_hf_spec(spec):                    # a local Hugging Face data set: "hf:PATH[:split]"
        source = HFImages(spec, image_column, label_column)
        source.first_readable()
        return source
    if is_list_spec(spec):                  # a list of files: "list.csv" (path[,label]), .tsv, .txt
        listed = ListImages(spec, image_column, label_column)
        listed.first_readable()
        return listed
    if is_shard_spec(spec):                 # tar shards: "dir/shard-{000000..000099}.tar", a glob or a folder
        return ShardDataset(spec, shuffle_buffer=shuffle_buffer)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r} is neither a built-in set ({', '.join(BUILTIN)}) nor an existing "
                                "folder, list of files (.csv, .tsv, .txt), hf:PATH or tar shards")
    if is_mask_folder(path) and not (path / "images").is_symlink():
        log.info("%s holds images/ and masks/: pretraining reads images/ (the masks are for `eval seg`)", spec)
        path = path / "images"
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        raise ValueError(f"{spec} is a Hugging Face data set written by save_to_disk: pass it as hf:{spec}")
    folder = ImageFolder(path)
    folder.first_readable()             # a folder of nothing but unreadable files: one clear line now
    return folder


DENSE_BUILTIN = ["fashion-mnist-scenes"]


def build_dense(spec: str, root: str = "", size: int | None = None, default_size: int | None = None) -> DenseArrays:
    """Images with a class id per pixel: ``fashion-mnist-scenes[:train|test]`` (made in memory,
    ``data/scenes.py``) or a folder with ``images/`` and ``masks/`` (``data/masks.py``), at ``size``
    px (default: a built-in set's own size, a folder's ``default_size``, else its median short side)."""
    name = spec.partition(":")[0]
    if name in DENSE_BUILTIN and not Path(spec).exists():
        data = build_dataset(spec, root)
        return resized(data, size) if size and size != data.image_size else data
    path = Path(spec).expanduser()
    if path.is_dir() and is_mask_folder(path):
        folder = MaskFolder(path)
        if not size:
            native, how = native_size(folder)
            size = default_size or native
            if default_size and not 2 / 3 <= native / default_size <= 1.5:
                log.warning("%s: %s; evaluating at %d px (the run's input size): --size %d keeps more of their detail",
                            spec, how, size, native)
        return folder.load(size)
    close = difflib.get_close_matches(name, DENSE_BUILTIN, n=1, cutoff=0.8)
    hint = (f"; did you mean {close[0]}?" if close else
            f"; {path.name}/ looks like the images/ folder itself: pass its parent {path.parent}"
            if path.name in ("images", "masks") and is_mask_folder(path.parent) else "")
    raise ValueError(f"dense evaluation needs images with masks: {spec!r} is neither "
                     f"{' nor '.join(DENSE_BUILTIN)} nor a folder with images/ and masks/ sub-folders "
                     f"(a mask PNG per image with the same stem, one class id per pixel){hint}")


def native_size(dataset, n: int = 64) -> tuple[int, str]:
    """The typical short side of a source's images in px, and how it was found: an in-memory set's
    own size; for folders and shards the median short side of up to ``n`` images' headers (224 when
    none can be read, or for other sources)."""
    if hasattr(dataset, "images") and hasattr(dataset, "image_size"):            # ArrayDataset
        h, w = dataset.images.shape[-2:]
        return int(min(h, w)), f"{int(w)}x{int(h)} px images"
    sizes = dataset.image_sizes(n) if hasattr(dataset, "image_sizes") else []
    if not sizes:
        return 224, "image size unknown, assumed 224 px"
    shorts = sorted(min(w, h) for w, h in sizes)
    mid = shorts[len(shorts) // 2]
    spread = f"{shorts[0]}-{shorts[-1]}" if shorts[0] != shorts[-1] else f"{mid}"
    return int(mid), f"short side {spread} px, median {mid} px of {len(sizes)} images sampled"


def num_classes_of(dataset) -> int:
    """The number of classes of a data source, 0 when it has no labels."""
    if hasattr(dataset, "labeled"):                      # ImageFolder, lists, hf:, shards
        return len(dataset.classes) if dataset.labeled else 0
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return 0
    return int(labels.max()) + 1 if bool((labels >= 0).any()) else 0


def held_out_split(spec: str) -> str | None:
    """The held-out split that goes with a built-in training split, if any."""
    name = spec.partition(":")[0]
    if name in SPLITS and "test" in SPLITS[name]:
        return f"{name}:test"
    return None


__all__ = ["ArrayDataset", "DenseArrays", "build_dataset", "build_dense", "held_out_split", "native_size",
           "num_classes_of", "BUILTIN"]
