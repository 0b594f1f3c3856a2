"""Sinkhorn-Knopp centering (losses/sinkhorn.py) against SwAV's Algorithm 1 written in numpy: the
rows are assignments (sum 1), the prototypes share the batch (columns sum to n/K as the iterations
converge), 2 gloo processes equal one process with the global batch, and large logits at a sharp
temperature do not overflow."""
import numpy as np
import pytest
import torch
from helpers import run_on_gloo

from selfsight.losses.sinkhorn import sinkhorn_knopp


def reference(logits: np.ndarray, tau: float, iterations: int) -> np.ndarray:
    q = np.exp(logits / tau).T                       # K×n
    k, n = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True)
        q /= k
        q /= q.sum(0, keepdims=True)
        q /= n
    return (q * n).T


def test_matches_the_algorithm_and_rows_and_columns_sum_as_the_paper_says():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 10, generator=g, dtype=torch.float64)
    p = sinkhorn_knopp(logits, 0.5, 3)
    np.testing.assert_allclose(p.numpy(), reference(logits.numpy(), 0.5, 3), rtol=1e-12)
    torch.testing.assert_close(p.sum(1), torch.ones(24, dtype=torch.float64))       # each sample: a distribution
    assert (p.sum(0) - 24 / 10).abs().max() < 0.5                                   # 3 iterations: near n/K
    converged = sinkhorn_knopp(logits, 0.5, 200)
    torch.testing.assert_close(converged.sum(0), torch.full((10,), 2.4, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # unlike a softmax, it spreads a batch that prefers one prototype over all of them
    biased = logits.clone()
    biased[:, 0] += 6.0
    assert torch.softmax(biased / 0.5, 1).argmax(1).eq(0).all()
    assert sinkhorn_knopp(biased, 0.5, 3).argmax(1).unique().numel() > 5


def test_large_logits_at_a_sharp_temperature_stay_finite():
    logits = torch.tensor([[100.0, 90.0, 0.0], [95.0, 99.0, 1.0], [80.0, 0.0, 100.0]])
    p = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    assert sinkhorn_knopp(torch.zeros(0, 3), 0.04).shape == (0, 3)                 # no rows: nothing to assign
    with pytest.raises(ValueError, match="at least 1 iteration"):
        sinkhorn_knopp(logits, 0.1, 0)


def _worker(rank, logits, sizes):
    start = sum(sizes[:rank])
    return {"p": sinkhorn_knopp(logits[start:start + sizes[rank]], 0.1, 3), "start": start}


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 12, generator=g, dtype=torch.float64)
    got = run_on_gloo(_worker, tmp_path, logits, [5, 11])          # unequal shares, as masked patch counts
    torch.testing.assert_close(got["p"], sinkhorn_knopp(logits, 0.1, 3)[:5], rtol=1e-12, atol=1e-14)
