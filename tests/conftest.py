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
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
