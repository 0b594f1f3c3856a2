"""The collapse monitor: quiet on healthy embeddings and runs, loud on collapsed ones."""
import json
import logging
import math

import pytest
import torch
from helpers import tiny_overrides

from selfsight.engine.monitor import collapse_warning, embedding_stats, rankme
from selfsight.engine.trainer import pretrain
from selfsight.resolve import load_config


def test_stats_of_healthy_and_collapsed_embeddings():
    torch.manual_seed(0)
    healthy = embedding_stats(torch.randn(256, 64))
    assert healthy["embedding_std"] == pytest.approx(1 / math.sqrt(64), rel=0.1)
    assert healthy["embedding_std_ratio"] == pytest.approx(1.0, rel=0.1) and healthy["rankme"] > 40
    assert collapse_warning(healthy) is None
    constant = embedding_stats(torch.randn(1, 64).expand(256, 64) + 1e-6 * torch.randn(256, 64))
    assert constant["embedding_std_ratio"] < 1e-3 and constant["rankme"] < 1.1
    assert "collapsed" in collapse_warning(constant)
    one_direction = embedding_stats(torch.randn(256, 1) * torch.randn(1, 64))      # rank one, spread kept
    assert "directions" in collapse_warning(one_direction)


@pytest.mark.parametrize("shape", [(64, 200), (300, 48)])
def test_rankme_matches_the_papers_formula_on_singular_values(shape):
    """RankMe (Garrido et al. 2023, Eq. 1), written out from an SVD of z, against the Gram route."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -3, shape[1]))   # a decaying spectrum
    sigma = torch.linalg.svd(z.double(), full_matrices=False).S
    p = sigma / sigma.sum() + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


def run(tmp_path, fmnist_small, caplog, stop_gradient):
    cfg = load_config(overrides=tiny_overrides(**{
        "method.name": "simsiam", "method.stop_gradient": stop_gradient, "method.dim": 64,
        "method.pred_hidden_dim": 16, "train.steps": 240, "train.log_every": 20, "optim.lr": 1.0}))
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        pretrain(cfg, tmp_path / str(stop_gradient), dataset=fmnist_small)
    rows = [json.loads(x) for x in (tmp_path / str(stop_gradient) / "metrics.jsonl").read_text().splitlines()]
    return rows, [r.message for r in caplog.records if "collapse" in r.message]


def test_monitor_fires_on_simsiam_without_stop_gradient_and_not_with_it(tmp_path, fmnist_small, caplog):
    """Its projector ends in BN, so the collapse shows in the rank (measured: effective rank down to 1.3-2
    after 120-240 steps without the stop-gradient, 6-8 with it)."""
    rows, warnings = run(tmp_path, fmnist_small, caplog, "false")
    assert warnings and min(r["rankme"] for r in rows) < 2.0, rows[-1]
    caplog.clear()
    rows, warnings = run(tmp_path, fmnist_small, caplog, "true")
    assert not warnings and min(r["rankme"] for r in rows) > 4.0, rows[-1]
    assert rows[-1]["embedding_std_ratio"] > 0.8
    assert all(k in rows[-1] for k in ("embedding_std", "rankme"))
