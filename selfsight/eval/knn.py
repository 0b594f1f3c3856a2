"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018; DINO
``eval_knn.py``; methods.md §0.5): cosine similarity on L2-normalized features, the top-k
training neighbours vote with weight exp(sim / T)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from selfsight.eval.features import labeled_features


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024, bank_chunk: int = 262_144) -> torch.Tensor:
    """Class scores (N_test × C) for the test features.

    The bank is scanned in chunks of ``bank_chunk`` rows, keeping a running top-k per test
    row, so a bank of millions of features never needs an N_test × N_train matrix.
    """
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for i in range(0, len(test), chunk):
        q = test[i:i + chunk]                                                   # Q×D
        best_sim = torch.full((len(q), 0), -2.0)
        best_idx = torch.zeros((len(q), 0), dtype=torch.long)
        for j in range(0, len(bank), bank_chunk):
            sim = q @ bank[j:j + bank_chunk].T                                  # Q×Bc
            s, idx = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, pos = torch.cat([best_sim, s], 1).topk(min(k, best_sim.shape[1] + s.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + j], 1).gather(1, pos)
        weights = (best_sim / temperature).exp()                                # Q×k
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[best_idx].long(), weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    out = {}
    for k in ks:
        k_ = min(k, scores.shape[1])
        hit = (scores.topk(k_, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = hit
    return out


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07) -> dict:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return topk_accuracy(scores, test_labels)


def evaluate_knn(run: str, train: str, test: str, k: int = 20, temperature: float = 0.07,
                 baseline: str | None = None, device: str | None = None, data_root: str = "",
                 batch_size: int = 512, features: str = "cls", unknown_classes: str = "error") -> dict:
    """kNN top-1/top-5 of the run's evaluation backbone, or of a baseline on the same data
    (``features.labeled_features`` explains ``baseline``, ``features`` and ``unknown_classes``)."""
    t0 = time.perf_counter()
    train_f, train_y, test_f, test_y, info = labeled_features(run, train, test, baseline, device, data_root,
                                                              batch_size, features, unknown_classes=unknown_classes)
    acc = knn_accuracy(train_f, train_y, test_f, test_y, k, temperature)
    return {**info, "k": k, "temperature": temperature, **acc,
            "feature_dim": int(train_f.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}
