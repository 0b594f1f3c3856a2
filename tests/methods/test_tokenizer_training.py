"""Training tokenizers through the one training loop (``selfsight tokenizer train``), the artifact
they leave, and BEiT / BEiT v2 on their ids: cross-entropy over the masked positions only."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from selfsight.engine.trainer import pretrain
from selfsight.methods import build_method
from selfsight.resolve import load_config
from selfsight.targets import load_tokenizer

SMALL_TOKENIZER = {"method.vocab_size": 64, "method.hidden": 16, "method.dim": 8, "data.batch_size": 64,
                   "train.precision": "fp32", "train.progress": "false", "train.tensorboard": "false",
                   "train.log_every": 5, "views.preset": "small", "views.size": 28}


def tokenizer_cfg(**extra):
    return load_config(None, [f"{k}={v}" for k, v in {"method.name": "tokenizer", **SMALL_TOKENIZER,
                                                       **extra}.items()])


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("tok") / "vq"
    pretrain(tokenizer_cfg(**{"method.kind": "vq", "train.steps": 40}), out, dataset=fmnist_small)
    return out


def beit_cfg(tokenizer: str, name: str = "beit", **extra):
    base = {"method.name": name, "method.target.tokenizer": tokenizer, "method.mask.min_patches": 4,
            "backbone.name": "vit_tiny", "backbone.patch_size": 4, "backbone.depth": 2, "views.size": 28,
            "views.preset": "small", "data.batch_size": 32, "train.precision": "fp32", "train.progress": "false",
            "train.tensorboard": "false", "train.log_every": 5, "optim.warmup_epochs": 0, "optim.lr": 2e-3,
            "optim.base_batch": 32, "optim.clip_grad": 3.0}
    if name == "beitv2":              # the preset's patch aggregation (layer 9 of 12) on the 2-block ViT: layer 1
        base["method.head.aggregation_layer"] = 1
    return load_config(None, [f"{k}={v}" for k, v in {**base, **extra}.items()])


def test_vq_tokenizer_run_leaves_an_artifact_pictures_and_codebook_stats(vq_run, fmnist_small):
    rows = metrics(vq_run)
    assert {"perplexity", "usage", "recon_mse"} <= set(rows[-1])
    assert rows[-1]["recon_mse"] < rows[0]["recon_mse"]
    assert (vq_run / "pictures" / "reconstructions.png").stat().st_size > 0
    tok, pre = load_tokenizer(vq_run / "tokenizer.pt")
    assert tok.vocab_size == 64 and pre["size"] == 28 and pre["channels"] == 1 and not tok.training
    x = (fmnist_small.images[:16].float() / 255 - pre["mean"][0]) / pre["std"][0]
    ids = tok.encode(x)
    assert ids.shape == (16, 7, 7) and ids.dtype == torch.long and int(ids.max()) < 64
    assert len(ids.unique()) > 4                                  # not a collapsed codebook


def test_dvae_temperature_is_annealed_per_step(tmp_path, fmnist_small):
    cfg = tokenizer_cfg(**{"method.kind": "dvae", "train.steps": 20, "method.temperature": 1.0,
                           "method.temperature_end": 0.0625})
    pretrain(cfg, tmp_path / "dvae", dataset=fmnist_small)
    temps = [r["temperature"] for r in metrics(tmp_path / "dvae")]
    assert temps[0] > temps[-1] and temps == sorted(temps, reverse=True) and 0.0625 <= temps[-1] < 0.3
    tok, _ = load_tokenizer(tmp_path / "dvae" / "tokenizer.pt")
    assert tok.encode(torch.zeros(2, 1, 28, 28)).shape == (2, 7, 7)


def test_vqkd_distils_a_frozen_teacher_run_that_is_not_checkpointed(tmp_path, fmnist_small):
    from helpers import tiny_overrides
    teacher = tmp_path / "teacher"
    pretrain(load_config(None, tiny_overrides(**{"method.name": "simclr", "train.steps": 2})), teacher,
             dataset=fmnist_small)
    cfg = tokenizer_cfg(**{"method.kind": "vq", "method.target": "teacher", "method.teacher": str(teacher),
                           "train.steps": 10})
    pretrain(cfg, tmp_path / "vqkd", dataset=fmnist_small)
    rows = metrics(tmp_path / "vqkd")
    assert -1 <= rows[-1]["cosine"] <= 1                                     # mean cosine to the teacher
    ck = torch.load(tmp_path / "vqkd" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("teacher") for k in ck["model"])             # frozen teacher: not saved
    saved = load_config([str(tmp_path / "vqkd" / "config.yaml")])
    assert saved.method.teacher_dim > 0                                      # width written back


def test_tokenizer_options_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match="method.kind"):
        build_method(tokenizer_cfg(**{"method.kind": "vqgan", "train.steps": 1}), 1, 28)
    with pytest.raises(ValueError, match="needs method.kind=vq"):
        build_method(tokenizer_cfg(**{"method.kind": "dvae", "method.target": "teacher", "train.steps": 1}), 1, 28)
    with pytest.raises(ValueError, match="method.teacher"):
        build_method(tokenizer_cfg(**{"method.kind": "vq", "method.target": "teacher", "train.steps": 1}), 1, 28)


def test_beit_cross_entropy_counts_the_masked_positions_only(vq_run, fmnist_small):
    cfg = beit_cfg(str(vq_run / "tokenizer.pt"), **{"train.steps": 1})
    model = build_method(cfg, 1, 28).eval()
    assert model.params.loss == "ce" and model.params.student_input == "dense"
    x = (fmnist_small.images[:8].float() / 255 - 0.5) / 0.5
    masks = model.make_masker()([x], seed=0)                                 # per view: B×7×7 or None
    batch = {"views": [x], "masks": masks}
    loss = model(batch, {})["loss"]
    mask = masks[0].flatten(1)                                               # B×N, True = masked
    assert 0 < mask.float().mean() < 0.8
    pred, _, _, grid, _ = model.encode(x, mask)                               # B×N×K logits of every token
    ids = model.target(x, grid)                                              # B×N token ids, intact view
    reference = -F.log_softmax(pred[mask].float(), -1).gather(1, ids[mask][:, None]).mean()
    torch.testing.assert_close(loss, reference)
    # ids changed at visible positions leave the loss alone; at a masked position they move it: the
    # id of that position's smallest logit (the largest -log p) raises the loss by exactly its share
    real_target = model.target

    class ChangedIds(torch.nn.Module):
        discrete = True

        def __init__(self, where, new_id=None):
            super().__init__()
            self.where, self.new_id = where, new_id

        def forward(self, xx, g):
            t = real_target(xx, g).clone()
            t[self.where] = (t[self.where] + 1) % 64 if self.new_id is None else self.new_id
            return t

    model.target = ChangedIds(~mask)
    torch.testing.assert_close(model(batch, {})["loss"], loss)
    first = int(mask.view(-1).nonzero()[0])
    first_masked = torch.zeros_like(mask)
    first_masked.view(-1)[first] = True
    logits = pred.flatten(0, 1)[first].float()
    worst = int(logits.argmin())
    assert worst != int(ids.view(-1)[first])
    model.target = ChangedIds(first_masked, worst)
    changed = ids.clone()
    changed[first_masked] = worst
    moved = model(batch, {})["loss"]
    torch.testing.assert_close(moved, -F.log_softmax(pred[mask].float(), -1).gather(1, changed[mask][:, None]).mean())
    assert moved > loss


@pytest.mark.slow
@pytest.mark.parametrize("name", ["beit", "beitv2"])
def test_beit_learns_the_tokenizer_ids_on_real_images(tmp_path, vq_run, fmnist_small, name):
    cfg = beit_cfg(str(vq_run / "tokenizer.pt"), name, **{"train.steps": 40})
    pretrain(cfg, tmp_path / name, dataset=fmnist_small)
    ls = [r["loss"] for r in metrics(tmp_path / name)]
    assert ls[0] > 2.0 and sum(ls[-2:]) / 2 < 0.9 * ls[0], ls                 # CE falls from about ln 64
    if name == "beitv2":                                                      # and so does the aggregation branch's
        agg = [r["aggregation_loss"] for r in metrics(tmp_path / name)]
        assert sum(agg[-2:]) / 2 < 0.9 * agg[0], agg
    ck = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
    assert any("gamma" in k for k in ck["model"])                            # LayerScale on


@pytest.mark.slow
def test_cli_trains_a_tokenizer_and_refuses_vqkd_without_teacher(tmp_path):
    py = [sys.executable, "-m", "selfsight", "tokenizer", "train"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    p = subprocess.run([*py, "--kind", "vqkd", "--data", "fashion-mnist", "--out", str(tmp_path / "x"), "--steps", "1"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "--teacher" in p.stderr and "Traceback" not in p.stderr
    out = tmp_path / "tok"
    p = subprocess.run([*py, "--kind", "vq", "--data", "fashion-mnist", "--out", str(out), "--steps", "3",
                        *[f"{k}={v}" for k, v in SMALL_TOKENIZER.items()]], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["tokenizer"] == str(out / "tokenizer.pt")
    assert (out / "tokenizer.pt").exists()
    p = subprocess.run([sys.executable, "-m", "selfsight", "eval", "knn", str(out), "--train", "fashion-mnist",
                        "--test", "fashion-mnist:test"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "tokenizer run" in p.stderr
