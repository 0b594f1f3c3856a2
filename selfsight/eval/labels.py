"""Labeled train/test pairs for the evaluations, with the test labels matched to the training
classes by name.

A folder's labels are positions in its own sorted list of class folders, so a training folder with
classes {a, b} and a test folder with {b, c, d} would score test "b" as training "a". Every
evaluation with labels (kNN, linear probes, fine-tuning) therefore rewrites the test labels into
the training set's class indices by class name. Test classes the training data lacks are an error
by default; with ``unknown="wrong"`` their images stay in the test set, can never be predicted, and
count as wrong (and the result names them). Sources without class names (arrays built in Python)
are matched by position, with a warning when the two sets differ in size.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from selfsight.data import ArrayDataset, build_dataset

log = logging.getLogger("selfsight")
UNKNOWN_CLASSES = ("error", "wrong")


def has_labels(ds) -> bool:
    """Whether every image of a data source has a label."""
    if hasattr(ds, "labeled"):                       # folders, shards, subsets of them
        return bool(ds.labeled)
    return bool((ds.labels >= 0).all())              # ArrayDataset (-1 = unlabeled)


def labels_of(ds) -> np.ndarray | None:
    """The labels of a map-style source as one array (None where they are only known per item)."""
    if isinstance(ds, ArrayDataset):
        return ds.labels.numpy()
    labels = getattr(ds, "labels", None)            # folders, subsets, relabeled sources
    return labels if isinstance(labels, np.ndarray) else None


class Relabeled(Dataset):
    """A map-style source whose labels go through ``table`` (its label -> a training class index, -1
    for none); ``prepared`` reaches the source itself (folders)."""

    def __init__(self, dataset, table: Sequence[int], classes: list[str]):
        self.dataset, self.table, self.classes, self.labeled = dataset, list(table), list(classes), True
        self.name = getattr(dataset, "name", getattr(dataset, "root", ""))
        self.channels = getattr(dataset, "channels", 3)

    def prepared(self, **kwargs) -> "Relabeled":
        return Relabeled(self.dataset.prepared(**kwargs), self.table, self.classes)

    @property
    def labels(self) -> np.ndarray | None:
        base = labels_of(self.dataset)
        return None if base is None else np.asarray(self.table)[base]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {**item, "label": self.table[item["label"]]}


def match_classes(train_set, test_set, unknown: str = "error", test_name: str = "the test data") -> tuple:
    """``(test set with labels in the training set's class indices, info)``; ``info``: ``classes``
    (the test classes scored), ``matched_by`` (name or position), ``unknown_classes`` ({name: images}
    of test classes the training data lacks, scored as wrong; only with ``unknown="wrong"``)."""
    if unknown not in UNKNOWN_CLASSES:
        raise ValueError(f"unknown classes must be handled by one of {', '.join(UNKNOWN_CLASSES)}, got {unknown!r}")
    train_classes, test_classes = list(train_set.classes or []), list(test_set.classes or [])
    if not train_classes or not test_classes:
        if len(train_classes) != len(test_classes):
            log.warning("the training or test data have no class names: labels are matched by position")
        return test_set, {"classes": test_classes, "matched_by": "position"}
    if train_classes == test_classes:
        return test_set, {"classes": test_classes, "matched_by": "name"}
    lookup = {c: i for i, c in enumerate(train_classes)}
    table = [lookup.get(c, -1) for c in test_classes]
    missing = [c for c, t in zip(test_classes, table) if t < 0]
    if missing and unknown == "error":
        raise ValueError(f"{len(missing)} of the {len(test_classes)} classes of {test_name} "
                         f"{'is' if len(missing) == 1 else 'are'} not in the training "
                         f"data: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} (training classes: "
                         f"{', '.join(train_classes[:8])}{', ...' if len(train_classes) > 8 else ''}); evaluate on "
                         "the same classes, or pass --unknown-classes wrong to score their images as wrong")
    if isinstance(test_set, ArrayDataset):
        lut = torch.tensor(table + [-1])                       # index -1 (unlabeled) stays -1
        relabeled = ArrayDataset(test_set.images, lut[test_set.labels], test_set.name, train_classes)
    elif hasattr(test_set, "__getitem__"):
        relabeled = Relabeled(test_set, table, train_classes)
    else:
        raise ValueError(f"{test_name} is a stream (tar shards) with other classes than the training data; "
                         "its labels cannot be matched by name: use a folder or the same class list")
    info = {"classes": [c for c in test_classes if c in lookup], "matched_by": "name"}
    if missing:
        labels = labels_of(test_set)
        counts = np.bincount(labels[labels >= 0], minlength=len(test_classes)) if labels is not None else None
        info["unknown_classes"] = {c: (int(counts[i]) if counts is not None else None)
                                   for i, c in enumerate(test_classes) if table[i] < 0}
        log.warning("%d test class%s not in the training data; %s images count as wrong: %s", len(missing),
                    " is" if len(missing) == 1 else "es are", "its" if len(missing) == 1 else "their",
                    ", ".join(missing[:10]))
    return relabeled, info


def labeled_pair(train, test, data_root: str = "", protocol: str = "kNN", unknown: str = "error") -> tuple:
    """``(train_set, test_set, info)``: the data of ``train``/``test`` (specs or sources), both labeled,
    the test labels matched to the training classes (``match_classes``)."""
    train_set = build_dataset(train, data_root) if isinstance(train, str) else train
    test_set = build_dataset(test, data_root) if isinstance(test, str) else test
    for spec, ds in ((train, train_set), (test, test_set)):
        if not has_labels(ds):
            name = spec if isinstance(spec, str) else "a data source"
            raise ValueError(f"{protocol} needs labels: {name!r} is unlabeled (a folder needs root/<class>/... "
                             "sub-folders)")
    test_name = repr(test) if isinstance(test, str) else "the test data"
    test_set, info = match_classes(train_set, test_set, unknown, test_name)
    return train_set, test_set, info


def describe_classes(res: dict) -> str:
    """The classes a result was scored on, for the one-line summaries: ``4 classes by name: a, b, c, d``."""
    names = res.get("classes") or []
    text = f"{len(names)} classes" if names else "classes by position"
    if names:
        text += f" by {res.get('matched_by', 'name')}: " + ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    unknown = res.get("unknown_classes") or {}
    if unknown:
        parts = [f"{c} ({n} images)" if n is not None else c for c, n in list(unknown.items())[:4]]
        text += f"; not in training, scored as wrong: {', '.join(parts)}{', ...' if len(unknown) > 4 else ''}"
    return text
