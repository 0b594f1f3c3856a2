"""The online linear probe (eval.online_probe): it leaves the backbone's gradients and weights exactly as
they are without it, it learns on real Fashion-MNIST during a short run, and it resumes."""
import json

import pytest
import torch
from helpers import tiny_overrides

from selfsight.config import ConfigError
from selfsight.data import num_classes_of
from selfsight.engine.online_probe import OnlineProbe
from selfsight.engine.trainer import Trainer, pretrain
from selfsight.resolve import load_config

PROBE = {"eval.online_probe": "true", "eval.online_probe_lr": 0.01}


def backbone_grads(tmp_path, fmnist_small, probe: bool, steps: int = 3) -> tuple[list, dict]:
    """The backbone's gradients at every optimizer step of a deterministic run, and its final state."""
    cfg = load_config(None, tiny_overrides(**{"train.steps": steps, "train.deterministic": "true",
                                              "train.checkpoint_every": 0, **(PROBE if probe else {})}))
    trainer = Trainer(cfg, tmp_path / f"probe-{probe}", dataset=fmnist_small)
    assert (trainer.probe is not None) == probe
    grads, step = [], trainer.optimizer.step

    def recording_step(*a, **k):
        grads.append({n: p.grad.clone() for n, p in trainer.model.backbone.named_parameters() if p.grad is not None})
        return step(*a, **k)
    trainer.optimizer.step = recording_step
    trainer.fit()
    return grads, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_the_probe_does_not_change_the_backbone_gradients(tmp_path, fmnist_small):
    off, state_off = backbone_grads(tmp_path, fmnist_small, probe=False)
    on, state_on = backbone_grads(tmp_path, fmnist_small, probe=True)
    assert len(off) == len(on) == 3 and off[0]
    for g_off, g_on in zip(off, on):          # step 1: same batch; steps 2-3: after the probe has run and learned
        assert g_off.keys() == g_on.keys()
        for name in g_off:
            assert torch.equal(g_off[name], g_on[name]), name
    for name in state_off:                    # weights, BN running statistics, everything of the method
        assert torch.equal(state_off[name], state_on[name]), name


def test_the_probe_learns_on_real_images_and_is_logged_per_epoch(tmp_path, fmnist_small):
    from selfsight.data import ArrayDataset
    data = ArrayDataset(fmnist_small.images[:1024].clone(), fmnist_small.labels[:1024].clone())
    # 1,024 images / 32 = 32 steps per epoch: two epochs, then a partial one
    cfg = load_config(None, tiny_overrides(**{"train.steps": 70, "train.log_every": 50, **PROBE}))
    pretrain(cfg, tmp_path / "run", dataset=data)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in rows if "online_probe_top1" in r]
    assert [r["step"] for r in probe] == [32, 64, 70] and all("loss" in r for r in rows)
    assert [r["online_probe_samples"] for r in probe] == [1024, 1024, 6 * 32]
    # chance is 0.1 (ten classes); the probe sees augmented views (crops of 8-100 %, colour jitter) of a
    # backbone that is still being trained (measured: 0.21, 0.30, 0.38)
    assert probe[0]["online_probe_top1"] > 0.17 and probe[1]["online_probe_top1"] > 0.25, probe
    assert probe[1]["online_probe_top1"] > probe[0]["online_probe_top1"]
    assert probe[1]["online_probe_loss"] < probe[0]["online_probe_loss"] < 2.3
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(ck["online_probe"]) == {"model", "optimizer"} and ck["online_probe"]["model"]["weight"].shape == (10, 64)


