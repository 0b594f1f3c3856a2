"""Weighted kNN against a brute-force reference, and on real Fashion-MNIST pixels."""
import pytest
import torch
import torch.nn.functional as F

from selfsight.eval.knn import knn_accuracy, knn_classify


def reference_knn(train, labels, test, k, t, c):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = torch.zeros(len(test), c)
    for i, q in enumerate(test):
        sims = train @ q
        top = sims.argsort(descending=True)[:k]
        for j in top:
            out[i, labels[j]] += torch.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_and_chunking_changes_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    train, test = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    ref = reference_knn(train, labels, test, 7, 0.1, 5)
    torch.testing.assert_close(knn_classify(train, labels, test, 7, 0.1, 5), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(knn_classify(train, labels, test, 7, 0.1, 5, chunk=9, bank_chunk=13), ref,
                               rtol=1e-4, atol=1e-4)


def test_pixels_of_real_images_classify_well(fmnist, fmnist_test):
    train = fmnist.images[:10000].flatten(1).float()
    test = fmnist_test.images[:1000].flatten(1).float()
    acc = knn_accuracy(train, fmnist.labels[:10000], test, fmnist_test.labels[:1000])
    assert 0.75 < acc["top1"] < 0.9 and acc["top5"] > acc["top1"]


def test_unlabeled_data_is_a_clear_error(tmp_path, fmnist_small, monkeypatch):
    from helpers import tiny_overrides

    from selfsight.data import ArrayDataset
    from selfsight.engine.trainer import pretrain
    from selfsight.eval import knn, labels
    from selfsight.resolve import load_config
    pretrain(load_config(overrides=tiny_overrides(**{"train.steps": 1})), tmp_path / "r", dataset=fmnist_small)
    unlabeled = ArrayDataset(fmnist_small.images[:64])
    monkeypatch.setattr(labels, "build_dataset", lambda spec, root="": unlabeled)
    with pytest.raises(ValueError, match="unlabeled"):
        knn.evaluate_knn(str(tmp_path / "r"), "x", "y")
