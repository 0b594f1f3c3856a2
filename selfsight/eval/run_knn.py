"""kNN and linear-probe evaluation of a run (or a baseline) on a train/test pair of data sets."""
from __future__ import annotations

import time

import torch

from selfsight.eval.features import backbone_features, extract, pixel_features
from selfsight.runs import load_run
from selfsight.eval.knn import knn_accuracy
from selfsight.eval.labels import labeled_pair


def labeled_features(run: str, train: str, test: str, baseline: str | None = None, device: str | None = None,
                     data_root: str = "", batch_size: int = 512, features: str = "cls", protocol: str = "kNN",
                     unknown_classes: str = "error"):
    """Frozen features of a labeled train/test pair: (train_f, train_y, test_f, test_y, info).

    ``baseline="pixels"``: raw pixels at the run's input size, normalized as the run's inputs,
    mean-centred with the training-set mean (the stronger pixel baseline). ``"random"``: the
    same backbone at random initialisation. ``features``: cls | mean | cls+mean (see
    ``features.backbone_features``). The test labels are matched to the training classes by name
    (``labels.match_classes``; ``unknown_classes``: error | wrong). ``info``: model, method,
    backbone, train, test, features, and the classes scored.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if baseline not in (None, "pixels", "random"):
        raise ValueError(f"--baseline must be pixels or random, got {baseline!r}")
    model, cfg, pre = load_run(run, device, random_init=baseline == "random")
    train_set, test_set, classes = labeled_pair(train, test, data_root, protocol, unknown_classes)
    fn = pixel_features if baseline == "pixels" else backbone_features(model.backbone, features)
    train_f, train_y = extract(fn, train_set, pre, device, batch_size, desc="features of the training data")
    test_f, test_y = extract(fn, test_set, pre, device, batch_size, desc="features of the test data")
    if baseline == "pixels":
        mu = train_f.mean(0, keepdim=True)
        train_f, test_f = train_f - mu, test_f - mu
    info = {"model": baseline or "trained", "method": cfg.method.name, "backbone": cfg.backbone.name,
            "train": train, "test": test, "features": features, **classes}
    return train_f, train_y, test_f, test_y, info


def evaluate_knn(run: str, train: str, test: str, k: int = 20, temperature: float = 0.07,
                 baseline: str | None = None, device: str | None = None, data_root: str = "",
                 batch_size: int = 512, features: str = "cls", unknown_classes: str = "error") -> dict:
    """kNN top-1/top-5 of the run's evaluation backbone, or of a baseline on the same data
    (``labeled_features`` explains ``baseline`` and ``features``)."""
    t0 = time.perf_counter()
    train_f, train_y, test_f, test_y, info = labeled_features(run, train, test, baseline, device, data_root,
                                                              batch_size, features, unknown_classes=unknown_classes)
    acc = knn_accuracy(train_f, train_y, test_f, test_y, k, temperature)
    return {**info, "k": k, "temperature": temperature, **acc,
            "feature_dim": int(train_f.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}


def evaluate_linear(run: str, train: str, test: str, baseline: str | None = None, device: str | None = None,
                    data_root: str = "", batch_size: int = 512, features: str = "cls", epochs: int = 30,
                    batchnorm: bool = True, unknown_classes: str = "error") -> dict:
    """Linear-probe top-1/top-5 (``eval.linear.linear_probe``: features extracted once, lr and
    weight decay chosen on a held-out tenth of the training split) of a run or a baseline."""
    from selfsight.eval.linear import linear_probe
    t0 = time.perf_counter()
    train_f, train_y, test_f, test_y, info = labeled_features(run, train, test, baseline, device, data_root,
                                                              batch_size, features, protocol="the linear probe",
                                                              unknown_classes=unknown_classes)
    res = linear_probe(train_f, train_y, test_f, test_y, epochs=epochs, batchnorm=batchnorm)
    return {**info, **res, "feature_dim": int(train_f.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}
