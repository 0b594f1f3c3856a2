"""train.compile speed-up: the same SimCLR run eager and compiled, in one process.

Times the trainer's step (forward, backward, optimizer step; data loading excluded) over
``--steps`` steps after ``--warmup`` steps (the first compiled step compiles), on real
Fashion-MNIST images at ``--size`` px, and prints steps/s of both and their ratio.

    .venv/bin/python benchmarks/compile_speed.py --backbone resnet18 --size 32 --batch 256 --steps 20 --stem s2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from selfsight.data import build_dataset
from selfsight.engine.trainer import Trainer
from selfsight.resolve import load_config


def steps_per_s(compile_: bool, args, dataset, out) -> dict:
    over = [f"backbone.name={args.backbone}", f"views.size={args.size}", f"data.batch_size={args.batch}",
            f"train.steps={args.warmup + args.steps}", f"train.compile={str(compile_).lower()}",
            "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=0",
            "train.log_every=1000", f"backbone.small_stem={args.stem}", "optim.name=sgd"]
    tr = Trainer(load_config(overrides=["method.name=simclr", *over]), out, dataset=dataset)
    real, times = tr._step, []

    def timed(*a):
        t0 = time.perf_counter()
        real(*a)
        times.append(time.perf_counter() - t0)
    tr._step = timed
    tr.fit()
    measured = times[args.warmup:]
    return {"compile": compile_, "first_step_s": round(times[0], 1), "steps_per_s": len(measured) / sum(measured)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--stem", default="s2", help="ResNet stem: s2 (3x3 stride 2) or cifar (3x3 stride 1)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    dataset = build_dataset("fashion-mnist", download=False)
    with tempfile.TemporaryDirectory() as tmp:
        eager = steps_per_s(False, args, dataset, f"{tmp}/eager")
        compiled = steps_per_s(True, args, dataset, f"{tmp}/compiled")
    print(json.dumps({"threads": torch.get_num_threads(), "eager": eager, "compiled": compiled,
                      "speedup": compiled["steps_per_s"] / eager["steps_per_s"]}))


if __name__ == "__main__":
    main()
