"""FSDP (``train.fsdp``, engine/sharding.py) on 2 gloo processes:

- a sharded DINO ViT (student, EMA teacher, head) trained 2 steps equals one process with the
  global batch, in float64 (the sharded gradients, AdamW and EMA are DDP's arithmetic);
- the Trainer with ``train.fsdp=true`` equals the Trainer under DDP (same data, same RNG), its
  checkpoint holds the full unsharded state, a stopped sharded run resumes exactly, sharded or
  not, and a DDP checkpoint is refused by a sharded run with one line."""
import pytest
import torch
from helpers import run_on_gloo

from selfsight.engine.sharding import shard_units
from selfsight.engine.trainer import Trainer
from selfsight.files import safe_load
from selfsight.methods import build_method
from selfsight.resolve import build_config, load_config

WORLD = 2
STEPS = 12
SCHED = {"momentum": 0.9, "epoch": 5.0}


# DINOv2 as the ViT-L/14 recipe runs it: Sinkhorn-Knopp, separate heads, KoLeo over all processes
METHOD = {"dino": {"name": "dino"},
          "dinov2": {"name": "dinov2", "centering": "sinkhorn", "separate_head": True, "koleo_scope": "global"}}


def make_dino(name="dino"):
    torch.manual_seed(0)
    cfg = build_config({"method": {**METHOD[name], "out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
                        "backbone": {"name": "vit_tiny", "patch_size": 7, "depth": 2, "drop_path": 0.0}})
    return build_method(cfg, 1, 28).double()


def train_two_steps(model, views, masks=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model({"views": views, **({"masks": masks} if masks else {})}, SCHED)["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.after_step(SCHED)


def _sharded_worker(rank, views, name, masks):
    from selfsight.engine.sharding import full_model_state, shard_model
    model = shard_model(make_dino(name), torch.device("cpu"))
    b = views[0].shape[0] // WORLD
    part = slice(rank * b, (rank + 1) * b)
    train_two_steps(model, [v[part] for v in views], masks and [None if m is None else m[part] for m in masks])
    return full_model_state(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_sharded_dino_equals_one_process_with_the_global_batch(tmp_path, fmnist_small, name):
    from helpers import fmnist_view_pair
    views = fmnist_view_pair(fmnist_small, n=8)
    model = make_dino(name)
    masks = None
    if name == "dinov2":            # each rank's masks drawn for its own half, as the loader does; joined for 1 process
        halves = [model.make_masker()([v[r * 4:(r + 1) * 4] for v in views], r) for r in range(WORLD)]
        masks = [torch.cat([h[i] for h in halves]) for i in range(2)]
    sharded = run_on_gloo(_sharded_worker, tmp_path, views, name, masks, world=WORLD)
    assert len(shard_units(model)) == 4                       # 2 student + 2 teacher blocks
    train_two_steps(model, views, masks)
    ref = model.state_dict()
    assert sharded.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(sharded[k].double(), v.double(), rtol=1e-9, atol=1e-9, msg=k)


def tiny_mae(**extra):
    tree = {"method.name": "mae", "backbone.name": "vit_tiny", "backbone.patch_size": 7, "backbone.depth": 2,
            "views.size": 28, "data.batch_size": 16, "train.precision": "fp32", "train.progress": "false",
            "train.tensorboard": "false", "train.log_every": 1, "train.checkpoint_every": 0,
            "method.head.decoder_dim": 32, "method.head.decoder_depth": 1, "method.head.decoder_heads": 2,
            # SGD: Adam would blow up fp32 reduction-order noise in gradients that are zero in exact
            # arithmetic (the key biases: softmax ignores them) into lr-sized steps; AdamW is tested above
            "optim.name": "sgd", "optim.warmup_epochs": 0, "optim.lr": 0.05, "optim.base_batch": 16,
            "optim.clip_grad": 1.0, **extra}
    return load_config(overrides=[f"{k}={v}" for k, v in tree.items()])


def _trainer_worker(rank, run_dir, steps, fsdp, resume, dataset, stop_at=None):
    """A run of ``steps`` steps; ``stop_at``: stopped there as by SIGTERM (checkpoint, clean exit)."""
    cfg = tiny_mae(**{"train.steps": steps, "train.fsdp": str(fsdp).lower()})
    trainer = Trainer(cfg, run_dir, resume=resume, dataset=dataset)
    if stop_at is not None:
        schedule = trainer.schedule

        def stop_after(step):
            if step + 1 == stop_at:
                trainer._stop_signal = 15
            return schedule(step)
        trainer.schedule = stop_after
    trainer.fit()
    return {}


def gloo(tmp_path, name, run_dir, *args):
    (tmp_path / name).mkdir()
    return run_on_gloo(_trainer_worker, tmp_path / name, run_dir, *args, world=WORLD, writes=[run_dir])


def _state(run_dir):
    return safe_load(run_dir / "checkpoint.pt")


@pytest.mark.slow
def test_trainer_fsdp_equals_ddp_and_resumes_exactly(tmp_path, fmnist_small):
    data = fmnist_small
    ddp, fsdp, cut = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "cut"
    gloo(tmp_path, "a", ddp, STEPS, False, False, data)
    gloo(tmp_path, "b", fsdp, STEPS, True, False, data)
    a, b = _state(ddp), _state(fsdp)
    assert b["optimizer_format"] == "fqn" and "optimizer_format" not in a
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():               # full tensors, not shards, equal to DDP's
        assert b["model"][k].shape == v.shape, k
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=2e-5, msg=k)

    # a DDP checkpoint is not resumed sharded in silence (its optimizer state is keyed by position)
    refused = tmp_path / "refused"
    refused.mkdir()
    (refused / "checkpoint.pt").write_bytes((ddp / "checkpoint.pt").read_bytes())
    with pytest.raises(Exception, match="without train.fsdp"):
        gloo(tmp_path, "e", refused, STEPS + 1, True, True, data)

    # a sharded run stopped at step 2, resumed sharded, and resumed without sharding (DDP)
    for name, fsdp_resume in (("sharded", True), ("unsharded", False)):
        run = cut / name
        gloo(tmp_path, f"c{name}", run, STEPS, True, False, data, 2)
        assert 2 <= _state(run)["step"] < STEPS              # a signal stop is agreed every 10 steps
        gloo(tmp_path, f"d{name}", run, STEPS, fsdp_resume, True, data)
        c = _state(run)
        assert c["step"] == STEPS
        for k, v in b["model"].items():
            torch.testing.assert_close(c["model"][k], v, rtol=1e-4, atol=2e-5, msg=f"{name}: {k}")


def test_shard_units_finds_blocks_and_resnet_stages():
    from selfsight.backbones.resnet import ResNetBackbone
    assert len(shard_units(ResNetBackbone("resnet10", in_chans=1, width=8))) == 4
    assert len(shard_units(make_dino())) == 4
