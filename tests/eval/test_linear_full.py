"""The full-path linear probe (frozen backbone, augmented images every epoch): on real Fashion-MNIST it
beats chance by a wide margin, the backbone is left exactly as it was, and the CLI path on a folder."""
import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_overrides

from selfsight.data import ArrayDataset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist_small):
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path_factory.mktemp("full") / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), out, dataset=fmnist_small)
    return out


def test_beats_chance_and_leaves_the_backbone_unchanged(tiny_run, fmnist_small, fmnist_test):
    from selfsight.backbones.features import backbone_features
    from selfsight.eval.linear_full import linear_probe_full
    from selfsight.runs import load_run
    model, _, pre = load_run(tiny_run, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test = ArrayDataset(fmnist_test.images[:1000].clone(), fmnist_test.labels[:1000].clone())
    res = linear_probe_full(backbone_features(model.backbone), fmnist_small, test, pre, 10, epochs=3, lr=0.4,
                            batch_size=64, workers=0, crop_scale=(0.5, 1.0))
    assert res["steps"] == 3 * 32 and res["feature_dim"] == 64
    # chance is 0.1; a backbone after 2 steps of pretraining, crops of 50-100 %, 3 epochs
    assert res["top1"] > 0.4 and res["top5"] > res["top1"], res
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # weights and BN statistics
    assert not any(p.grad is not None for p in model.parameters())


def test_augmentations_are_fresh_every_epoch_and_reproducible(fmnist_small):
    from selfsight.eval.linear_full import augmented_batches
    pre = {"size": 28, "mean": [0.5], "std": [0.5], "channels": 1}
    data = ArrayDataset(fmnist_small.images[:64].clone(), fmnist_small.labels[:64].clone())
    e0 = list(augmented_batches(data, pre, 0, 32, "cpu"))
    e1 = list(augmented_batches(data, pre, 1, 32, "cpu"))
    again = list(augmented_batches(data, pre, 0, 32, "cpu"))
    assert e0[0][0].shape == (32, 1, 28, 28) and not torch.equal(e0[0][0], e1[0][0])
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))


def test_cli_full_path_on_a_labeled_folder(tiny_run, fmnist_small, tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    for i in range(200):
        d = root / f"class{int(fmnist_small.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(d / f"{i}.png")
    cmd = [sys.executable, "-m", "selfsight", "eval", "linear", str(tiny_run), "--train", str(root),
           "--test", str(root), "--full", "--epochs", "2", "--batch-size", "32", "--crop-min", "0.5",
           "--workers", "0", "--device", "cpu", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["protocol"] == "full" and res["epochs"] == 2 and res["feature_dim"] == 64
    assert 0.2 < res["top1"] <= 1.0 and res["steps"] == 2 * 7
