"""Label-free health metrics: RankMe, alignment and uniformity equal references written here from the
papers' formulas (on real Fashion-MNIST pixels and views), behave as they should on rank-k and
collapsed embeddings, and the CLI's --json round trip on a trained run (labeled, unlabeled, folder)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import fmnist_view_pair, tiny_overrides

from selfsight.eval.health import alignment, evaluate_health, health_metrics, normalized_std, rankme, uniformity


@pytest.fixture(scope="module")
def pixels(fmnist):
    """200 real images as 14×14 pooled pixels (196 features), mean-centred."""
    x = torch.nn.functional.avg_pool2d(fmnist.images[:200].float() / 255, 2).flatten(1).double()
    return x - x.mean(0)


def ref_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. 2023, Eq. 1: RankMe = exp(-Σ_k p_k log p_k), p_k = σ_k / ‖σ‖₁ + ε."""
    s = np.linalg.svd(z, compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola 2020, Eq. 4: E_(x,y)~positive pairs ‖f(x) − f(y)‖₂^α, f L2-normalized."""
    total = 0.0
    for a, b in zip(x, y):
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        total += np.linalg.norm(a - b) ** alpha
    return total / len(x)


def ref_uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """Wang & Isola 2020, Eq. 5: log E_(x,y) i.i.d. exp(−t‖f(x) − f(y)‖₂²), over all distinct pairs."""
    f = [v / np.linalg.norm(v) for v in x]
    total, pairs = 0.0, 0
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            total += math.exp(-t * float(np.sum((f[i] - f[j]) ** 2)))
            pairs += 1
    return math.log(total / pairs)


def test_rankme_alignment_uniformity_equal_the_formulas_on_real_images(pixels, fmnist_small):
    x = pixels.numpy()
    assert rankme(pixels) == pytest.approx(ref_rankme(x), rel=1e-9)
    assert uniformity(pixels) == pytest.approx(ref_uniformity(x), rel=1e-9)
    assert uniformity(pixels, chunk=7) == pytest.approx(ref_uniformity(x), rel=1e-9)     # blocks change nothing
    # the authors' one-liner: torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
    xn = torch.nn.functional.normalize(pixels, dim=1)
    assert uniformity(pixels) == pytest.approx(float(torch.pdist(xn).pow(2).mul(-2).exp().mean().log()), rel=1e-9)
    v1, v2 = (v.flatten(1) for v in fmnist_view_pair(fmnist_small, 64))        # two augmented views of 64 images
    assert alignment(v1, v2) == pytest.approx(ref_alignment(v1.numpy(), v2.numpy()), rel=1e-9)
    assert alignment(v1, v1) == 0.0 and 0 < alignment(v1, v2) < 4


def test_rank_k_and_collapsed_embeddings():
    g = torch.Generator().manual_seed(0)
    n, d = 512, 64
    for k in (1, 5, 20):
        u = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        assert rankme(u @ v.T) == pytest.approx(k, rel=1e-3)                    # k equal singular values: exactly k
        gaussian = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g)
        assert 0.7 * k <= rankme(gaussian) <= k + 1e-3
    full = torch.randn(n, d, generator=g)
    assert rankme(full) > 0.85 * d
    constant = torch.randn(1, d, generator=g).expand(n, d)
    assert rankme(constant) == pytest.approx(1.0, abs=1e-3)
    assert normalized_std(constant) == pytest.approx(0.0, abs=1e-6)
    assert normalized_std(full) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    h = health_metrics(constant.clone(), constant.clone(), constant.clone())
    assert h["uniformity"] == pytest.approx(0.0, abs=1e-9) and h["alignment"] == pytest.approx(0.0, abs=1e-9)
    assert health_metrics(full)["uniformity"] < -1.5 and health_metrics(full)["embedding_std_ratio"] > 0.9


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist_small):
    from selfsight.engine.trainer import pretrain
    from selfsight.resolve import load_config
    out = tmp_path_factory.mktemp("health") / "run"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), out, dataset=fmnist_small)
    return out


def test_cli_json_round_trip(tiny_run):
    cmd = [sys.executable, "-m", "selfsight", "eval", "health", str(tiny_run), "--data", "fashion-mnist:test",
           "--images", "300", "--json", "--device", "cpu"]
    rows = {}
    for baseline in (None, "random"):
        p = subprocess.run(cmd + (["--baseline", baseline] if baseline else []), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        rows[baseline] = json.loads(p.stdout.strip().splitlines()[-1])
    r = rows[None]
    assert r["model"] == "trained" and rows["random"]["model"] == "random"
    assert r["n_images"] == 300 and r["feature_dim"] == 64 and r["rankme_max"] == 64
    assert 1 < r["rankme"] <= 64 and 0 < r["alignment"] < 4 and -4 <= r["uniformity"] < 0
    assert r["embedding_std_ratio"] == pytest.approx(r["embedding_std"] * 8)
    assert rows["random"]["rankme"] != r["rankme"]
    # the same numbers in process (images drawn and views augmented with the same seed)
    same = evaluate_health(str(tiny_run), "fashion-mnist:test", n_images=300, device="cpu")
    for key in ("rankme", "alignment", "uniformity", "embedding_std"):
        assert same[key] == pytest.approx(r[key], rel=1e-5), key
    p = subprocess.run(cmd[:-3], capture_output=True, text=True)                     # the plain-text line
    assert p.returncode == 0 and "RankMe" in p.stdout and "alignment" in p.stdout


def test_needs_no_labels_and_reads_folders(tiny_run, fmnist_small, tmp_path):
    from PIL import Image

    from selfsight.data import ArrayDataset
    unlabeled = ArrayDataset(fmnist_small.images[:100].clone())
    r = evaluate_health(str(tiny_run), "unlabeled", n_images=0, device="cpu", dataset=unlabeled)
    assert r["n_images"] == 100 and math.isfinite(r["alignment"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(fmnist_small.images[i, 0].numpy()).save(folder / f"{i}.png")
    r = evaluate_health(str(tiny_run), str(folder), n_images=30, device="cpu", workers=0)
    assert r["n_images"] == 30 and math.isfinite(r["rankme"]) and math.isfinite(r["alignment"])
