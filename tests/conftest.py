"""Shared fixtures: real Fashion-MNIST subsets (Debian package), small threads, temp caches."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSIGHT_CACHE", str(tmp_path / "selfsight-cache"))


@pytest.fixture(scope="session")
def fmnist():
    from selfsight.data import build_dataset
    return build_dataset("fashion-mnist", download=False)


@pytest.fixture(scope="session")
def fmnist_test():
    from selfsight.data import build_dataset
    return build_dataset("fashion-mnist:test", download=False)


@pytest.fixture(scope="session")
def fmnist_small(fmnist):
    """The first 2,048 training images (balanced enough: all 10 classes)."""
    from selfsight.data import ArrayDataset
    return ArrayDataset(fmnist.images[:2048].clone(), fmnist.labels[:2048].clone(), name="fmnist-2k")


def tiny_overrides(**extra) -> list[str]:
    """A run small enough for tests: resnet10 of width 8 on 28 px views, fp32."""
    base = {"backbone.name": "resnet10", "backbone.width": 8, "backbone.small_stem": "s2", "views.size": 28,
            "data.batch_size": 32, "train.precision": "fp32", "train.progress": "false",
            "train.tensorboard": "false", "optim.name": "sgd", "optim.lr": 0.06, "optim.base_batch": 128,
            "optim.weight_decay": 5e-4, "optim.warmup_epochs": 0, "method.temperature": 0.5}
    if extra.get("method.name") in ("simsiam", "byol"):           # no temperature in these methods
        del base["method.temperature"]
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def small_knn(run, bank_set, test_set, n_test: int = 1000) -> dict:
    """kNN top-1 (k 20, T 0.07) on the first ``n_test`` test images with ``bank_set`` as the bank,
    for the run's trained backbone and for the same backbone at random init."""
    from selfsight.data import ArrayDataset
    from selfsight.eval.features import backbone_features, extract, load_run
    from selfsight.eval.knn import knn_accuracy
    test = ArrayDataset(test_set.images[:n_test].clone(), test_set.labels[:n_test].clone())
    acc = {}
    for name, random_init in (("random", True), ("trained", False)):
        model, _, pre = load_run(run, "cpu", random_init=random_init)
        fn = backbone_features(model.backbone)
        bank, bank_y = extract(fn, bank_set, pre, "cpu", 512)
        feats, y = extract(fn, test, pre, "cpu", 512)
        acc[name] = knn_accuracy(bank, bank_y, feats, y, 20, 0.07)["top1"]
    return acc
