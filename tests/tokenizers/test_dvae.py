"""DVAE: the KL term against its formula, shapes and gradients, a short real training on
Fashion-MNIST, and the tokenizer artifact round trip."""
import math

import torch
import torch.nn.functional as F
from helpers import normalized

from selfsight.tokenizers import DVAE, load_tokenizer, save_tokenizer

PRE = {"size": 28, "mean": [0.5], "std": [0.5]}


def test_forward_loss_is_mse_plus_weighted_kl_to_uniform():
    torch.manual_seed(0)
    m = DVAE(1, vocab_size=10, hidden=8, downsample=4, kl_weight=0.3, dim=6)
    x = torch.randn(3, 1, 16, 16)
    torch.manual_seed(1)
    out = m(x, temperature=0.7)
    assert set(out) == {"loss", "recon", "ids", "monitor"}
    assert set(out["monitor"]) == {"recon_mse", "kl", "perplexity", "usage"}
    assert out["recon"].shape == x.shape and out["ids"].shape == (3, 4, 4) and out["ids"].dtype == torch.long
    logits = m.logits(x).detach()                                               # B×K×h×w
    q = logits.double().softmax(1).permute(0, 2, 3, 1).reshape(-1, 10)          # per token
    kl = sum(sum(float(p) * math.log(float(p) / (1 / 10)) for p in row) for row in q) / q.shape[0]
    assert abs(out["monitor"]["kl"].item() - kl) < 1e-5
    torch.testing.assert_close(out["monitor"]["recon_mse"], ((out["recon"] - x) ** 2).mean())
    torch.testing.assert_close(out["loss"], out["monitor"]["recon_mse"] + 0.3 * out["monitor"]["kl"])
    assert torch.equal(out["ids"], logits.argmax(1))
    assert torch.equal(m.encode(x), logits.argmax(1))                          # tokens: argmax, no noise
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_gumbel_relaxation_and_hard_decoding():
    torch.manual_seed(0)
    m = DVAE(1, vocab_size=7, hidden=8, downsample=2, dim=5).eval()
    x = torch.randn(2, 1, 8, 8)
    ids = m.encode(x)
    assert ids.shape == (2, 4, 4)
    one_hot = F.one_hot(ids, 7).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(m.decode_ids(ids), m.decoder(m.codebook(one_hot)))   # codebook rows
    # a very low temperature makes the relaxed sample (almost) one-hot: hard decoding with fresh noise
    logits = m.logits(x) * 50
    soft = F.gumbel_softmax(logits, tau=1e-3, dim=1)
    assert (soft.max(1).values > 0.99).float().mean() > 0.95


def train(fmnist_small, seed: int, steps: int = 150) -> dict:
    """vocab 64 on the 7×7 grid, Adam 3e-3, batch 64, τ annealed 1 → 0.1 (DALL-E anneals to 1/16)."""
    x = normalized(fmnist_small)
    ev = x[:256]
    torch.manual_seed(seed)
    m = DVAE(1, vocab_size=64, hidden=16, downsample=4, dim=16)
    with torch.no_grad():
        init = ((m.decode_ids(m.encode(ev)) - ev) ** 2).mean().item()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        out = m(x[torch.randint(0, len(x), (64,), generator=g)], temperature=0.1 ** (s / steps))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        final = ((m.decode_ids(m.encode(ev)) - ev) ** 2).mean().item()
    return {"init": init, "final": final, "used": m.encode(ev[:64]).unique().numel(),
            "monitor": {k: v.item() for k, v in out["monitor"].items()}}


def test_dvae_reconstructs_better_and_uses_the_codebook(fmnist_small):
    r = train(fmnist_small, seed=0)
    assert r["final"] < 0.3 * r["init"], r                                    # argmax tokens decode better
    assert r["monitor"]["recon_mse"] < 0.3 * r["init"], r
    assert r["used"] > 0.25 * 64, r                                            # > 25 % of the codes on a batch


def test_artifact_round_trip_gives_identical_ids(fmnist_small, tmp_path):
    torch.manual_seed(0)
    m = DVAE(1, vocab_size=32, hidden=8, dim=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = normalized(fmnist_small)[:32]
    for _ in range(3):
        out = m(x, 1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    ids = m.encode(x)
    save_tokenizer(m, "dvae", m.config, PRE, tmp_path / "dvae.pt")
    loaded, pre = load_tokenizer(tmp_path / "dvae.pt")
    assert pre == PRE and not loaded.training and loaded.vocab_size == 32 and isinstance(loaded, DVAE)
    assert all(not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(x), ids)
    torch.testing.assert_close(loaded.decode_ids(ids), m.decode_ids(ids))
