"""VQTokenizer: VQ-VAE (pixels) and VQ-KD (teacher features) trained briefly on real
Fashion-MNIST images; the tokenizer artifact round trip."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from helpers import normalized

from selfsight.tokenizers import TOKENIZERS, VQTokenizer, load_tokenizer, save_tokenizer

PRE = {"size": 28, "mean": [0.5], "std": [0.5]}


def token_mse(tok, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((tok.decode_ids(tok.encode(x)) - x) ** 2).mean().item()


def train_pixels(fmnist_small, seed: int, steps: int = 150) -> dict:
    """VQ-VAE, vocab 64 on the 7×7 grid of 28 px images, Adam, batch 64. decay 0.95: an EMA horizon
    of 20 steps fits a 150-step run (0.99 is for long runs)."""
    x = normalized(fmnist_small)
    ev = x[:256]
    torch.manual_seed(seed)
    tok = VQTokenizer(1, vocab_size=64, dim=16, hidden=16, downsample=4, decay=0.95)
    init_mse = token_mse(tok, ev)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        out = tok(x[torch.randint(0, len(x), (64,), generator=g)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    tok.eval()
    used = tok.encode(ev[:64]).unique().numel()
    return {"init": init_mse, "final": token_mse(tok, ev), "used": used, "out": out}


def test_vq_vae_reconstructs_better_and_uses_the_codebook(fmnist_small):
    r = train_pixels(fmnist_small, seed=0)
    assert r["final"] < 0.3 * r["init"], r
    assert r["used"] > 0.25 * 64, r                                            # > 25 % of the codes on a batch
    out = r["out"]
    assert set(out) == {"loss", "recon", "ids", "monitor"}
    assert out["recon"].shape == (64, 1, 28, 28) and out["ids"].shape == (64, 7, 7)
    assert {"recon_mse", "perplexity", "usage", "commit_loss"} <= set(out["monitor"])
    assert out["monitor"]["usage"] > 0.25


def teacher_net() -> nn.Module:
    """A frozen random conv net: 28 px image -> 24 channels on the 7×7 token grid."""
    torch.manual_seed(123)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 4, stride=4))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def cosine_loss(tok, teacher, x) -> float:
    with torch.no_grad():
        return 1 - tok(x, teacher(x))["monitor"]["cosine"].item()


def train_features(fmnist_small, seed: int, steps: int = 100) -> dict:
    """VQ-KD against the frozen random teacher, vocab 64, Adam, batch 64."""
    x = normalized(fmnist_small)
    ev = x[:128]
    teacher = teacher_net()
    torch.manual_seed(seed)
    tok = VQTokenizer(1, vocab_size=64, dim=16, hidden=16, target="features", feature_dim=24, decay=0.95)
    before = cosine_loss(tok.eval(), teacher, ev)
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (64,), generator=g)]
        with torch.no_grad():
            feats = teacher(xb)                                               # B×24×7×7
        out = tok(xb, feats)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(1 - out["monitor"]["cosine"].item())
    tok.eval()
    return {"before": before, "after": cosine_loss(tok, teacher, ev), "losses": losses, "out": out, "tok": tok,
            "used": tok.encode(ev[:64]).unique().numel()}


def test_vq_kd_cosine_loss_decreases(fmnist_small):
    r = train_features(fmnist_small, seed=0)
    assert r["after"] < 0.5 * r["before"], (r["before"], r["after"])
    assert sum(r["losses"][-10:]) < 0.6 * sum(r["losses"][:10]), r["losses"]
    assert r["out"]["recon"] is None and r["out"]["ids"].shape == (64, 7, 7)
    assert r["used"] > 0.25 * 64
    ev = normalized(fmnist_small)[:2]
    assert r["tok"].decode_ids(r["tok"].encode(ev)).shape == (2, 24, 7, 7)


def test_vq_kd_needs_matching_teacher_features():
    tok = VQTokenizer(1, vocab_size=8, dim=4, hidden=8, target="features", feature_dim=5)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="target_features"):
        tok(x)
    with pytest.raises(ValueError, match="B×feature_dim×h×w"):
        tok(x, torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="feature_dim"):
        VQTokenizer(1, target="features")
    with pytest.raises(ValueError, match="target must be one of"):
        VQTokenizer(1, target="hog")
    with pytest.raises(ValueError, match="not divisible"):
        VQTokenizer(1, vocab_size=8, dim=4, hidden=8).encode(torch.randn(1, 1, 10, 10))


def briefly_trained_vq(fmnist_small, **kw) -> VQTokenizer:
    torch.manual_seed(0)
    tok = VQTokenizer(1, vocab_size=32, dim=8, hidden=8, **kw)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    x = normalized(fmnist_small)[:32]
    for _ in range(3):
        out = tok(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return tok


def test_artifact_round_trip_gives_identical_ids(fmnist_small, tmp_path):
    assert "vq" in TOKENIZERS and "dvae" in TOKENIZERS
    tok = briefly_trained_vq(fmnist_small)
    assert bool(tok.quantizer.initialised)
    x = normalized(fmnist_small)[64:128]
    ids = tok.eval().encode(x)
    save_tokenizer(tok, "vq", tok.config, PRE, tmp_path / "vq.pt")
    loaded, pre = load_tokenizer(tmp_path / "vq.pt")
    assert pre == PRE and not loaded.training and loaded.vocab_size == 32
    assert all(not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(x), ids)
    for k, v in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert {"quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum",
            "quantizer.initialised"} <= set(loaded.state_dict())
    # a loaded tokenizer that goes on training does not re-run k-means
    loaded.train()
    cb = loaded.quantizer.codebook.clone()
    loaded(x[:4])
    assert (loaded.quantizer.codebook - cb).abs().max() < 0.2


def test_load_tokenizer_registers_the_kinds_itself(fmnist_small, tmp_path):
    """A fresh interpreter that only imports selfsight.targets.tokens can load a "vq" artifact."""
    tok = briefly_trained_vq(fmnist_small).eval()
    x = normalized(fmnist_small)[:8]
    torch.save(x, tmp_path / "x.pt")
    torch.save(tok.encode(x), tmp_path / "ids.pt")
    save_tokenizer(tok, "vq", tok.config, PRE, tmp_path / "vq.pt")
    code = ("import sys, torch\nfrom selfsight.tokenizers import load_tokenizer\n"
            f"tok, pre = load_tokenizer({str(tmp_path / 'vq.pt')!r})\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"assert torch.equal(tok.encode(x), torch.load({str(tmp_path / 'ids.pt')!r}))\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_mixed_precision_training_step_and_fp32_tokens():
    """Under autocast the quantizer stays float32 and encode() ignores the caller's autocast."""
    from selfsight.tokenizers import DVAE
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    for tok in (VQTokenizer(1, vocab_size=16, dim=4, hidden=8), DVAE(1, vocab_size=16, hidden=8, dim=4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tok(x)
            ids_amp = tok.eval().encode(x)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())
        assert torch.equal(ids_amp, tok.encode(x))