def test_a_resumed_run_continues_the_probe_exactly(tmp_path, fmnist_small, monkeypatch):
    """Stopped after step 10 and resumed, the probe ends as in the uninterrupted run (deterministic CPU)."""
    import shutil
    cfg = load_config(None, tiny_overrides(**{"train.steps": 20, "train.checkpoint_every": 10,
                                              "train.deterministic": "true", **PROBE}))
    save = Trainer.save

    def save_and_copy(self):
        save(self)
        if self.step == 10 and self.run_dir.name == "ref":          # the run as a kill after step 10 leaves it
            shutil.copytree(self.run_dir, tmp_path / "resumed", ignore=shutil.ignore_patterns("tb"))
    monkeypatch.setattr(Trainer, "save", save_and_copy)
    pretrain(cfg, tmp_path / "ref", dataset=fmnist_small)
    at10 = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert at10["step"] == 10 and at10["online_probe"]["optimizer"]["state"][0]["step"] == 10
    assert at10["online_probe"]["model"]["weight"].abs().sum() > 0
    pretrain(cfg, tmp_path / "resumed", resume=True, dataset=fmnist_small)
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["online_probe"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["online_probe"]
    assert b["optimizer"]["state"][0]["step"] == 20
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(b["optimizer"]["state"][0][k], a["optimizer"]["state"][0][k], rtol=1e-5, atol=1e-9)


def test_a_checkpoint_without_a_probe_resumes_with_a_fresh_one(tmp_path, fmnist_small):
    old = tmp_path / "old"
    pretrain(load_config(None, tiny_overrides(**{"train.steps": 2})), old, dataset=fmnist_small)
    trainer = Trainer(load_config(None, tiny_overrides(**{"train.steps": 4, **PROBE})), old, resume=True,
                      dataset=fmnist_small)
    trainer.load(old / "checkpoint.pt")
    assert trainer.step == 2 and trainer.probe.weight.abs().sum() == 0


def test_unlabeled_data_and_bad_keys(tmp_path, fmnist_small, caplog):
    from selfsight.data import ArrayDataset
    unlabeled = ArrayDataset(fmnist_small.images[:256].clone())
    assert num_classes_of(unlabeled) == 0 and num_classes_of(fmnist_small) == 10
    trainer = Trainer(load_config(None, tiny_overrides(**{"train.steps": 1, **PROBE})), tmp_path / "u",
                      dataset=unlabeled)
    assert trainer.probe is None and "no labels" in caplog.text
    with pytest.raises(ConfigError, match="did you mean 'eval.online_probe'"):
        load_config(None, ["eval.online_prob=true"])
    # unlabeled samples (-1) in a batch are left out; a batch of them is skipped
    probe = OnlineProbe(4, 3, lr=0.1)
    backbone = torch.nn.Linear(5, 4)
    backbone.forward_features = lambda x: type("F", (), {"cls": backbone(x)})()
    probe.step(backbone, torch.randn(8, 5), torch.full((8,), -1))
    assert probe.weight.abs().sum() == 0 and probe.epoch_stats() == {}
    probe.step(backbone, torch.randn(8, 5), torch.tensor([0, 1, 2, -1, -1, 0, 1, 2]))
    assert probe.weight.abs().sum() > 0 and probe.epoch_stats()["online_probe_samples"] == 6


def test_a_probe_step_reads_nothing_back_and_skips_bad_batches_on_the_device(fmnist_small):
    """Unlabeled samples weigh 0 (the same update as a probe stepped on the labeled ones alone), no
    read back of any value (reads of CPU tensors counted: the step runs the same on a GPU), and a
    batch with one labeled sample or a NaN feature leaves parameters, Adam state, running statistics
    and sums as they were."""
    from helpers import HostWaits
    x = fmnist_small.images[:32].double() / 255
    y = fmnist_small.labels[:32].clone()
    y[::3] = -1
    probe, ref, backbone = OnlineProbe(16, 10, lr=0.01).double(), OnlineProbe(16, 10, lr=0.01).double(), _Flat()
    for _ in range(2):
        with HostWaits(reads_on_cpu=True) as waits:
            probe.step(backbone, x, y)
        assert waits.found == []
        ref.step(backbone, x[y >= 0], y[y >= 0])
    torch.testing.assert_close(probe.state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-9)
    assert probe.epoch_stats(reset=False)["online_probe_samples"] == ref.epoch_stats()["online_probe_samples"]
    before = ({k: v.clone() for k, v in probe.state_dict().items()},
              {k: v.clone() for k, v in probe.optimizer.state_dict()["state"][0].items()})
    one_labeled = torch.full_like(y, -1)
    one_labeled[0] = 3
    nan_image = x.clone()
    nan_image[5] = float("nan")
    probe.step(backbone, x, one_labeled)
    probe.step(backbone, nan_image, y)
    torch.testing.assert_close(probe.state_dict(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(probe.optimizer.state_dict()["state"][0], before[1], rtol=0, atol=0)


class _Flat(torch.nn.Module):
    """A tiny backbone behind the contract (forward_features -> .cls)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(784, 16).double()
        self.embed_dim = 16

    def forward_features(self, x):
        from selfsight.backbones.base import Features
        return Features(self.net(x.flatten(1)))


def _probe_worker(rank, x, y):
    probe = OnlineProbe(16, 10, lr=0.01).double()
    backbone = _Flat()
    b = len(x) // 2
    for _ in range(3):
        probe.step(backbone, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
    return {"weight": probe.weight.detach().clone(), "bias": probe.bias.detach().clone(), "stats": probe.epoch_stats()}


def test_two_processes_average_the_probe_gradients(tmp_path, fmnist_small):
    """Under DDP each process's probe takes the mean of the two processes' gradients (its BatchNorm on
    its own half, as each process's backbone BN): both end identical, equal to one process that averages
    the two halves' gradients itself; the logged statistics cover both halves."""
    from helpers import run_on_gloo
    x = (fmnist_small.images[:64].double() / 255)
    y = fmnist_small.labels[:64]
    got = run_on_gloo(_probe_worker, tmp_path, x, y)
    ref = OnlineProbe(16, 10, lr=0.01).double()
    backbone = _Flat()
    for _ in range(3):
        grads = []
        for half in (slice(0, 32), slice(32, 64)):
            f = ref._backbone_features(backbone, x[half]).double()
            ref.zero_grad()
            torch.nn.functional.cross_entropy(ref(f), y[half]).backward()
            grads.append((ref.weight.grad.clone(), ref.bias.grad.clone()))
        ref.weight.grad, ref.bias.grad = [(a + b) / 2 for a, b in zip(*grads)]
        ref.optimizer.step()
    torch.testing.assert_close(got["weight"], ref.weight.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["bias"], ref.bias.detach(), rtol=1e-9, atol=1e-12)
    assert got["stats"]["online_probe_samples"] == 3 * 64
