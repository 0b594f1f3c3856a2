"""The linear probe: on real Fashion-MNIST pixels it matches scikit-learn's logistic regression
on the same standardised features; its sweep picks on held-out training data only; the CLI path."""
import json
import subprocess
import sys

import pytest
import torch

from selfsight.eval.linear import linear_probe


@pytest.fixture(scope="module")
def pixels(fmnist):
    """Real images as 14×14 pooled pixels (196 features, so that the reference solver is quick)."""
    x = torch.nn.functional.avg_pool2d(fmnist.images[:4000].float() / 255, 2).flatten(1)
    y = fmnist.labels[:4000]
    return x[:3000], y[:3000], x[3000:], y[3000:]


def test_matches_scikit_learn_logistic_regression_on_raw_pixels(pixels):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    xtr, ytr, xte, yte = pixels
    res = linear_probe(xtr, ytr, xte, yte, epochs=10)
    scaler = StandardScaler().fit(xtr.numpy())
    clf = LogisticRegression(C=0.05, max_iter=2000).fit(scaler.transform(xtr.numpy()), ytr.numpy())
    reference = float((clf.predict(scaler.transform(xte.numpy())) == yte.numpy()).mean())
    assert 0.75 < reference < 0.9
    assert abs(res["top1"] - reference) < 0.03, (res["top1"], reference)
    assert res["top5"] > res["top1"] and len(res["sweep"]) == 6
    assert res["val_top1"] == max(r["val_top1"] for r in res["sweep"])


def test_the_sweep_never_sees_the_test_split(pixels):
    xtr, ytr, xte, yte = pixels
    a = linear_probe(xtr, ytr, xte, yte, epochs=3)
    b = linear_probe(xtr, ytr, xte.flip(0), yte.flip(0) * 0, epochs=3)     # other test data and labels
    assert (a["lr"], a["weight_decay"], a["val_top1"]) == (b["lr"], b["weight_decay"], b["val_top1"])
    assert b["top1"] != a["top1"]


@pytest.mark.slow
def test_cli_linear_probe_on_a_run_and_the_pixel_baseline(tmp_path, fmnist_small):
    from helpers import tiny_overrides

    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), out, dataset=fmnist_small)
    rows = {}
    for baseline in (None, "pixels"):
        cmd = [sys.executable, "-m", "selfsight", "eval", "linear", str(out), "--train", "fashion-mnist:test",
               "--test", "fashion-mnist:test", "--epochs", "2", "--json"] + (["--baseline", baseline] if baseline else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        rows[baseline] = json.loads(p.stdout.strip().splitlines()[-1])
    assert rows[None]["feature_dim"] == 64 and rows["pixels"]["feature_dim"] == 784
    assert rows["pixels"]["top1"] > 0.75 and 0.1 < rows[None]["top1"] <= 1.0


def test_stacked_sweep_trains_each_pair_as_torch_sgd_would(pixels):
    """Each classifier of the stacked sweep equals an nn.Linear trained by torch.optim.SGD
    (momentum 0.9, weight decay on the weight only) on the same batches with the same cosine lr."""
    import math

    from selfsight.eval.linear import train_linear
    xtr, ytr = pixels[0][:500], pixels[1][:500]
    lrs, wds, epochs, bs = (0.01, 0.1), (0.0, 1e-3), 2, 128
    stacked = train_linear(xtr, ytr, 10, lrs, wds, epochs, bs, seed=0)
    for s, (lr, wd) in enumerate([(a, b) for a in lrs for b in wds]):
        ref = torch.nn.Linear(xtr.shape[1], 10)
        torch.nn.init.zeros_(ref.weight)
        torch.nn.init.zeros_(ref.bias)
        opt = torch.optim.SGD([{"params": [ref.weight], "weight_decay": wd}, {"params": [ref.bias], "weight_decay": 0}],
                              lr=lr, momentum=0.9)
        g, step, total = torch.Generator().manual_seed(0), 0, epochs * math.ceil(500 / bs)
        for _ in range(epochs):
            order = torch.randperm(500, generator=g)
            for i in range(0, 500, bs):
                idx = order[i:i + bs]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ref(xtr[idx]), ytr[idx]).backward()
                opt.step()
                step += 1
        torch.testing.assert_close(stacked.weight[s], ref.weight.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stacked.bias[s, 0], ref.bias, rtol=1e-4, atol=1e-6)
