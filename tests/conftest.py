"""Shared fixtures: real Fashion-MNIST subsets (Debian package), small threads, temp caches. Helpers\nthe tests import are in ``helpers.py``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


THREADS = min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _same_threads():
    """Every test starts with the same torch thread count, whatever an earlier test or library set:
    the learning tests' numbers depend on it (float sums in another order)."""
    torch.set_num_threads(THREADS)
    yield


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
