"""The public API: ``import selfsight`` stays light; pretrain -> evaluate -> export -> load_backbone
-> embed -> neighbors through ``selfsight.*`` on real Fashion-MNIST images in labeled folders."""
import subprocess
import sys

import pytest
import torch
from helpers import tiny_overrides
from PIL import Image

import selfsight


def test_import_is_lazy():
    code = ("import sys, selfsight; "
            "print('torch' in sys.modules, sorted(n for n in dir(selfsight) if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "load_backbone" in out and "embed" in out


def test_public_api_end_to_end(tmp_path, fmnist_small, fmnist_test):
    for split, images, labels in (("train", fmnist_small.images[:200], fmnist_small.labels[:200]),
                                  ("test", fmnist_test.images[:60], fmnist_test.labels[:60])):
        for i, (im, y) in enumerate(zip(images, labels)):
            d = tmp_path / split / f"c{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im[0].numpy()).save(d / f"{i:04d}.png")
    cfg = selfsight.load_config(None, tiny_overrides(**{"train.steps": 7}))      # "key=value" strings
    res = selfsight.pretrain(cfg, tmp_path / "run", overrides={"train.steps": 2}, dataset=fmnist_small)
    assert res["steps"] == 2
    knn = selfsight.evaluate(tmp_path / "run", str(tmp_path / "train"), str(tmp_path / "test"), protocol="knn", k=5)
    assert knn["k"] == 5 and 0.3 < knn["top1"] <= 1.0                   # 10 classes: far above chance
    health = selfsight.evaluate(tmp_path / "run", str(tmp_path / "train"), protocol="health", n_images=64)
    assert 1.0 < health["rankme"] <= 64
    with pytest.raises(ValueError, match="knn, linear, finetune, seg or health"):
        selfsight.evaluate(tmp_path / "run", protocol="nope")
    meta = selfsight.export(tmp_path / "run", tmp_path / "b.safetensors")
    assert meta["feature_dim"] == 64 and meta["config"]["train"]["steps"] == 2
    net, pre = selfsight.load_backbone(tmp_path / "b.safetensors")
    x = pre(Image.open(tmp_path / "test" / "c9" / "0000.png"))
    assert x.shape == (1, 28, 28) and net(x[None]).shape == (1, 64)
    out = selfsight.embed(tmp_path / "b.safetensors", tmp_path / "test", tmp_path / "e.npy", workers=0,
                          progress=False)
    assert out["count"] == 60
    rows = selfsight.neighbors(tmp_path / "e.npy", "c9/0000.png", k=3)
    assert len(rows) == 3 and "c9/0000.png" not in [r["file"] for r in rows]
    cfg = selfsight.load_config("simclr_fashion_mnist", ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.method.name == "simclr"
    assert torch.is_tensor(pre.mean)


def test_export_keeps_the_backbone_evaluation_uses(tmp_path, fmnist_small, fmnist_test):
    """DINO evaluates its EMA teacher: the export holds the teacher's weights, not the student's."""
    from helpers import normalized

    from selfsight.data import ArrayDataset
    from selfsight.runs import load_run
    over = tiny_overrides(**{"method.name": "dino", "train.steps": 2, "method.out_dim": 256, "method.hidden_dim": 64,
                             "method.bottleneck_dim": 32, "method.momentum": 0.5})
    selfsight.pretrain(selfsight.load_config(None, over), tmp_path / "dino", dataset=fmnist_small)
    selfsight.export(tmp_path / "dino", tmp_path / "d.safetensors")
    net, _ = selfsight.load_backbone(tmp_path / "d.safetensors")
    model, _, _ = load_run(tmp_path / "dino")
    x = normalized(ArrayDataset(fmnist_test.images[:16].clone()))
    with torch.no_grad():
        got, teacher, student = net(x), model.teacher(x), model.student(x)
    assert (got - teacher).abs().max() <= 1e-6
    assert (got - student).abs().max() > 1e-3                          # after 2 steps the EMA teacher differs
